"""Models exported from the libraries users use, built by our own code with random weights (no hub).

torch's TorchScript (``dynamo=False``) and dynamo (``dynamo=True``) exporters; transformers, diffusers and plain
torch modules, scaled where a trained model overflows FP16. torch and the libraries are imported only when a model
is built; exports are cached on disk (see ``cache``), so a machine exports each entry once.

- ``NAMES``: every (name, exporter) that exports; ``UNSUPPORTED``: (name, exporter, reason) for the rest.
- ``build(name, exporter)``: the ``onnx.ModelProto``; ``feeds(name)``: deterministic feeds (one dict per sample);
  ``reference(name, exporter)``: torch's FP32 outputs on those feeds (``reference64(name)``: float64);
  ``is_control(name)``: fine in FP16.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.exported import attention, control_flow, filters, hf_text, sequence, vae, vision
from onnx_fp16_rewrite.models.exported.cache import cache_dir, load_entry, store_entry
from onnx_fp16_rewrite.models.exported.spec import EXPORTERS, Feed, Spec

__all__ = ["EXPORTERS", "NAMES", "SPECS", "UNSUPPORTED", "build", "cache_dir", "feeds", "is_control", "reference",
           "reference64", "spec"]

logger = logging.getLogger(__name__)

SPECS: dict[str, Spec] = {s.name: s for module in (filters, hf_text, attention, sequence, vae, vision, control_flow)
                          for s in module.SPECS}

NAMES: list[tuple[str, str]] = [(n, e) for n, s in SPECS.items() for e in EXPORTERS if e not in s.unsupported]
UNSUPPORTED: list[tuple[str, str, str]] = [(n, e, s.unsupported[e]) for n, s in SPECS.items()
                                           for e in EXPORTERS if e in s.unsupported]


def spec(name: str) -> Spec:
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"no corpus model {name!r}; known: {', '.join(SPECS)}") from None


def is_control(name: str) -> bool:
    """True for the models that are fine in FP16 (nothing should be pinned or rewritten)."""
    return spec(name).control


def feeds(name: str, model: onnx.ModelProto | None = None) -> list[Feed]:
    """Deterministic feeds; with ``model``, only the inputs the model declares (an exporter may drop one)."""
    result = spec(name).feeds()
    if model is not None:
        wanted = {i.name for i in model.graph.input}
        result = [{k: v for k, v in f.items() if k in wanted} for f in result]
    return result


def _entry(name: str | Spec, exporter: str, cache_root=None,
           use_cache: bool = True) -> tuple[onnx.ModelProto, list[Feed]]:
    s = name if isinstance(name, Spec) else spec(name)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}: {exporter!r}")
    if use_cache:
        hit = load_entry(s, exporter, cache_root)
        if hit is not None:
            return hit
    from onnx_fp16_rewrite.models.exported.export import export_spec, torch_outputs

    module = s.module()
    samples = s.feeds()
    model = export_spec(s, module, samples[0], exporter)
    ref = torch_outputs(s, module, samples)
    if use_cache:
        store_entry(s, exporter, model, ref, cache_root)
    return model, ref


def build(name: str | Spec, exporter: str = "torchscript", *, cache_root=None,
          use_cache: bool = True) -> onnx.ModelProto:
    """The exported model (from the disk cache when its key matches). ``name`` may be a Spec outside the
    corpus (``sized``: the benchmark's realistic sizes)."""
    return _entry(name, exporter, cache_root, use_cache)[0]


def reference(name: str, exporter: str = "torchscript", *, cache_root=None) -> list[Feed]:
    """torch's FP32 outputs of the module ``build`` exported, one dict per feed of ``feeds(name)``."""
    return _entry(name, exporter, cache_root)[1]


def reference64(name: str) -> list[Feed]:
    """torch's float64 outputs (the module in double, float feeds widened): the yardstick where FP32 itself is
    noisy (integral images, a BN that amplifies a cancellation). Not cached."""
    from onnx_fp16_rewrite.models.exported.export import torch_outputs

    s = spec(name)
    wide = [{k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in f.items()} for f in s.feeds()]
    return torch_outputs(s, s.module().double(), wide)
