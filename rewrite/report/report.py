"""Reports as data first (JSON), text second (what the CLI prints)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from onnx_fp16_rewrite.emulation.fp16_emulation import Fp16Report
from onnx_fp16_rewrite.pipeline.pass_manager import RunReport

TERMINAL_FAILURES = 5  # failing tensors the terminal lists (the JSON report lists them all)


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically, readable like any other output (0644 under umask 022); non-finite
    floats become null, flagged in the object's ``nonfinite`` map (``json_report.finite``)."""
    from onnx_fp16_rewrite.report.json_report import finite

    write_text(json.dumps(finite(data), indent=2, allow_nan=False) + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Atomic write: a temporary file beside the target, then a rename, so a reader never sees
    half a file. mkstemp creates files 0600; the umask decides the mode instead, as for open()."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def render_fp16(report: Fp16Report, title: str) -> str:
    verdict = "NOT VERIFIED" if getattr(report, "not_verified", None) else ("PASS" if report.passed else "FAIL")
    lines = [
        f"{title}: {verdict}  (mode {report.mode}, {report.fp16_nodes} FP16 / {report.fp32_nodes} FP32 nodes"
        f"{', strict FP16 CumSum' if report.strict_cumsum else ''}, {report.seconds:.2f} s)",
        f"  {'output':<24} {'NaN':>8} {'Inf':>8} {'max abs err':>12} {'rel L2':>10}",
    ]
    for o in report.outputs:
        lines.append(f"  {o.name:<24} {o.nan:>8} {o.inf:>8} {o.max_abs_error:>12.4g} {o.rel_l2:>10.3g}")
    if report.first_failures:
        lines.append(f"  first of {report.failing_tensors} failing tensors (topological order):")
        for f in report.first_failures[:TERMINAL_FAILURES]:
            lines.append(f"    {f.kind:<10} {f.op:<10} {f.node}  ->  {f.tensor}  (absmax {f.absmax:.4g})")
    for note in report.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def render_passes(report: RunReport) -> str:
    lines = []
    for p in report.passes:
        lines.append(f"pass {p.name}: {p.status} ({len(p.rewritten)} rewritten, {len(p.skipped)} skipped, {p.seconds:.2f} s)")
        for s in p.rewritten[:20]:
            lines.append(f"  + {s.op:<10} {s.node}: {s.detail}")
        if len(p.rewritten) > 20:
            lines.append(f"  + ... {len(p.rewritten) - 20} more (see --report)")
        for s in p.skipped[:10]:
            lines.append(f"  - {s.op:<10} {s.node}: {s.detail}")
        if p.error:
            lines.append(f"  ! {p.error}")
        elif p.validation is not None:
            worst = max((o.max_abs_error for o in p.validation.outputs), default=0.0)
            against = {o.judged_against for o in p.validation.outputs}
            lines.append(f"  FP32 validation: ok, max abs error {worst:.3g} (vs {'/'.join(sorted(against))} reference)")
    return "\n".join(lines)


def render_auto(report) -> str:
    """The per-site table of ``fix --auto`` (an AutoFixReport)."""
    lines = [
        f"auto: {len(report.sites)} failure sites, {report.fp32_nodes} FP32 nodes, "
        f"{report.profiling_runs} FP32 profiling + {report.emulation_runs} emulation "
        f"+ {report.validation_runs} validation runs",
        f"  {'kind':<13} {'op':<10} {'FP32 absmax':>12} {'FP16 rel err':>12}  {'fix':<22} site -> back in range",
    ]
    for s in report.sites:
        fix = s.fix if s.fix != "fp32-region" else f"fp32 region ({len(s.pinned_nodes)} nodes)"
        lines.append(f"  {s.kind:<13} {s.op:<10} {s.fp32_absmax:>12.4g} {s.fp16_rel_error:>12.3g}  {fix:<22} "
                     f"{s.node} -> {s.back_in_range or '-'}")
    for rec in report.rewrites_tried:
        verdict = rec.status if rec.status != "kept" else (
            "kept" if rec.name in report.passes_kept else "valid in FP32, fixed no site")
        lines.append(f"  tried {rec.name}: {verdict}" + (f" ({rec.error})" if rec.error else ""))
    if report.released_by_shrink:
        lines.append(f"  released by shrinking: {', '.join(report.released_by_shrink)}")
    return "\n".join(lines)
