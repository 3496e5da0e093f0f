"""The numbers behind the per-layer plot: one row per float tensor, in topological order.

FP32 |x|max and 99.9th percentile come from the range profile (the one ``--auto`` measured, or
one more FP32 run per sample); the FP16 error per tensor before the fix comes from a diagnosis
run of the input (an emulation with an FP32 shadow, which also names the failure sites), the
error after from one such run of the fixed model. Tensors are matched by name; a tensor a
rewrite removed has no "after" value, one it added has no FP32 range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.io.ort_runner import Feed

logger = logging.getLogger(__name__)


@dataclass
class TensorRow:
    tensor: str
    node: str
    op: str
    absmax: float | None = None
    p999: float | None = None
    error_before: float | None = None  # FP16 vs FP32 relative L2 (inf: non-finite in FP16)
    error_after: float | None = None
    site: str | None = None  # failure kind born here (overflow, cancellation, ...), before the fix
    pinned: bool = False  # its node runs in FP32 after the fix
    rewritten_by: str | None = None  # the pass that rewrote its node


@dataclass
class PlotData:
    rows: list[TensorRow]
    runs: int  # model runs made only for the plot
    fixed: bool  # whether "after" values exist
    notes: list[str] = field(default_factory=list)


def collect_plot_data(
    original: onnx.ModelProto,
    feeds: Sequence[Feed],
    *,
    fixed: onnx.ModelProto | None = None,
    ranges: Sequence | None = None,
    rewritten: Mapping[str, str] | None = None,
    strict_cumsum: bool = False,
    tolerance: float = 1e-2,
) -> PlotData:
    """Rows for ``original`` (``check``) or for ``original`` and its ``fixed`` version (``fix``).
    ``ranges``: TensorRanges already measured on ``feeds``; ``rewritten``: node -> pass name."""
    from onnx_fp16_rewrite.analysis.diagnosis import diagnose
    from onnx_fp16_rewrite.analysis.range_profile import RangeProfile, profile_ranges
    from onnx_fp16_rewrite.emulation.error_attribution import tensor_errors
    from onnx_fp16_rewrite.pipeline.pass_manager import name_nodes

    model = onnx.ModelProto()
    model.CopyFrom(original)
    name_nodes(model)  # the names the fixer and the plan use
    runs = 0
    if ranges is None:
        profile = profile_ranges(model, feeds)
        runs += profile.runs
    else:
        profile = RangeProfile({r.tensor: r for r in ranges}, runs=0)
    diag = diagnose(model, feeds, profile, PrecisionPlan.from_model(model), tolerance=tolerance,
                    strict_cumsum=strict_cumsum)
    runs += len(feeds)
    sites = {s.tensor: s.kind for s in diag.sites}
    rows = []
    for e in diag.errors:
        r = profile.ranges.get(e.tensor)
        rows.append(TensorRow(e.tensor, e.node, e.op, absmax=r.absmax if r else _finite_or_none(e.fp32_absmax),
                              p999=r.p999 if r else None, error_before=e.rel_error, site=sites.get(e.tensor),
                              pinned=fixed is None and not e.fp16))
    notes = []
    if fixed is not None:
        after, _ = tensor_errors(fixed, feeds, PrecisionPlan.from_model(fixed), strict_cumsum=strict_cumsum)
        runs += len(feeds)
        by_tensor = {e.tensor: e for e in after}
        missing = 0
        for row in rows:
            e = by_tensor.get(row.tensor)
            if e is None:
                missing += 1
                continue
            row.error_after = e.rel_error
            # Stored in FP32 after the fix: pinned by the plan (weak) or typed FLOAT (mixed model).
            row.pinned = not e.fp16
        if missing:
            notes.append(f"{missing} tensors of the input are gone after the fix (rewritten away): no 'after' value")
    for row in rows:
        row.rewritten_by = (rewritten or {}).get(row.node)
    return PlotData(rows, runs=runs, fixed=fixed is not None, notes=notes)


def rewritten_nodes(records: Sequence) -> dict[str, str]:
    """Node of the input -> pass, for every node a kept pass changed, removed or rewrote at."""
    found: dict[str, str] = {}
    for rec in records:
        if rec.status != "kept" or getattr(rec, "changes", None) is None:
            continue
        for name in list(rec.changes.changed) + list(rec.changes.removed):
            found.setdefault(name, rec.name)
        for site in rec.rewritten:
            if site.node not in ("", "-") and not site.detail.startswith("pinned to FP32"):
                found.setdefault(site.node, rec.name)
    return found


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
