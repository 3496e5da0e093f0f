"""``fix --auto``: find the FP16 failure sites and give each the smallest fix that holds.

1. Profile FP32 ranges: one run per sample (graph outputs ride along as the reference).
2. Diagnose: one emulation run per sample with an FP32 shadow names the sites where FP16 error
   is born (overflow, cancellation, underflow, precision).
3. Rewrites first (when given): each candidate pass is applied through the PassManager (FP32
   validated, rolled back on failure) and kept when it removes sites without adding any.
4. Pin what is left: each site gets a region grown from it on measured ranges (forward until
   values are back in range, back to where inputs are safe), then the emulation verifies; a site
   that still fails grows further.
5. Shrink greedily: region nodes whose values would fit FP16 are released where the emulation
   stays clean (a bounded number of runs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx

from onnx_fp16_rewrite.analysis.diagnosis import CANCELLATION_RATIO, FailureSite, diagnose
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX, check_fp16, compare_output
from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.pipeline.pass_base import Pass
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.analysis.range_profile import RangeProfile, profile_ranges
from onnx_fp16_rewrite.analysis.regions import GraphIndex, grow_region

logger = logging.getLogger(__name__)


@dataclass
class SiteFix:
    """One failure site and the fix it got: ``fp32-region``, ``pass:<name>`` or ``unfixed``."""

    tensor: str
    node: str
    op: str
    kind: str
    fp32_absmax: float
    fp16_rel_error: float
    back_in_range: str | None
    fix: str
    pinned_nodes: list[str] = field(default_factory=list)


@dataclass
class AutoFixReport:
    sites: list[SiteFix]
    passes_kept: list[str]
    rewrites_tried: list  # PassRecord of each rewrite tried (its FP32 validation included)
    fp32_nodes: int
    released_by_shrink: list[str]
    profiling_runs: int
    emulation_runs: int
    validation_runs: int
    rounds: int
    passed: bool
    canonical: object | None = None  # CanonReport when auto_fix canonicalised the model itself
    # FP32 statistics of every float tensor of the model as given, from the profiling run (reports, annotations).
    ranges: list = field(default_factory=list)


def auto_fix(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    *,
    tolerance: float = 1e-2,
    exit_absmax: float = 2048.0,
    strict_cumsum: bool = False,
    rewrites: Sequence[Pass] = (),
    max_rounds: int = 4,
    max_shrink_runs: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[onnx.ModelProto, AutoFixReport]:
    """Returns the model with its precision plan (and any kept rewrites) and the report."""
    from onnx_fp16_rewrite.pipeline.pass_manager import PassManager, name_nodes

    from onnx_fp16_rewrite.canonical import canonicalize, restore_dynamic

    model = _copy(model)
    # The canonical form (a no-op on a model fix_model already canonicalised): literals for the rewrites.
    model, canon = canonicalize(model, feeds)
    name_nodes(model)
    profile = profile_ranges(model, feeds, progress=progress)
    measured = profile
    profile_runs = profile.runs
    reference = profile.outputs
    counter = _Counter(len(feeds))
    diag = counter.diagnose(model, feeds, profile, None, tolerance, exit_absmax, strict_cumsum)
    sites: list[SiteFix] = []
    kept: list[str] = []
    tried = []
    for rewrite in rewrites:
        if not diag.sites:
            break
        # The pass reads the ranges already measured instead of profiling again.
        manager = PassManager([rewrite], feeds, initial_absmax=profile.absmax())
        candidate, report = manager.run(model)
        # The reference run, and the candidate's when the pass changed anything.
        counter.validation += len(feeds) * (1 + (report.passes[0].validation is not None))
        tried.append(report.passes[0])
        if report.passes[0].status != "kept":
            continue
        cand_diag = counter.diagnose(candidate, feeds, profile, None, tolerance, exit_absmax, strict_cumsum,
                                     refresh_profile=True)
        fixed = [s for s in diag.sites if not _still_failing(s, cand_diag.sites)]
        if fixed and len(cand_diag.sites) < len(diag.sites):
            sites += [_site_fix(s, f"pass:{rewrite.name}") for s in fixed]
            kept.append(rewrite.name)
            model, profile, diag = candidate, cand_diag.profile, cand_diag
    plan = PrecisionPlan.from_model(model)
    index = GraphIndex(model.graph)
    absmax = profile.absmax()
    rounds = 0
    while _needs_work(model, diag, reference, tolerance) and rounds < max_rounds:
        rounds += 1
        for site in diag.sites:
            region = _site_region(index, site, absmax, exit_absmax, plan)
            for name, reason in region.items():
                plan.pin(name, f"auto: {site.kind} at {site.tensor}: {reason}")
            previous = next((s for s in sites if s.tensor == site.tensor and s.fix == "fp32-region"), None)
            if previous:
                previous.pinned_nodes = sorted(set(previous.pinned_nodes) | set(region))
            else:
                sites.append(_site_fix(site, "fp32-region", sorted(region)))
        diag = counter.diagnose(model, feeds, profile, plan, tolerance, exit_absmax, strict_cumsum)
    unresolved = _needs_work(model, diag, reference, tolerance)
    if unresolved:
        sites += [_site_fix(site, "unfixed") for site in diag.sites]
    released: list[str] = []
    if not unresolved:
        released = _shrink(model, feeds, reference, plan, sites, absmax, counter, max_shrink_runs,
                           tolerance, strict_cumsum)
    # The last diagnosis ran the emulation under this plan; a release by _shrink was kept only
    # where the emulation still passed. No further run is needed for the verdict.
    passed = _outputs_ok(model, diag.outputs, reference, tolerance)
    plan.store_in(model)
    report = AutoFixReport(
        sites=sites, passes_kept=kept, rewrites_tried=tried, fp32_nodes=len(plan), released_by_shrink=released,
        profiling_runs=profile_runs, emulation_runs=counter.emulation, validation_runs=counter.validation,
        rounds=rounds, passed=passed, ranges=list(measured.ranges.values()),
    )
    logger.info("auto: %d sites, %d FP32 nodes, %d profiling + %d emulation runs",
                len(sites), len(plan), report.profiling_runs, report.emulation_runs)
    if not canon.skipped:
        model = restore_dynamic(model, canon)
        report.canonical = canon
    return model, report


class _Counter:
    """Counts the model runs the search costs (the report states them)."""

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.emulation = 0
        self.validation = 0

    def diagnose(self, model, feeds, profile, plan, tolerance, exit_absmax, strict_cumsum, refresh_profile=False):
        self.emulation += self.samples
        return diagnose(model, feeds, profile, plan, tolerance=tolerance, exit_absmax=exit_absmax,
                        strict_cumsum=strict_cumsum, refresh_profile=refresh_profile)


def _site_region(
    index: GraphIndex, site: FailureSite, absmax: dict[str, float], exit_absmax: float, plan: PrecisionPlan
) -> dict[str, str]:
    """The region to pin for a site. An overflow grows both ways until values are back within
    ``exit_absmax``. Any other site (cancellation, precision, underflow) has a small result: it
    grows backward only, through inputs much larger than the result (they carry the digits the
    result needs); a site already pinned that still fails reaches further back."""
    seeds = {site.node: f"{site.kind} site"}
    if site.kind == "overflow":
        return grow_region(index, seeds, absmax, exit_absmax)
    limit = min(max(site.fp32_absmax * CANCELLATION_RATIO, 1.0), exit_absmax)
    if plan.is_fp32(site.node):
        limit /= 16
    return grow_region(index, seeds, absmax, limit, forward=False)


def _shrink(model, feeds, reference, plan, sites, absmax, counter, budget, tolerance, strict_cumsum) -> list[str]:
    """Release pinned nodes whose inputs and outputs all fit FP16 with room to spare, in groups
    (all at once, then per site), keeping each release the emulation accepts."""
    index = GraphIndex(model.graph)

    def fits(name: str) -> bool:
        node = index.nodes[name]
        values = [absmax[t] for t in list(node.input) + list(node.output) if t in absmax]
        return all(v <= FP16_MAX / 2 for v in values)

    groups = [[n for n in s.pinned_nodes if fits(n)] for s in sites if s.fix == "fp32-region"]
    groups = [g for g in groups if g]
    all_candidates = sorted({n for g in groups for n in g})
    attempts = [all_candidates] + groups if len(groups) > 1 else groups
    released: list[str] = []
    for group in attempts[:budget]:
        group = [n for n in group if plan.is_fp32(n)]
        if not group:
            continue
        trial = PrecisionPlan({k: v for k, v in plan.fp32_nodes.items() if k not in group})
        report = check_fp16(model, feeds, reference, plan=trial, strict_cumsum=strict_cumsum, rel_l2_tolerance=tolerance)
        counter.emulation += len(feeds)
        if report.passed and not report.failing_tensors:
            plan.fp32_nodes = trial.fp32_nodes
            released += group
            for s in sites:
                s.pinned_nodes = [n for n in s.pinned_nodes if n not in group]
    return released


def _needs_work(model: onnx.ModelProto, diag, reference: list[Feed], tolerance: float) -> bool:
    """More pinning is due while an output fails or a site still goes non-finite (a clean
    output can hide an inf that a different input would surface)."""
    if any(math.isinf(s.fp16_rel_error) for s in diag.sites):
        return bool(diag.sites)
    return not _outputs_ok(model, diag.outputs, reference, tolerance) and bool(diag.sites)


def _outputs_ok(model: onnx.ModelProto, got: list[Feed], reference: list[Feed], tolerance: float) -> bool:
    return all(
        compare_output(o.name, [g[o.name] for g in got], [r[o.name] for r in reference], tolerance).ok
        for o in model.graph.output
    )


def _still_failing(site: FailureSite, sites: list[FailureSite]) -> bool:
    return any(s.tensor == site.tensor or s.node == site.node for s in sites)


def _site_fix(site: FailureSite, fix: str, nodes: list[str] | None = None) -> SiteFix:
    return SiteFix(site.tensor, site.node, site.op, site.kind, site.fp32_absmax, site.fp16_rel_error,
                   site.back_in_range, fix, nodes or [])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


__all__ = ["AutoFixReport", "RangeProfile", "SiteFix", "auto_fix"]
