"""Steps 4 and 5 of ``fix --auto`` (analysis.auto_fix): pin an FP32 region per failure site until
the emulation is clean, then release the pinned nodes whose values fit FP16 where it stays clean."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from onnx_fp16_rewrite.analysis.diagnosis import CANCELLATION_RATIO, Diagnosis, FailureSite
from onnx_fp16_rewrite.analysis.regions import GraphIndex, grow_region
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX, Fp16Report, compare_output
from onnx_fp16_rewrite.io.ort_runner import Feed

# Each pinning round's plan is screened before it is diagnosed (``pin_rounds``); False: always diagnosed.
SCREEN_PIN_ROUNDS = True


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


def pin_rounds(search, model, index, diag, plan, sites, absmax, max_rounds, rounds):
    """Pin a region per site and diagnose again, until no site is left or ``max_rounds``.
    Returns the last diagnosis, the rounds, and the check report of a clean screen that ended
    the pinning (else None).

    Each round's plan is first screened (``check_fp16(screen=True)``: no FP32 shadow, one sum a
    tensor): a clean screen (outputs pass, no tensor non-finite) means the diagnosis would name
    no non-finite site and pass the outputs, so the pinning stops exactly where it would have,
    for a third of the run. Not on models whose FP32 values hold inf/NaN or mask sentinels:
    those go non-finite in FP16 harmlessly, so their screen is never clean."""
    screenable = SCREEN_PIN_ROUNDS and not any(r.fp32_nonfinite or r.sentinels for r in diag.profile.ranges.values())
    while needs_work(model, diag, search.reference, search.tolerance) and rounds < max_rounds:
        rounds += 1
        before = set(plan.fp32_nodes)
        for site in diag.sites:
            region = site_region(index, site, absmax, search.exit_absmax, plan)
            for name, reason in region.items():
                plan.pin(name, f"auto: {site.kind} at {site.tensor}: {reason}")
            previous = next((s for s in sites if s.tensor == site.tensor and s.fix == "fp32-region"), None)
            if previous:
                previous.pinned_nodes = sorted(set(previous.pinned_nodes) | set(region))
            else:
                sites.append(site_fix(site, "fp32-region", sorted(region)))
        if set(plan.fp32_nodes) == before:
            # Nothing new pinned: the next diagnosis would repeat this one, and every later
            # round would grow the same regions (a round is a function of the plan and sites).
            break
        if screenable:
            with search.progress.phase(f"pinning round {rounds}: screen", total=None) as phase:
                report = search.check(model, plan)
                phase.done("clean" if clean(report) else "not clean: diagnosing")
            if clean(report):
                return Diagnosis([], [], [], diag.profile), rounds, report
        diag = search.diagnose(model, diag.profile, plan, f"pinning round {rounds}")
    return diag, rounds, None


def site_region(
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


def shrink(model, plan, sites, absmax, search, budget) -> tuple[Fp16Report | None, list[str]]:
    """Release pinned nodes whose inputs and outputs all fit FP16 with room to spare, in groups
    (all at once, then per site), keeping each release the emulation accepts. Returns the check
    report of the last release kept (the verdict under the final plan; None if none) and the
    released nodes."""
    index = GraphIndex(model.graph)

    def fits(name: str) -> bool:
        node = index.nodes[name]
        values = [absmax[t] for t in list(node.input) + list(node.output) if t in absmax]
        return all(v <= FP16_MAX / 2 for v in values)

    groups = [[n for n in s.pinned_nodes if fits(n)] for s in sites if s.fix == "fp32-region"]
    groups = [g for g in groups if g]
    all_candidates = sorted({n for g in groups for n in g})
    attempts = [all_candidates] + groups if len(groups) > 1 else groups
    accepted, released = None, []
    with search.progress.phase("shrinking regions", total=min(len(attempts), budget)) as phase:
        for group in attempts[:budget]:
            phase.advance()
            group = [n for n in group if plan.is_fp32(n)]
            if not group:
                continue
            trial = PrecisionPlan({k: v for k, v in plan.fp32_nodes.items() if k not in group})
            report = search.check(model, trial)
            if clean(report):
                plan.fp32_nodes = trial.fp32_nodes
                accepted = report
                released += group
                for s in sites:
                    s.pinned_nodes = [n for n in s.pinned_nodes if n not in group]
        phase.done(f"{len(released)} node(s) released")
    return accepted, released


def clean(report: Fp16Report) -> bool:
    return report.passed and not report.failing_tensors


def needs_work(model: onnx.ModelProto, diag, reference: list[Feed], tolerance: float) -> bool:
    """More pinning is due while an output fails or a site still goes non-finite (a clean
    output can hide an inf that a different input would surface)."""
    if any(math.isinf(s.fp16_rel_error) for s in diag.sites):
        return bool(diag.sites)
    return bool(diag.sites) and not _outputs_ok(model, diag.outputs, reference, tolerance)


def _outputs_ok(model: onnx.ModelProto, got: list[Feed], reference: list[Feed], tolerance: float) -> bool:
    return all(
        compare_output(o.name, [g[o.name] for g in got], [r[o.name] for r in reference], tolerance).ok
        for o in model.graph.output
    )


def site_fix(site: FailureSite, fix: str, nodes: list[str] | None = None) -> SiteFix:
    return SiteFix(site.tensor, site.node, site.op, site.kind, site.fp32_absmax, site.fp16_rel_error,
                   site.back_in_range, fix, nodes or [])


__all__ = ["SCREEN_PIN_ROUNDS", "SiteFix", "clean", "needs_work", "pin_rounds", "shrink", "site_fix", "site_region"]
