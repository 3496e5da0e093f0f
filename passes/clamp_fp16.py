"""clamp-fp16: APPROXIMATE last resort -- clamp tensors that pass FP16 range to +-(65504 - margin).

This is what transformers does for T5 in FP16 (``clamp_value = torch.finfo(torch.float16).max - 1000``, PR #9487):
a ``Clip`` after every tensor whose measured FP32 absmax exceeds the limit, so an FP16 engine sees a finite value
instead of inf (and no inf - inf = NaN downstream). Unlike every other pass here it *changes the FP32 results*
wherever |x| > limit, so the PassManager's default FP32 validation (rtol 1e-5) rolls it back: use it with a
tolerance you accept, and only where no exact rewrite (rescale-residual, fuse-normalization, prescale-attention)
applies. Every site it rewrites says "approximate". Clamping a square or an exponential (a norm's Pow, a softmax's
Exp) is far from harmless: pick sites with ``nodes``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)


class ClampFp16(Pass):
    name = "clamp-fp16"
    summary = "APPROXIMATE, opt-in: clamp tensors past FP16 range to +-(65504 - margin), as transformers does for T5"
    approximate: ClassVar[bool] = True  # changes FP32 results: a pipeline must opt in and accept a tolerance

    def __init__(self, *, margin: float = 1000.0, nodes: Sequence[str] = ()) -> None:
        """Tensors with measured FP32 absmax above ``65504 - margin`` get a Clip to that limit. ``nodes``: only
        tensors produced by these nodes."""
        if not 0 <= margin < FP16_MAX:
            raise BadInputError(f"clamp-fp16: margin must be in [0, {FP16_MAX:g}), got {margin}")
        self.margin = float(margin)
        self.nodes = tuple(nodes)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        limit = np.float32(FP16_MAX - self.margin)
        absmax = ctx.tensor_absmax()
        for node in list(graph.nodes):
            if self.nodes and node.name not in self.nodes:
                continue
            for i, t in enumerate(list(node.outputs)):
                peak = absmax.get(t.name, 0.0)
                if peak <= limit:
                    continue
                if node.op == "Clip":
                    result.skipped.append(Site(node.name, node.op, f"{t.name} is already a Clip output"))
                    continue
                # The producer writes a new tensor; the Clip takes over the old name, so every reader (and a
                # graph output) reads the clamped value without being rewired.
                raw = gs.Variable(f"{t.name}/unclamped", dtype=t.dtype, shape=t.shape)
                node.outputs[i] = raw
                if graph.opset >= 11:
                    bounds: dict = {"inputs": [raw, gs.Constant(f"{t.name}/clamp_fp16.min", np.asarray(-limit)),
                                               gs.Constant(f"{t.name}/clamp_fp16.max", np.asarray(limit))]}
                else:  # Clip-6 takes its bounds as attributes
                    bounds = {"inputs": [raw], "attrs": {"min": float(-limit), "max": float(limit)}}
                graph.nodes.append(gs.Node("Clip", f"{node.name}/clamp_fp16/Clip", outputs=[t], **bounds))
                note = "" if math.isfinite(peak) else " (non-finite in FP32 already)"
                result.rewritten.append(Site(node.name, node.op, f"approximate: clamped {t.name} to "
                                             f"+-{float(limit):g} (FP32 absmax {peak:.4g}){note}; FP32 results "
                                             "change wherever |x| > the limit"))
                result.modified = True
        if not result.rewritten and not result.skipped:
            result.skipped.append(Site("-", "-", f"no tensor above {float(limit):g} (measured FP32 absmax)"))
        logger.info("clamp-fp16: %d tensors clamped (approximate)", len(result.rewritten))
        return result
