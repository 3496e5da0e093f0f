"""Where along the graph FP16 departs from FP32: per-tensor error against an FP32 shadow.

One emulation run per feed of a graph that carries, beside every emulated tensor, its untouched
FP32 twin; the relative L2 error between the two is reduced in the graph. The automatic fixer's
diagnosis reads it to find the node where error is born (overflow, cancellation, underflow).
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation, emu_feed, site_stats
from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.io.sessions import run_cached
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan


@dataclass
class TensorError:
    """How far a tensor's FP16-emulated value is from its FP32 value (relative L2)."""

    tensor: str
    node: str
    op: str
    fp16: bool
    rel_error: float
    nonfinite: bool
    fp32_absmax: float  # from the FP32 shadow (NaN where FP32 itself has NaN)



@dataclass
class ErrorRun:
    """``tensor_errors``' results plus what the emulation was (a diagnosis' FP16 report reads it)."""

    errors: list[TensorError]
    outputs: list[Feed]
    mode: str
    fp16_nodes: int
    fp32_nodes: int
    notes: list[str]
    unhandled_bodies: list[str]


def tensor_errors(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    plan: PrecisionPlan | None = None,
    *,
    strict_cumsum: bool = False,
    shadow_ranges: Container[str] | None = None,
) -> tuple[list[TensorError], list[Feed]]:
    """Per float tensor, in topological order: FP32 absmax and FP16-vs-FP32 relative L2 error
    (inf where the FP16 value is non-finite), from one emulation run per feed with an FP32
    shadow. Also returns the emulated graph outputs of each run (``error_run`` has the details)."""
    run = error_run(model, feeds, plan, strict_cumsum=strict_cumsum, shadow_ranges=shadow_ranges)
    return run.errors, run.outputs


def error_run(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    plan: PrecisionPlan | None = None,
    *,
    strict_cumsum: bool = False,
    shadow_ranges: Container[str] | None = None,
) -> ErrorRun:
    """``tensor_errors`` with the emulation's mode, node counts and notes.

    Only the error reductions are in the graph (no FP16 statistics: a non-finite FP16 value makes
    the squared error's sum non-finite); the FP32 absmax is measured only for ``shadow_ranges``
    (None: all; NaN for the others; the fixer reads the rest from its range profile)."""
    emu = build_emulation(model, plan, strict_cumsum=strict_cumsum, fp32_shadow=True, with_stats=False,
                          shadow_ranges=shadow_ranges)
    out_names = [o.name for o in model.graph.output]
    runs = run_cached(emu.model, [emu_feed(f, emu.fp16_inputs) for f in feeds], optimize=True, cache=False)
    errors = []
    for s in emu.sites:
        nonfinite = site_stats(s, runs)[1] if s.sum_out else False
        err = sum(float(r[s.err_out]) for r in runs)
        ref = sum(float(r[s.ref_out]) for r in runs)
        if nonfinite or not np.isfinite(err):
            rel = float("inf")
        else:
            rel = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
        nonfinite = nonfinite or not np.isfinite(err)
        absmax = float("nan")
        if s.shadow_max_out:
            hi = max(float(r[s.shadow_max_out]) for r in runs)
            lo = min(float(r[s.shadow_min_out]) for r in runs)
            absmax = max(abs(hi), abs(lo))
        errors.append(TensorError(s.tensor, s.node, s.op, s.fp16, rel, nonfinite, absmax))
    return ErrorRun(errors, [{k: r[k] for k in out_names} for r in runs], emu.mode, emu.fp16_nodes, emu.fp32_nodes,
                    emu.notes, emu.unhandled_bodies)
