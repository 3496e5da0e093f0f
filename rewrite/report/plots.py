"""The per-layer plot (matplotlib, the optional ``[report]`` extra): PNG bytes for the HTML page.

Top panel: FP32 |x|max and 99.9th percentile per tensor (topological order) on a log axis, with
FP16's largest value (65504) and smallest normal (2^-14 = 6.1e-5). Bottom panel: FP16 relative
error per tensor before and after the fix; a non-finite error is drawn at the top edge as an x.
Both panels: failure sites as red bands, FP32 tensors after the fix (pinned regions) shaded
blue, rewritten nodes as green triangles.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.report.plot_data import PlotData
from onnx_fp16_rewrite.fp16_limits import FP16_MAX, FP16_MIN_NORMAL

DPI = 100
HEIGHT_IN = 7.0
SITE_RGB = (214, 39, 40)  # the failure-site bands (tests look for this colour)
PINNED_RGB = (31, 119, 180)
REWRITE_RGB = (44, 160, 44)
_ERROR_CAP = 1e3  # non-finite errors are drawn here


@dataclass
class Plot:
    png: bytes
    width: int
    height: int
    # Each failure site's band in image pixels (x0, y0, x1, y1 from the top left), for an image map
    # whose areas name the tensor on hover (no script needed).
    site_boxes: list[tuple[str, str, tuple[int, int, int, int]]] = field(default_factory=list)


def require_matplotlib() -> None:
    """A one-line error (exit 2) before any work when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInputError("--html needs matplotlib: pip install 'onnx-fp16-rewrite[report]'") from None


def width_inches(n: int) -> float:
    return max(10.0, min(36.0, 4.0 + 0.06 * n))


def draw_plot(data: PlotData, title: str) -> Plot:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display, no window
    from matplotlib.figure import Figure

    rows = data.rows
    n = len(rows)
    # Constrained layout makes room for the legends outside the axes; the image keeps figsize x DPI.
    fig = Figure(figsize=(width_inches(n), HEIGHT_IN), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    xs = list(range(n))
    for ax in (top, bottom):
        _shade(ax, [i for i, r in enumerate(rows) if r.pinned], _rgb(PINNED_RGB), 0.18)
        _shade(ax, [i for i, r in enumerate(rows) if r.site], _rgb(SITE_RGB), 0.55)
    absmax = [_pos(r.absmax) for r in rows]
    p999 = [_pos(r.p999) for r in rows]
    top.plot(xs, absmax, ".-", color="black", lw=0.8, ms=3, label="FP32 |x|max")
    top.plot(xs, p999, ".", color="gray", ms=3, label="FP32 |x| 99.9th percentile")
    top.axhline(FP16_MAX, color=_rgb(SITE_RGB), ls="--", lw=1, label="FP16 max 65504")
    top.axhline(FP16_MIN_NORMAL, color="purple", ls=":", lw=1, label="FP16 smallest normal 6.1e-5")
    rewritten = [i for i, r in enumerate(rows) if r.rewritten_by]
    if rewritten:
        ys = [absmax[i] if math.isfinite(absmax[i]) else FP16_MAX for i in rewritten]
        top.scatter(rewritten, ys, marker="v", s=60, color=_rgb(REWRITE_RGB), zorder=5,
                    label="rewritten by a pass")
    top.set_yscale("log")
    top.set_ylabel("|x| (FP32)")
    top.set_title(title, fontsize=11)
    _errors(bottom, xs, [r.error_before for r in rows], "FP16 error before" if data.fixed else "FP16 error",
            "#d62728", "x")
    if data.fixed:
        _errors(bottom, xs, [r.error_after for r in rows], "FP16 error after the fix", "#1f77b4", "+")
    bottom.set_yscale("log")
    bottom.set_ylim(1e-6, _ERROR_CAP * 3)
    bottom.set_ylabel("FP16 rel. L2 error")
    fp32 = "FP32 after the fix" if data.fixed else "FP32 (plan or type)"
    bottom.set_xlabel(f"float tensors in topological order ({n}); red: failure sites, blue: {fp32}")
    for i, r in enumerate(rows):
        if r.site:
            top.annotate(f"{r.site} at {r.op}", (i, 0.03), xycoords=("data", "axes fraction"), xytext=(4, 0),
                         textcoords="offset points", fontsize=8, color=_rgb(SITE_RGB), rotation=90, va="bottom")
    _legend(top, bottom, f"{fp32} (pinned)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    width, height = (int(round(v)) for v in fig.get_size_inches() * DPI)
    return Plot(buf.getvalue(), width, height, _site_boxes(rows, top, bottom, height))


def _site_boxes(rows, top, bottom, height: int) -> list:
    """Bands of the sites in image pixels, from the layout the PNG was saved with (display
    coordinates count y from the bottom; an image map counts from the top)."""
    y0 = int(round(height - top.get_window_extent().y1))
    y1 = int(round(height - bottom.get_window_extent().y0))
    boxes = []
    for i, r in enumerate(rows):
        if not r.site:
            continue
        left, right = (top.transData.transform((x, 1.0))[0] for x in (i - 0.5, i + 0.5))
        mid, half = (left + right) / 2, max((right - left) / 2, 3.0)
        boxes.append((r.tensor, f"{r.site} at {r.op} {r.node} -> {r.tensor}",
                      (int(mid - half), y0, int(round(mid + half)), y1)))
    return boxes


def _errors(ax, xs, values, label, color, marker) -> None:
    finite = [(x, v) for x, v in zip(xs, values) if v is not None and math.isfinite(v)]
    bad = [x for x, v in zip(xs, values) if v is not None and not math.isfinite(v)]
    if finite:
        ax.plot([x for x, _ in finite], [max(v, 1e-6) for _, v in finite], marker, color=color, ms=4, label=label)
    if bad:
        ax.plot(bad, [_ERROR_CAP] * len(bad), marker, color=color, ms=7, mew=2,
                label=f"{label}: non-finite ({len(bad)})")


def _shade(ax, positions: list[int], color, alpha: float) -> None:
    """One band per run of consecutive positions (a region reads as one block)."""
    for start, end in _runs(positions):
        ax.axvspan(start - 0.5, end + 0.5, color=color, alpha=alpha, lw=0)


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in sorted(positions):
        if runs and p == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def _legend(top, bottom, fp32_label: str) -> None:
    from matplotlib.patches import Patch

    extra = [Patch(color=_rgb(SITE_RGB), alpha=0.55, label="failure site"),
             Patch(color=_rgb(PINNED_RGB), alpha=0.18, label=fp32_label)]
    top.legend(handles=top.get_legend_handles_labels()[0] + extra, loc="upper left", bbox_to_anchor=(1.005, 1),
               fontsize=8)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8)


def _pos(v: float | None) -> float:
    """Log axes: a missing, zero or non-finite value is a gap (NaN)."""
    return v if v is not None and math.isfinite(v) and v > 0 else math.nan


def _rgb(c: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(x / 255 for x in c)
