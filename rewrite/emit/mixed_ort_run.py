"""The emitted mixed-precision model run as typed in ONNX Runtime, compared with the FP32 reference.

``fix --emit mixed`` reports how far the model it writes is from FP32 when ORT runs it as a user's
session would (FP16 weights alone cost ~1e-4 relative: expected, reported, not a failure). The run
needs nothing the rest of ``fix`` computes after the emission, so ``MixedOrtRun`` does it on a
thread of its own while the verification, annotation and FLOP count go on: ORT builds and runs
without the GIL (issue 11: ~1x a plain inference that no longer adds to ``fix``'s wall time in
full). The thread reads its own copy of the model (a graph copy: the weights are shared
references, ``io.weights``), so the caller may annotate its model meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_fp16_rewrite.io.background import BackgroundCall
from onnx_fp16_rewrite.io.ort_runner import Feed, run_model


@dataclass
class MixedRunError:
    """How far the mixed-precision model, run as typed in ORT, is from the FP32 reference."""

    output: str
    max_abs_error: float
    rel_l2: float


def mixed_ort_error(model: onnx.ModelProto, feeds: Sequence[Feed], reference: Sequence[Feed]) -> list[MixedRunError]:
    """Run the mixed model as typed (inputs cast to its input types) and compare with FP32."""
    types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    typed = [{k: np.asarray(v).astype(types.get(k, np.asarray(v).dtype)) for k, v in f.items()} for f in feeds]
    # With ORT's optimizations, as a user's session runs it (and a quarter faster than without).
    got = run_model(model, typed, as_user=True)
    errors = []
    for out in model.graph.output:
        g = np.concatenate([np.asarray(r[out.name], np.float64).ravel() for r in got])
        r = np.concatenate([np.asarray(x[out.name], np.float64).ravel() for x in reference])
        norm = float(np.linalg.norm(r)) or 1.0
        errors.append(MixedRunError(out.name, float(np.abs(g - r).max()), float(np.linalg.norm(g - r) / norm)))
    return errors


class MixedOrtRun(BackgroundCall):
    """``mixed_ort_error`` on a thread, started at once; ``result()`` waits for its list of
    MixedRunError and raises what the run raised."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[Feed], reference: Sequence[Feed]) -> None:
        own = onnx.ModelProto()
        own.CopyFrom(model)
        super().__init__("onnx-rewrite-mixed-ort-run", mixed_ort_error, own, list(feeds), list(reference))


__all__ = ["MixedOrtRun", "MixedRunError", "mixed_ort_error"]
