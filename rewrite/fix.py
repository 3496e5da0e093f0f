"""The whole job as one call: run passes, emit the model for a build mode, prove it in FP16.

``fix_model`` is what the CLI's ``fix`` runs and what export scripts call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import onnx

from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction
from onnx_fp16_rewrite.canonical import CanonReport, canonicalize, restore_dynamic
from onnx_fp16_rewrite.canonical import confirm as confirm_canonical, unconfirmed
from onnx_fp16_rewrite.emulation.fp16_emulation import Fp16Report, check_fp16
from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.io.sessions import graph_key
from onnx_fp16_rewrite.pipeline.pass_base import Pass
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager, RunReport
from onnx_fp16_rewrite.emit.mixed_ort_run import MixedOrtRun, MixedRunError
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emit.trtexec import format_command, store_validated_shapes, trtexec_command
from onnx_fp16_rewrite.pipeline.validate import Tolerance
from onnx_fp16_rewrite.progress import NULL_PROGRESS, Progress
from onnx_fp16_rewrite.tensorrt.trt_backend import profile_shapes

logger = logging.getLogger(__name__)

Emit = Literal["fp32", "mixed"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_ROLLED_BACK = 3
EXIT_FP16_FAILS = 4
EXIT_NOT_VERIFIED = 6  # TensorRT built the engine but could not run it here (e.g. TensorRT-RTX on an H200)
# Failing tensors a report lists (their count is always given); the terminal shows the first few.
MAX_FINDINGS = 1000


@dataclass
class FixReport:
    emit: str
    keep_io_types: bool
    passes: RunReport
    fp16_before: Fp16Report
    fp16_after: Fp16Report
    mixed: object | None
    mixed_ort_error: list[MixedRunError]
    trtexec: str
    trtexec_argv: list[str]
    warnings: list[str]
    auto: object | None = None
    fp16_flop_fraction: float | None = None
    trt_after: Fp16Report | None = None  # --verify trt: the fixed model built and run by TensorRT
    canonical: CanonReport | None = None  # what canonicalisation did (folds, no-op Casts, specialisation)

    @property
    def exit_code(self) -> int:
        if not self.fp16_after.passed:
            return EXIT_FP16_FAILS
        if self.trt_after is not None and self.trt_after.not_verified:
            return EXIT_NOT_VERIFIED
        if self.trt_after is not None and not self.trt_after.passed:
            return EXIT_FP16_FAILS
        if self.passes.rolled_back:
            return EXIT_ROLLED_BACK
        return EXIT_OK

    def to_dict(self) -> dict:
        data = asdict(self)
        data["exit_code"] = self.exit_code
        return data


@dataclass
class FixResult:
    model: onnx.ModelProto
    report: FixReport


def fix_model(
    model: onnx.ModelProto,
    passes: Sequence[Pass],
    feeds: Sequence[Feed],
    *,
    emit: Emit = "fp32",
    keep_io_types: bool = False,
    strict_cumsum: bool = False,
    tolerance: Tolerance = Tolerance(),
    per_output: Mapping[str, Tolerance] | None = None,
    rel_l2_tolerance: float = 1e-2,
    model_path: str = "model.onnx",
    auto: bool = False,
    auto_rewrites: Sequence[Pass] | None = None,
    verify: Literal["emulation", "trt"] = "emulation",
    canonical: bool = True,
    progress: Progress = NULL_PROGRESS,
) -> FixResult:
    """Run ``passes`` (each validated in FP32 and rolled back on failure), then emit the model
    for ``emit`` and check it with the FP16 emulation against the original's FP32 outputs.

    With ``auto``, the automatic fixer runs after ``passes``: it finds the failure sites, tries
    ``auto_rewrites`` first (default: the registry's automatic rewrites, as CLI ``fix`` does; ``()``
    for pinning only) and pins minimal FP32 regions for the rest.
    ``progress`` reports each long phase (``onnx_fp16_rewrite.progress``; the CLI renders it on a terminal).
    ``model_path`` is only used to write the trtexec command line.
    ``verify="trt"`` also builds and runs the fixed model with TensorRT (``onnx_fp16_rewrite.tensorrt.trt_backend``);
    a missing TensorRT fails here, before any pass runs."""
    trt_library = None
    if verify == "trt":
        from onnx_fp16_rewrite.tensorrt.trt_backend import require_tensorrt

        trt_library = require_tensorrt()

    # Canonical form first (onnx_fp16_rewrite.canonical): folded shape arithmetic, no no-op Casts;
    # the passes, the analysis and the FP32 reference all work on it.
    given = model
    # Weights shared before anything copies the model (io.weights.share): canonicalisation copies
    # it several times (T5 from TorchScript, 124 MB: 0.25-0.8 s -> 0.11-0.15 s).
    source = weights.share(given)
    canon_report = None
    first_run = auto and not passes
    model, canon_report, first, ran = _canonical_and_first(source, feeds, canonical, first_run, tolerance,
                                                           strict_cumsum, rel_l2_tolerance, progress,
                                                           confirm_later=first_run)
    # The canonical form validates on the first diagnosis' FP32 outputs (its shadow's: the same
    # ORT kernels as a validation run); if it is not the original's equal, or did not run:
    # canonicalise again, each step validated.
    if canon_report is not None and not (ran and confirm_canonical(
            canon_report, model, first.profile.outputs if first is not None else None)):
        weights.release(model, source)
        model, canon_report, first, _ = _canonical_and_first(source, feeds, canonical, first_run, tolerance,
                                                             strict_cumsum, rel_l2_tolerance, progress,
                                                             confirm_later=False)
    shared = model
    profile = first.profile if first is not None else None
    with progress.phase("passes" if passes else "FP32 reference", total=None) as phase:
        manager = PassManager(passes, feeds, tolerance=tolerance, per_output=per_output,
                              reference=profile.outputs if profile is not None else None)
        fixed, run_report = manager.run(model)
        phase.done(", ".join(f"{p.name} {p.status}" for p in run_report.passes)
                   or ("from the profiling runs" if profile is not None else f"{len(feeds)} run(s)"))
    assert manager.validator is not None
    reference = manager.validator.reference
    fp16_before = None
    if profile is None:
        with progress.phase("FP16 check of the original", total=None) as phase:
            fp16_before = check_fp16(
                model, feeds, reference, strict_cumsum=strict_cumsum, rel_l2_tolerance=rel_l2_tolerance,
                max_findings=MAX_FINDINGS,
            )
            phase.done(_verdict(fp16_before))
    auto_report = None
    if auto:
        from onnx_fp16_rewrite.analysis.auto_fix import auto_fix
        from onnx_fp16_rewrite.pipeline.registry import auto_rewrites as registry_rewrites

        rewrites = registry_rewrites() if auto_rewrites is None else auto_rewrites
        # auto_fix reports its own phases (diagnosis, each rewrite tried, shrinking) inside this one.
        with progress.phase("automatic fix", total=None) as phase:
            fixed, auto_report = auto_fix(fixed, feeds, tolerance=rel_l2_tolerance, strict_cumsum=strict_cumsum,
                                          rewrites=rewrites, first=first, progress=progress)
            phase.done(f"{len(auto_report.sites)} site(s), kept {', '.join(auto_report.passes_kept) or 'no rewrite'}, "
                       f"{auto_report.fp32_nodes} FP32 node(s)")
        if fp16_before is None:
            fp16_before = auto_report.before
    searched = graph_key(fixed) if auto_report is not None and auto_report.after is not None else None
    searched_model = fixed
    if canon_report is not None:  # the emitted model gets the input's dynamic dims back, or says why not
        fixed = restore_dynamic(fixed, canon_report, tolerance=tolerance)
    plan = PrecisionPlan.from_model(fixed)
    mixed_report, mixed_run = None, None
    before_emit = fixed
    if emit == "mixed":
        from onnx_fp16_rewrite.emit.mixed_precision import to_mixed_precision

        fixed, mixed_report = to_mixed_precision(fixed, plan, keep_io_types=keep_io_types)
        # On a thread of its own while the verification, annotation and FLOP count go on.
        mixed_run = MixedOrtRun(fixed, feeds, reference)
    # The shapes that were validated, so trtexec does not build dynamic dims as 1.
    shapes = profile_shapes(fixed, feeds)
    store_validated_shapes(fixed, shapes)  # `onnx-rewrite trtexec fixed.onnx` prints them too
    argv = trtexec_command(model_path, plan, mode="strong" if emit == "mixed" else "weak", shapes=shapes)
    warnings = _build_warnings(fixed, plan)
    with progress.phase(f"FP16 verification ({emit})", total=None) as phase:
        fp16_after = None
        # first_given: the search's verdicts compared with this very reference (the first diagnosis'
        # outputs); after --pass, the search compared with the passes' model's own FP32 outputs.
        reusable = searched is not None and auto_report.first_given
        if emit == "fp32" and reusable and searched == graph_key(fixed):
            # The fixer's verdict ran this very graph and plan on every sample.
            fp16_after = auto_report.after
        elif emit == "mixed" and reusable:
            fp16_after = _proved_mixed_verdict(searched_model, fixed, plan, feeds, auto_report, strict_cumsum)
        if fp16_after is None:
            # A screen first (one sum a tensor); the full statistics only if it shows a failure.
            fp16_after = check_fp16(
                fixed, feeds, reference, plan=plan, strict_cumsum=strict_cumsum, rel_l2_tolerance=rel_l2_tolerance,
                max_findings=MAX_FINDINGS, screen=True,
            )
        phase.done(_verdict(fp16_after))
    _annotate(fixed, before_emit, run_report, auto_report, mixed_report)
    flop_fraction = fp16_flop_fraction(fixed, plan, feeds)
    report = FixReport(
        emit=emit,
        keep_io_types=keep_io_types,
        passes=run_report,
        fp16_before=fp16_before,
        fp16_after=fp16_after,
        mixed=mixed_report,
        mixed_ort_error=mixed_run.result() if mixed_run is not None else [],
        trtexec=format_command(argv),
        trtexec_argv=argv,
        warnings=warnings,
        auto=auto_report,
        fp16_flop_fraction=flop_fraction,
        canonical=canon_report,
    )
    if trt_library is not None:
        with progress.phase("TensorRT verification", total=None) as phase:
            _verify_trt(report, fixed, feeds, reference, plan, trt_library, rel_l2_tolerance)
            phase.done(_verdict(report.trt_after))
    fixed = weights.unshare(fixed)
    weights.release(shared, source)  # the result holds its weights again: the shared buffers can go
    weights.release(source, given)
    return FixResult(fixed, report)


def _canonical_and_first(given, feeds, canonical, first_run, tolerance, strict_cumsum, rel_l2_tolerance, progress,
                         *, confirm_later):
    """The canonical form (shared weights), for ``fix --auto`` alone the fixer's first diagnosis
    of it (one emulation run with an FP32 shadow per sample: the ranges, the FP32 reference and
    the "before" check), and whether that diagnosis ran (False: an unconfirmed canonical form
    did not). ``confirm_later``: the canonical form's FP32 validation waits for the diagnosis'
    FP32 outputs (``canonical.confirm``) instead of running it again."""
    model, canon_report = given, None
    if canonical:
        with progress.phase("canonicalisation", total=None) as phase:
            model, canon_report = canonicalize(given, feeds, tolerance=tolerance, confirm_later=confirm_later)
            phase.done(canon_report.summary())
    # Weights shared, each held once however often the analysis copies the model (io.weights.share);
    # the result gets them back into its proto (unshare, at the return).
    model = weights.share(model)
    first = None
    if first_run:
        try:
            first = _first_diagnosis(model, feeds, strict_cumsum, rel_l2_tolerance, progress)
        except Exception:  # an unvalidated canonical form may not even run: canonicalise again
            if canon_report is None or not unconfirmed(canon_report):
                raise
            return model, canon_report, None, False
    return model, canon_report, first, True


def _first_diagnosis(model: onnx.ModelProto, feeds: Sequence[Feed], strict_cumsum: bool, tolerance: float,
                     progress: Progress):
    """The fixer's first diagnosis of ``model`` (its profile's outputs: the FP32 reference),
    when its node names are final (the plan and the profile are keyed by them); else None and
    the fixer diagnoses."""
    from onnx_fp16_rewrite.analysis.auto_fix import first_diagnosis

    names = [n.name for n in model.graph.node]
    if not all(names) or len(set(names)) != len(names):
        return None
    return first_diagnosis(model, feeds, tolerance=tolerance, strict_cumsum=strict_cumsum, progress=progress)


def _proved_mixed_verdict(searched: onnx.ModelProto, mixed: onnx.ModelProto, plan: PrecisionPlan,
                          feeds: Sequence[Feed], auto_report, strict_cumsum: bool) -> Fp16Report | None:
    """The mixed model's verification without a run, where value numbering proves the fixer's
    final (weak) verdict run computed it (emulation.same_values); else None. A diagnosis' clean
    verdict says every stored tensor is finite only where no FP32 value is non-finite (it passes
    FP16 non-finiteness where FP32 has it too; the profile flags those only from the first run on)."""
    from onnx_fp16_rewrite.emulation.same_values import reused_verdict

    run = auto_report.verdict_run
    if run == "diagnosis" and any(r.fp32_nonfinite for r in auto_report.ranges):
        return None
    return reused_verdict(searched, mixed, plan, feeds, auto_report.after, verdict_run=run,
                          strict_cumsum=strict_cumsum)


def _verdict(report: Fp16Report) -> str:
    nan = sum(o.nan for o in report.outputs)
    inf = sum(o.inf for o in report.outputs)
    worst = max((o.rel_l2 for o in report.outputs), default=0.0)
    return f"{'PASS' if report.passed else 'FAIL'} ({nan} NaN, {inf} Inf, worst rel L2 {worst:.3g})"


def _verify_trt(report: FixReport, fixed: onnx.ModelProto, feeds: Sequence[Feed], reference: Sequence[Feed],
                plan: PrecisionPlan, library, rel_l2_tolerance: float) -> None:
    """--verify trt: the TensorRT verdict on the fixed model, and the pitfalls of this TensorRT version
    (TensorRT-RTX: all of them, since its CumSum import is not tied to a TensorRT version)."""
    from onnx_fp16_rewrite.tensorrt.trt_backend import check_trt
    from onnx_fp16_rewrite.tensorrt.trt_pitfalls import find_pitfalls

    report.trt_after = check_trt(fixed, feeds, reference, plan=plan, rel_l2_tolerance=rel_l2_tolerance,
                                 library=library)
    pitfalls = find_pitfalls(fixed, plan, trt_version=None if library.is_rtx else library.parsed_version)
    report.warnings = [p.message for p in pitfalls]


def _annotate(fixed: onnx.ModelProto, before_emit: onnx.ModelProto, run_report: RunReport, auto_report,
              mixed_report) -> None:
    """Netron-readable doc_strings on every node a pass rewrote or the plan pins, and the tool's
    version in the metadata (onnx_fp16_rewrite.report.annotate)."""
    from onnx_fp16_rewrite.report.annotate import annotate_model, emission_notes

    records = list(run_report.passes)
    absmax = None
    if auto_report is not None:
        records += [r for r in auto_report.rewrites_tried if r.name in auto_report.passes_kept]
        absmax = {r.tensor: r.absmax for r in auto_report.ranges}
    emitted = emission_notes(before_emit, fixed, mixed_report) if mixed_report is not None else None
    annotate_model(fixed, records, absmax=absmax, emitted=emitted)


def _build_warnings(model: onnx.ModelProto, plan: PrecisionPlan) -> list[str]:
    """Known TensorRT pitfalls of the emitted model (all versions; --verify trt narrows them)."""
    from onnx_fp16_rewrite.tensorrt.trt_pitfalls import find_pitfalls

    return [p.message for p in find_pitfalls(model, plan)]
