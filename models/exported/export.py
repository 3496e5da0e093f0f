"""Export a corpus module with torch's two ONNX exporters, as users call them.

TorchScript: ``torch.onnx.export(..., dynamo=False)`` (opset from the spec, constant folding on unless the spec
says otherwise). Dynamo: ``torch.onnx.export(..., dynamo=True)`` at the exporter's default opset, with its own
onnxscript optimisation. Both get named inputs/outputs; dynamic dims become ``dynamic_axes`` resp.
``torch.export.Dim.DYNAMIC``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

import numpy as np
import onnx

from onnx_fp16_rewrite.models.exported.spec import EXPORTERS, Feed, Spec

__all__ = ["export_spec", "import_torch", "torch_outputs"]

logger = logging.getLogger(__name__)


def import_torch():
    """``torch``, with a torchvision that cannot load hidden from transformers.

    The PyPI torchvision wheel beside the CPU torch wheel fails at import ("operator torchvision::nms does not
    exist"); transformers imports it whenever it is installed, so every model class would fail. Where it cannot be
    imported it is marked absent for this process (``sys.modules[...] = None``), which transformers reads as
    "not installed"."""
    import torch

    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception as exc:  # a broken binary raises RuntimeError, not ImportError
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            sys.modules["torchvision"] = None  # type: ignore[assignment]
            logger.info("torchvision cannot be imported (%s): hidden from transformers", exc)
    return torch


def _no_torchvision_note(record: logging.LogRecord) -> bool:
    """Drops the dynamo exporter's "torchvision is not installed. Skipping torchvision::nms" (one per op)."""
    return not str(record.msg).startswith("torchvision is not installed")


def _tensors(spec: Spec, feed: Feed):
    torch = import_torch()
    return tuple(torch.from_numpy(np.array(feed[name])) for name in spec.inputs)  # (ascontiguousarray: 0-d -> 1-d)


def torch_outputs(spec: Spec, module, feeds: list[Feed]) -> list[Feed]:
    """The torch module's FP32 outputs on every feed (the reference the ONNX exports are compared with)."""
    torch = import_torch()
    results = []
    with torch.no_grad():
        for feed in feeds:
            out = module(*_tensors(spec, feed))
            out = out if isinstance(out, (tuple, list)) else (out,)
            results.append({name: o.detach().numpy().copy() for name, o in zip(spec.outputs, out)})
    return results


def export_spec(spec: Spec, module, feed: Feed, exporter: str) -> onnx.ModelProto:
    """Export ``module`` (from ``spec.module()``) with ``feed`` as the example input."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}: {exporter!r}")
    if exporter in spec.unsupported:
        raise NotImplementedError(f"{spec.name}: {exporter} cannot export it: {spec.unsupported[exporter]}")
    torch = import_torch()
    args = _tensors(spec, feed)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # exporter chatter (TracerWarning, constant-folding notes)
        if exporter == "torchscript":
            buf = io.BytesIO()
            if spec.script is not None:
                module = spec.script(module)
            options = {"do_constant_folding": True, **spec.torchscript_options}
            if options.get("training") == "preserve":  # spelled as a string so specs need no torch import
                options["training"] = torch.onnx.TrainingMode.PRESERVE
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=spec.opset,
                              input_names=list(spec.inputs), output_names=list(spec.outputs),
                              dynamic_axes={k: dict(v) for k, v in spec.dynamic.items()} or None, **options)
            model = onnx.load_from_string(buf.getvalue())
        else:
            dynamic = None
            if spec.dynamic:
                dims = torch.export.Dim.DYNAMIC
                dynamic = {name: {axis: dims for axis in spec.dynamic[name]} if name in spec.dynamic else None
                           for name in spec.inputs}
            registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
            registry_log.addFilter(_no_torchvision_note)
            try:
                program = torch.onnx.export(module, args, dynamo=True, input_names=list(spec.inputs),
                                            output_names=list(spec.outputs), dynamic_shapes=dynamic, verbose=False,
                                            **spec.dynamo_options)
            finally:
                registry_log.removeFilter(_no_torchvision_note)
            model = program.model_proto
    if spec.post is not None:
        spec.post(model)
    model.doc_string = f"{spec.name} ({exporter} export, random weights): {spec.about}"
    logger.debug("exported %s with %s: %d nodes", spec.name, exporter, len(model.graph.node))
    return model
