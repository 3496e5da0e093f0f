"""Naming FP16 failure sites from FP32 ranges and the emulation's per-tensor errors.

A *site* is where an FP16 error is born: a tensor whose FP16 value goes non-finite while its
producer's inputs are finite, or whose relative error (vs the FP32 shadow) is both above
``tolerance / 10`` and ``AMPLIFICATION`` times the largest error among its producer's inputs
(at least FP16's unit roundoff): the node that amplifies error, not the ones that carry it on.
Sites are classified from the FP32 ranges:
- ``overflow``: the FP32 value itself exceeds 65504;
- ``cancellation``: the inputs are far larger than the output (an integral-image box sum, a
  variance as E[x^2] - E[x]^2): FP16's spacing at the inputs' magnitude swamps the result;
- ``underflow``: many inputs or outputs are below FP16's normal range;
- ``precision``: anything else (error amplified by exp, division, ...).
Tensors that are already non-finite in FP32 (a masked ``log(0)``) or hold mask sentinels such
as ``finfo(float32).min`` are never sites: FP16 does not break them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from onnx_fp16_rewrite.analysis.signatures import unchanged, value_signatures
from onnx_fp16_rewrite.emulation.error_attribution import ErrorRun, TensorError, error_run
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX, Fp16Report, TensorFinding, compare_output
from onnx_fp16_rewrite.emulation.fp16_graph_edits import subgraphs
from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.analysis.range_profile import FP16_MIN_NORMAL, RangeProfile
from onnx_fp16_rewrite.analysis.regions import GraphIndex

logger = logging.getLogger(__name__)

CANCELLATION_RATIO = 8.0
UNDERFLOW_FRACTION = 0.01
AMPLIFICATION = 8.0
UNIT_ROUNDOFF = 2.0**-11


@dataclass
class FailureSite:
    tensor: str
    node: str
    op: str
    kind: str
    fp32_absmax: float
    inputs_absmax: float
    fp16_rel_error: float
    back_in_range: str | None


@dataclass
class Diagnosis:
    sites: list[FailureSite]
    errors: list[TensorError]
    outputs: list[Feed]
    profile: RangeProfile
    run: ErrorRun | None = None  # the emulation run behind it (mode, node counts, notes)
    model: onnx.ModelProto | None = None  # the diagnosed model (its value signatures on demand)
    seconds: float = 0.0
    _signatures: dict[str, str] | None = field(default=None, repr=False)
    reference: list[Feed] | None = None  # the FP32 outputs of ``model`` on the diagnosed feeds (the shadow's)
    judged: tuple | None = None  # the embedded cut-out judges' (scores, L1 sums), when it ran any

    def signatures(self) -> dict[str, str]:
        """``value_signatures`` of the diagnosed model (hashing the weights only when a rewrite asks)."""
        if self._signatures is None and self.model is not None:
            self._signatures = value_signatures(self.model)
        return self._signatures or {}

    def fp16_report(self, reference: Sequence[Feed], tolerance: float, *, strict_cumsum: bool = False,
                    max_findings: int = 5) -> Fp16Report:
        """The check report of the diagnosed emulation run (no further run): its outputs against
        ``reference``; failing tensors are those the run made non-finite (``overflow`` where FP32
        itself passes 65504 in an FP16 tensor), their FP32 absmax from the profile."""
        assert self.run is not None
        names = list(self.outputs[0]) if self.outputs else []
        outputs = [compare_output(n, [o[n] for o in self.outputs], [r[n] for r in reference], tolerance)
                   for n in names]
        absmax = self.profile.absmax()
        findings = []
        for e in self.errors:
            r = self.profile.ranges.get(e.tensor)
            if not e.nonfinite or (r is not None and r.fp32_nonfinite):
                continue
            a = absmax.get(e.tensor, e.fp32_absmax)
            findings.append(TensorFinding(e.tensor, e.node, e.op, a, "overflow" if e.fp16 and a > FP16_MAX
                                          else "non-finite"))
        return Fp16Report(mode=self.run.mode, strict_cumsum=strict_cumsum, fp16_nodes=self.run.fp16_nodes,
                          fp32_nodes=self.run.fp32_nodes, outputs=outputs, first_failures=findings[:max_findings],
                          failing_tensors=len(findings), rel_l2_tolerance=tolerance,
                          passed=all(o.ok for o in outputs) and not self.run.unhandled_bodies,
                          seconds=round(self.seconds, 3), notes=list(self.run.notes))


def diagnose(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    profile: RangeProfile | None,
    plan: PrecisionPlan | None = None,
    *,
    tolerance: float = 1e-2,
    exit_absmax: float = 2048.0,
    strict_cumsum: bool = False,
    refresh_profile: bool = False,
    previous: Diagnosis | None = None,
    profile_feeds: Sequence[Feed] = (),
    on_run=None,
    changed: Sequence[str] | None = None,
    judges=None,
) -> Diagnosis:
    """One emulation run per feed (with an FP32 shadow), then classification from ``profile``.
    ``profile=None``: the same run profiles the FP32 ranges (the shadow carries the profile's
    statistics; ``profile_feeds``, more samples, are profiled after it in plain FP32 runs) and
    its shadow's outputs are the FP32 reference (``Diagnosis.reference``): one run per sample
    for the profile, the reference and the diagnosis.
    ``refresh_profile``: ``model`` was rewritten since ``profile`` was taken; its ranges are
    refreshed from the shadow (no extra profiling run), measured there only for tensors the
    rewrite changed when ``previous`` (the diagnosis ``profile`` belongs to) says how they were
    computed; elsewhere the shadow measures only what the profile lacks. ``on_run()`` is called
    after each run (a progress counter). ``changed``: with ``refresh_profile``, the tensors whose
    FP32 values the rewrite changed, as the pass declared them (PassResult.values_changed); every
    other tensor keeps its profiled range, and only these and new tensors are measured.
    ``judges``: cut-out judges run in the same graph (error_attribution.error_run; their
    judgement is ``Diagnosis.judged``)."""
    start = time.perf_counter()
    twin = profile is None and not any(subgraphs(n) for n in model.graph.node)
    if profile is None and not twin:  # control flow: the shadow has no body profile (range_profile has)
        from onnx_fp16_rewrite.analysis.range_profile import profile_ranges

        profile = profile_ranges(model, [*feeds, *profile_feeds])
    keep = set(profile.ranges) if profile is not None else set()
    if refresh_profile and changed is not None:
        keep -= set(changed)
    elif refresh_profile:
        keep &= unchanged(previous.signatures(), value_signatures(model)) if previous is not None else set()
    run = error_run(model, feeds, plan, strict_cumsum=strict_cumsum, shadow_ranges=() if twin else _Except(keep),
                    twin_profile=twin, on_run=on_run, profile_runs=len(feeds) + len(profile_feeds), judges=judges)
    if twin:
        profile = _twin_profile(model, run, profile_feeds, on_run)
        run.profile = None  # its samples (16384 values a tensor a sample) are in the profile's percentiles now
        keep = set(profile.ranges)
    errors, outputs = run.errors, run.outputs
    for e in errors:  # the profile's absmax where the shadow did not measure it
        if e.tensor in keep and math.isnan(e.fp32_absmax):
            e.fp32_absmax = profile.ranges[e.tensor].absmax
        r = profile.ranges.get(e.tensor)
        if e.sampled and r is not None and r.fp32_nonfinite and not e.nonfinite:
            # A sampled error can miss FP32's own inf/NaN; exact statistics make it non-finite.
            e.rel_error, e.nonfinite = float("inf"), True
    if refresh_profile:
        profile = profile.refreshed(errors)
    by_tensor = {e.tensor: e for e in errors}
    index = GraphIndex(model.graph)
    absmax = profile.absmax()
    sites = []
    for e in errors:
        r = profile.ranges.get(e.tensor)
        if r is None or r.fp32_nonfinite or r.sentinels or e.rel_error <= tolerance / 10:
            continue
        node = index.nodes[e.node]
        # A control-flow node's outputs carry its bodies' outputs: error born there is not born here.
        reads = [*node.input, *(o.name for g in subgraphs(node) for o in g.output)]
        inputs = [t for t in reads if t in by_tensor]
        in_error = max([by_tensor[t].rel_error for t in inputs] + [UNIT_ROUNDOFF])
        if not (math.isinf(e.rel_error) and math.isfinite(in_error)) and e.rel_error <= AMPLIFICATION * in_error:
            continue  # carried from upstream, not born here
        in_absmax = max((absmax.get(t, 0.0) for t in inputs), default=0.0)
        kind = _classify(r.absmax, in_absmax, r.subnormal_fraction,
                         max((profile.ranges[t].subnormal_fraction for t in inputs if t in profile.ranges), default=0.0))
        sites.append(FailureSite(e.tensor, e.node, e.op, kind, r.absmax, in_absmax, e.rel_error,
                                 _back_in_range(index, e.tensor, absmax, exit_absmax)))
    logger.info("diagnosis: %d failure sites", len(sites))
    return Diagnosis(sites, errors, outputs, profile, run, model, time.perf_counter() - start,
                     reference=run.reference, judged=run.judged)


def _twin_profile(model: onnx.ModelProto, run: ErrorRun, more: Sequence[Feed], on_run=None) -> RangeProfile:
    """The range profile from the shadow's statistics, plus plain profiling runs on ``more``."""
    if not more:
        return run.profile.profile(run.reference)
    from onnx_fp16_rewrite.analysis.range_profile import profile_ranges

    profile = profile_ranges(model, more, into=run.profile, progress=(lambda done, total: on_run()) if on_run else None)
    profile.outputs = [*run.reference, *profile.outputs]
    return profile


class _Except:
    """Every name but those given (what the shadow must measure)."""

    def __init__(self, known: set[str]) -> None:
        self.known = known

    def __contains__(self, name: object) -> bool:
        return name not in self.known


def _classify(out_absmax: float, in_absmax: float, out_subnormal: float, in_subnormal: float) -> str:
    if out_absmax > FP16_MAX:
        return "overflow"
    if out_absmax < FP16_MIN_NORMAL or max(out_subnormal, in_subnormal) > UNDERFLOW_FRACTION:
        return "underflow"
    if in_absmax > CANCELLATION_RATIO * out_absmax:
        return "cancellation"
    return "precision"


def _back_in_range(index: GraphIndex, tensor: str, absmax: dict[str, float], limit: float) -> str | None:
    """The first tensor downstream (breadth first) whose FP32 absmax is back within ``limit``."""
    seen, frontier = {tensor}, [tensor]
    while frontier:
        nxt = []
        for t in frontier:
            if t in absmax and absmax[t] <= limit:
                return t
            for consumer in index.consumers.get(t, []):
                for out in consumer.output:
                    if out and out not in seen:
                        seen.add(out)
                        nxt.append(out)
        frontier = nxt
    return None
