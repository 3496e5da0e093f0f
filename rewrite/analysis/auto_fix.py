"""``fix --auto``: find the FP16 failure sites and give each the smallest fix that holds.

Each fact is computed once (issue 11):
1. Profile FP32 ranges: one run per sample; its graph outputs are the FP32 reference (the
   validator of every rewrite reuses them instead of running the model again).
2. Diagnose: one emulation run per search sample with an FP32 shadow (three reductions a tensor)
   names the sites where FP16 error is born (overflow, cancellation, underflow, precision). This
   first diagnosis is also the "before" check report.
3. Rewrites first (when given): each candidate pass is applied through the PassManager (FP32
   validated, rolled back on failure) and kept when it removes sites without adding any; its
   diagnosis re-measures ranges only where the rewrite changed how tensors are computed. A pass
   that judges its sites on cut-outs (rescale-accumulation) has them judged inside that
   diagnosis run (``_Speculation``, analysis.embedded_judges), not in FP32 runs of their own.
   A rewrite is refused without a diagnosis where every site is computed exactly as before, or
   where it keeps every other value (declared) and left every site's node and inputs as they were.
4. Pin what is left: each site gets a region grown from it on measured ranges (forward until
   values are back in range, back to where inputs are safe), then the emulation verifies; a site
   that still fails grows further.
5. Shrink greedily: region nodes whose values would fit FP16 are released where the emulation
   stays clean (a bounded number of runs).
6. Verdict: the last accepted run when the search saw every sample; else one emulation run on
   all samples (cached sessions: the last accepted graph), and a failure there sends the pinning
   on with every sample. The search uses the first ``SEARCH_SAMPLES`` samples; each sample past
   them costs one profiling and one verdict run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from onnx_fp16_rewrite.analysis.diagnosis import Diagnosis, FailureSite, diagnose
from onnx_fp16_rewrite.emulation.fp16_emulation import Fp16Report, check_fp16
from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.io.sessions import graph_key
from onnx_fp16_rewrite.pipeline.pass_base import Pass
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.analysis.range_profile import RangeProfile
from onnx_fp16_rewrite.analysis.pinning import SiteFix, clean, needs_work, pin_rounds, shrink, site_fix
from onnx_fp16_rewrite.analysis.regions import GraphIndex
from onnx_fp16_rewrite.analysis.signatures import emulated_alike, rewritten_at, value_signatures
from onnx_fp16_rewrite.progress import NULL_PROGRESS, Progress

logger = logging.getLogger(__name__)

# The search diagnoses and pins on this many samples; more samples cost one profiling run and one
# verdict run each (benchmarks/auto_fix_cost.py --samples states it).
SEARCH_SAMPLES = 4
MAX_FINDINGS = 1000  # failing tensors a report lists (as fix.MAX_FINDINGS)


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
    # The first diagnosis as a check report (the "before" of fix: no separate run), and the final
    # verdict under the returned plan on every sample (fix --emit fp32 reports it as its "after").
    before: Fp16Report | None = None
    after: Fp16Report | None = None
    search_samples: int = 0  # samples the search ran on (the first ones); the verdict used all
    # What ran ``after``: "screen" (check_fp16 screen: one sum per stored tensor) or "diagnosis".
    verdict_run: str = ""
    # The caller's first diagnosis was used: its profile's outputs are the reference every verdict compared with.
    first_given: bool = False


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
    search_samples: int = SEARCH_SAMPLES,
    profile: RangeProfile | None = None,
    first: Diagnosis | None = None,
    progress: Progress = NULL_PROGRESS,
) -> tuple[onnx.ModelProto, AutoFixReport]:
    """Returns the model with its precision plan (and any kept rewrites) and the report.

    ``first``: the first diagnosis of ``model`` when the caller already has it (``fix_model``
    does: ``first_diagnosis``, whose profile's outputs are its FP32 reference); ``profile``: only
    the FP32 range profile. The search diagnoses, validates and pins on the first
    ``search_samples`` feeds; ranges come from all of them, and the verdict is an emulation run
    on all of them (a failure there sends the search on with every sample)."""
    from onnx_fp16_rewrite.pipeline.pass_manager import PassManager, name_nodes

    from onnx_fp16_rewrite.canonical import canonicalize, restore_dynamic

    model = _copy(model)
    # The canonical form (a no-op on a model fix_model already canonicalised): literals for the rewrites.
    model, canon = canonicalize(model, feeds)
    renamed = name_nodes(model)
    k = max(1, min(search_samples, len(feeds)))
    if renamed or not canon.skipped:
        profile = first = None
    given = first is not None
    if first is None:
        if profile is None:
            first = first_diagnosis(model, feeds, search_samples=k, tolerance=tolerance, exit_absmax=exit_absmax,
                                    strict_cumsum=strict_cumsum, progress=progress)
            profile = first.profile
    elif profile is None:
        profile = first.profile
    measured = profile
    profile_runs = profile.runs
    reference = profile.outputs
    search = _Search(list(feeds[:k]), reference[:k], tolerance, exit_absmax, strict_cumsum, progress)
    search.subset = k < len(feeds)
    with progress.phase("FP16 check of the original", total=None) as phase:
        # The first diagnosis is the check of the original: its emulation run gives both.
        diag = first if first is not None else search.diagnose(model, profile, None, None)
        search.emulation += k * (first is not None)
        before = diag.fp16_report(search.reference, tolerance, strict_cumsum=strict_cumsum,
                                  max_findings=MAX_FINDINGS)
        if k < len(feeds):
            before.notes.append(f"on the first {k} of {len(feeds)} samples (the search's subset)")
        phase.done(f"{_verdict(before)}; {len(diag.sites)} failure site(s)")
    sites: list[SiteFix] = []
    kept: list[str] = []
    tried = []
    current_ref = search.reference
    for rewrite in rewrites:
        if not diag.sites:
            break
        with progress.phase(f"rewrite {rewrite.name}", total=None) as phase:
            # The pass reads the ranges already measured, and the validator the FP32 outputs
            # already known, instead of running the model again.
            # The candidate's diagnosis runs first: its FP32 shadow's outputs are what the FP32
            # validation compares (no validation run of its own).
            diagnosed: list[Diagnosis] = []
            speculation = _Speculation(search.feeds)

            def shadow_outputs(cand, record, diag=diag):
                if speculation.same(cand):  # what the trusting run rewrote: its diagnosis is this one's
                    diagnosed.append(speculation.diagnosis)
                else:
                    diagnosed.append(search.diagnose(cand, profile, None, None, refresh_profile=True, previous=diag,
                                                     changed=record.values_changed, judges=speculation.take()))
                return diagnosed[-1].reference

            def refuse(cand, record, diag=diag):
                # Every site computed exactly as before (upstream of all the rewrite changed) fails
                # again in the candidate's diagnosis: nothing fixed, so no diagnosis to pay for.
                tensors = {s.tensor for s in diag.sites}
                if diag.model is None:
                    return None
                after = value_signatures(cand)  # both tests read it (it hashes every weight)
                if emulated_alike(diag.model, cand, sorted(tensors), diag.signatures(), after) >= tensors:
                    return "no failure site depends on what it changed"
                # A rewrite that keeps every other value (exactly: values_changed; up to rounding:
                # rounding_only) fixes the sites it rewrites or feeds. Where it leaves every site's node and
                # inputs as they were, only the rounding error reaching them changes (real NAFNet:
                # box-filter after rescale-accumulation, 6 LayerNorm cancellations left: a 9 s diagnosis).
                # A scaling pass that declares neither may move ranges downstream: it is diagnosed.
                if (record.values_changed is not None or record.rounding_only) and not rewritten_at(
                        diag.model, cand, sorted(tensors), diag.signatures(), record.values_changed, after):
                    return "it rewrote no failure site's node or inputs (only the rounding reaching them changes)"
                return None

            def run_pass():
                manager = PassManager([rewrite], search.feeds, initial_absmax=profile.absmax(), reference=current_ref,
                                      outputs_of=shadow_outputs, refuse=refuse, judge=speculation.judge)
                candidate, report = manager.run(model)
                return manager, candidate, report.passes[0]

            manager, candidate, record = run_pass()
            if speculation.trusting:
                # Its sites were rewritten on trust and judged in the candidate's diagnosis: the
                # pass runs again with those judgements (or, without them, judging as usual).
                judged = diagnosed[-1].judged if record.status == "kept" and diagnosed else None
                speculation.settle(judged, candidate, diagnosed[-1] if judged is not None else None)
                diagnosed.clear()
                first_seconds = record.seconds
                manager, candidate, record = run_pass()
                record.seconds = round(first_seconds + record.seconds, 3)
            tried.append(record)
            if record.status != "kept":
                phase.done(record.status)
                continue
            cand_diag = diagnosed[-1]
            fixed = [s for s in diag.sites if not _still_failing(s, cand_diag.sites)]
            # Also kept: a rewrite after which nothing needs pinning (outputs pass, no non-finite site), even where
            # a finite site is left or newly named (a Log whose scaled input now crosses 1 shows a large relative
            # error that the Add after it undoes: log-mel front ends).
            done = not needs_work(candidate, cand_diag, search.reference, tolerance)
            if fixed and (len(cand_diag.sites) < len(diag.sites) or done):
                sites += [site_fix(s, f"pass:{rewrite.name}") for s in fixed]
                kept.append(rewrite.name)
                model, profile, diag = candidate, cand_diag.profile, cand_diag
                current_ref = manager.validator.last_outputs or current_ref
                phase.done(f"kept: {len(fixed)} site(s) fixed, {len(cand_diag.sites)} left")
            else:
                phase.done(f"not kept: {len(cand_diag.sites)} site(s) after it, {len(diag.sites)} before")
    plan = PrecisionPlan.from_model(model)
    index = GraphIndex(model.graph)
    absmax = profile.absmax()
    diag, rounds, screened = pin_rounds(search, model, index, diag, plan, sites, absmax, max_rounds, 0)
    after, released = None, []
    unresolved = needs_work(model, diag, search.reference, tolerance)
    if not unresolved:
        after, released = shrink(model, plan, sites, absmax, search, max_shrink_runs)
    verdict_run = "screen"
    if after is None:
        # The last diagnosis (or clean screen) ran the emulation under this plan: its verdict needs no further run.
        verdict_run = "screen" if screened else "diagnosis"
        after = screened or diag.fp16_report(search.reference, tolerance, strict_cumsum=strict_cumsum,
                                             max_findings=MAX_FINDINGS)
    if k < len(feeds):
        after, verdict_run = search.verdict(model, plan, feeds, reference), "screen"
        if not clean(after) and not unresolved:
            # A sample the search did not see fails: search on with all of them.
            search = _Search(list(feeds), reference, tolerance, exit_absmax, strict_cumsum, progress, search)
            diag = search.diagnose(model, profile, plan, "diagnosis (all samples)")
            diag, rounds, _ = pin_rounds(search, model, index, diag, plan, sites, absmax, max_rounds, rounds)
            unresolved = needs_work(model, diag, reference, tolerance)
            after = diag.fp16_report(reference, tolerance, strict_cumsum=strict_cumsum, max_findings=MAX_FINDINGS)
            verdict_run = "diagnosis"
    if unresolved:
        sites += [site_fix(site, "unfixed") for site in diag.sites]
    passed = all(o.ok for o in after.outputs)
    plan.store_in(model)
    report = AutoFixReport(
        sites=sites, passes_kept=kept, rewrites_tried=tried, fp32_nodes=len(plan), released_by_shrink=released,
        profiling_runs=profile_runs, emulation_runs=search.emulation, validation_runs=search.validation,
        rounds=rounds, passed=passed, ranges=list(measured.ranges.values()), before=before, after=after,
        search_samples=k, verdict_run=verdict_run, first_given=given,
    )
    logger.info("auto: %d sites, %d FP32 nodes, %d profiling + %d emulation runs",
                len(sites), len(plan), report.profiling_runs, report.emulation_runs)
    if not canon.skipped:
        model = restore_dynamic(model, canon)
        report.canonical = canon
    return model, report


def first_diagnosis(model: onnx.ModelProto, feeds: Sequence[Feed], *, search_samples: int = SEARCH_SAMPLES,
                    tolerance: float = 1e-2, exit_absmax: float = 2048.0, strict_cumsum: bool = False,
                    progress: Progress = NULL_PROGRESS) -> Diagnosis:
    """The fixer's first diagnosis of ``model``, which also profiles its FP32 ranges and gives
    its FP32 reference (``.profile``, ``.profile.outputs``): one emulation run with an FP32 shadow
    per search sample, a plain profiling run for each further sample."""
    k = max(1, min(search_samples, len(feeds)))
    with progress.phase("profiling ranges", total=len(feeds)) as phase:
        diag = diagnose(model, list(feeds[:k]), None, None, tolerance=tolerance, exit_absmax=exit_absmax,
                        strict_cumsum=strict_cumsum, profile_feeds=list(feeds[k:]), on_run=phase.advance)
        phase.done(f"{len(feeds)} FP32 run(s) ({k} beside the FP16 emulation), {len(diag.profile.ranges)} tensors, "
                   f"{len(diag.sites)} failure site(s)")
    return diag


class _Speculation:
    """fix --auto's cut-out judge for one rewrite (``PassContext.judge``).

    A pass that judges its sites on cut-outs (rescale-accumulation) first gets every site passed
    on trust, so it rewrites all of them, and the cut-outs go into the candidate's diagnosis run
    (``embedded_judges``: fed from its FP32 twin, which the exact rewrite leaves bit for bit at
    their entries and exits) instead of an FP32 run of their own (NAFNet-9: a plain inference).
    ``settle`` hands the judgements that run made to the pass's second run; when that run rewrites
    the same graph (every site passed, the usual case), the diagnosis already made is its
    candidate's. Where the cut-outs cannot be embedded, the trusting candidate is not kept, or
    its judgement is unknown, the pass judges as without fix --auto (``judge_with_l1``)."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self.feeds = feeds
        self.trusting = False  # the first run passed its sites on trust
        self.settled = False
        self.judged = None  # (scores, l1) the diagnosis gave; None once settled: judge as usual
        self.diagnosis: Diagnosis | None = None
        self._pending = None  # EmbeddedJudges for the next diagnosis
        self._trusted: str | None = None  # the digest of the graph the trusting run rewrote

    def judge(self, model, cutouts, l1_below):
        from onnx_fp16_rewrite.analysis.cutout_judge import judge_with_l1
        from onnx_fp16_rewrite.analysis.embedded_judges import EmbeddedJudges

        if self.settled:
            keys = {c.key for c in cutouts}
            if self.judged is not None and set(self.judged[0]) == keys and set(self.judged[1]) == set(l1_below):
                return self.judged
            return judge_with_l1(model, cutouts, self.feeds, l1_below)
        try:
            self._pending = EmbeddedJudges(model, cutouts, l1_below)
        except Exception as exc:  # e.g. a site that cannot be extracted: judged on its own, with its reason
            logger.debug("cut-outs judged on their own: %s", exc)
            self.settled = True
            return judge_with_l1(model, cutouts, self.feeds, l1_below)
        self.trusting = True
        return {c.key: (math.nan, 0.0) for c in cutouts}, {key: (1.0, 0.0) for key in l1_below}

    def take(self):
        pending, self._pending = self._pending, None
        return pending

    def settle(self, judged, candidate: onnx.ModelProto, diagnosis: Diagnosis | None) -> None:
        self.settled, self.judged, self.diagnosis = True, judged, diagnosis
        self._pending = None
        self._trusted = graph_key(candidate) if judged is not None else None

    def same(self, candidate: onnx.ModelProto) -> bool:
        return self._trusted is not None and graph_key(candidate) == self._trusted


class _Search:
    """The samples the search runs on, and the model runs it costs (the report states them)."""

    def __init__(self, feeds, reference, tolerance, exit_absmax, strict_cumsum, progress, counts=None) -> None:
        self.feeds, self.reference = feeds, reference
        self.tolerance, self.exit_absmax, self.strict_cumsum = tolerance, exit_absmax, strict_cumsum
        self.progress = progress
        self.subset = False  # set when the verdict runs on more samples than the search
        self.emulation = counts.emulation if counts else 0
        self.validation = counts.validation if counts else 0

    def diagnose(self, model, profile, plan, phase_name, refresh_profile=False, previous=None, changed=None,
                 judges=None):
        self.emulation += len(self.feeds)
        with (self.progress if phase_name else NULL_PROGRESS).phase(phase_name or "", total=None) as phase:
            diag = diagnose(model, self.feeds, profile, plan, tolerance=self.tolerance, exit_absmax=self.exit_absmax,
                            strict_cumsum=self.strict_cumsum, refresh_profile=refresh_profile, previous=previous,
                            changed=changed, judges=judges)
            phase.done(f"{len(diag.sites)} failure site(s)")
        return diag

    def check(self, model, plan) -> Fp16Report:
        self.emulation += len(self.feeds)
        # Cached when a verdict on more samples follows: the last release kept is its graph.
        # A screen: a release is kept only when clean, and a clean screen is a clean check.
        return check_fp16(model, self.feeds, self.reference, plan=plan, strict_cumsum=self.strict_cumsum,
                          rel_l2_tolerance=self.tolerance, max_findings=MAX_FINDINGS, cache=self.subset,
                          screen=True, exact_findings=False)

    def verdict(self, model, plan, feeds, reference) -> Fp16Report:
        with self.progress.phase("verdict on all samples", total=None) as phase:
            self.emulation += len(feeds)
            report = check_fp16(model, feeds, reference, plan=plan, strict_cumsum=self.strict_cumsum,
                                rel_l2_tolerance=self.tolerance, max_findings=MAX_FINDINGS, cache=True, screen=True)
            phase.done("passed" if report.passed else "FAILED")
        return report


def _verdict(report: Fp16Report) -> str:
    nan, inf = sum(o.nan for o in report.outputs), sum(o.inf for o in report.outputs)
    worst = max((o.rel_l2 for o in report.outputs), default=0.0)
    return f"{'PASS' if report.passed else 'FAIL'} ({nan} NaN, {inf} Inf, worst rel L2 {worst:.3g})"


def _still_failing(site: FailureSite, sites: list[FailureSite]) -> bool:
    return any(s.tensor == site.tensor or s.node == site.node for s in sites)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


__all__ = ["AutoFixReport", "RangeProfile", "SiteFix", "auto_fix"]
