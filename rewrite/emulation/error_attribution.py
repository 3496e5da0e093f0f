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
from onnx_fp16_rewrite.emulation.fp16_graph_edits import SHADOW
from onnx_fp16_rewrite.analysis.range_profile import ProfileAccumulator
from onnx_fp16_rewrite.io.ort_runner import Feed, make_session, trim_heap
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
    sampled: bool = False  # the error is estimated from a sample (emulation.shadow_errors)



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
    reference: list[Feed] | None = None  # the FP32 twin's graph outputs (the model's FP32 outputs)
    # ``twin_profile``: the twin's statistics (a range_profile.ProfileAccumulator; ``.profile(reference)``).
    profile: object | None = None
    # ``judges``: (scores, L1 sums) of the embedded cut-out judges, None where unknown (embedded_judges).
    judged: tuple | None = None


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
    twin_profile: bool = False,
    on_run=None,
    profile_runs: int | None = None,
    judges=None,
) -> ErrorRun:
    """``tensor_errors`` with the emulation's mode, node counts and notes.

    Only the error reductions are in the graph (no FP16 statistics: a non-finite FP16 value makes
    the squared error's sum non-finite); the FP32 absmax is measured only for ``shadow_ranges``
    (None: all; NaN for the others; the fixer reads the rest from its range profile).
    ``twin_profile``: the run also profiles every FP32 twin tensor (``ErrorRun.profile``, the same
    statistics ``profile_ranges`` takes; the graph outputs' twins are ``ErrorRun.reference``;
    ``profile_runs``: how many runs that profile will have in all, these and any added later,
    so it keeps only what its percentiles need: range_profile.ProfileAccumulator).
    ``judges``: an ``analysis.embedded_judges.EmbeddedJudges`` run in the same graph, fed from the
    twin (``ErrorRun.judged``: what its ``read`` gives)."""
    emu = build_emulation(model, plan, strict_cumsum=strict_cumsum, fp32_shadow=True, with_stats=False,
                          shadow_ranges=shadow_ranges, twin_profile=twin_profile)
    if judges is not None:
        produced = {o for n in model.graph.node for o in n.output if o}
        judges.embed(emu.model.graph, lambda name: name + SHADOW if name in produced else name)
    out_names = [o.name for o in model.graph.output]
    # Optimizations off: the twin's outputs are the reference and must equal a plain FP32 run's
    # (ORT's basic level fuses Conv+Add in the twin), and it ran faster without them here.
    session = make_session(emu.model)
    names = [o.name for o in emu.model.graph.output]
    # The session holds its own graph: the proto (33 MB of Python objects for NAFNet-9's 9582
    # nodes) would only add to the run's peak memory.
    emu.model = None
    trim_heap()
    profiled = [s for s in emu.sites if s.profile_outs]
    stats = {s.tensor: s.profile_outs for s in profiled}
    acc = ProfileAccumulator({s.tensor: (s.node, s.op) for s in profiled},
                             runs_expected=profile_runs) if profiled else None
    arrays = set(out_names) | set(emu.twin_outputs.values())
    runs, reference = [], []
    for feed in feeds:
        # One run at a time: only scalars and the graph outputs are kept (the samples are
        # reduced into the profile at once), so memory stays that of one run.
        values = dict(zip(names, session.run(names, emu_feed(feed, emu.fp16_inputs))))
        if acc is not None:
            acc.add_run(values, stats)
        reference.append({k: values[t] for k, t in emu.twin_outputs.items()})
        runs.append({k: (v if k in arrays else float(v)) for k, v in values.items() if k in arrays or v.ndim == 0})
        del values
        if on_run is not None:
            on_run()
    del session
    trim_heap()
    errors = []
    for s in emu.sites:
        nonfinite = site_stats(s, runs)[1] if s.sum_out else False
        if s.nonfinite_out:
            nonfinite |= not all(np.isfinite(float(r[s.nonfinite_out])) for r in runs)
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
        errors.append(TensorError(s.tensor, s.node, s.op, s.fp16, rel, nonfinite, absmax, s.nonfinite_out is not None))
    return ErrorRun(errors, [{k: r[k] for k in out_names} for r in runs], emu.mode, emu.fp16_nodes, emu.fp32_nodes,
                    emu.notes, emu.unhandled_bodies, reference, acc, judges.read(runs) if judges is not None else None)

