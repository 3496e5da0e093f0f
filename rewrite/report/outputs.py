"""The report files of ``check`` and ``fix`` (``--report`` JSON, ``--html`` page).

The JSON document is built once; the HTML page is rendered from it plus the plot. The plot needs
per-tensor data that the command itself did not keep (FP16 error of every tensor), so ``--html``
costs extra model runs: one FP32 profiling run per sample (none after ``--auto``, which measured
them), one emulation run per sample for the input and one for the fixed model. The page says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.report.json_report import check_document, fix_document, finite

logger = logging.getLogger(__name__)


@dataclass
class ReportTexts:
    """The report files' contents; the CLI writes them (atomically, after the model)."""

    document: dict
    json: str | None = None
    html: str | None = None


def json_text(doc: dict) -> str:
    return json.dumps(finite(doc), indent=2, allow_nan=False) + "\n"


def check_reports(report, model: onnx.ModelProto, feeds: Sequence[Feed], *, argv: Sequence[str],
                  model_path: str | None, demo: str | None, exit_code: int, backend: str,
                  pitfalls: Sequence = (), want_json: bool = False, want_html: bool = False,
                  strict_cumsum: bool = False, tolerance: float = 1e-2) -> ReportTexts:
    from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.emit.trtexec import format_command, trtexec_command
    from onnx_fp16_rewrite.tensorrt.trt_backend import has_fp16_tensors

    plan = PrecisionPlan.from_model(model)
    try:
        argv_trt = trtexec_command(model_path or "model.onnx", plan,
                                   mode="strong" if has_fp16_tensors(model) else "weak")
        trtexec = [format_command(argv_trt)]
    except Exception as exc:  # a name trtexec cannot carry: the report says why instead
        trtexec = [f"# no trtexec line: {exc}"]
    doc = check_document(report, argv=argv, model_path=model_path, demo=demo, exit_code=exit_code,
                         backend=backend, trtexec=trtexec, pitfalls=pitfalls,
                         fp16_flop_fraction=fp16_flop_fraction(model, plan, feeds))
    texts = ReportTexts(doc, json=json_text(doc) if want_json else None)
    if want_html:
        from onnx_fp16_rewrite.report.plot_data import collect_plot_data

        data = collect_plot_data(model, feeds, strict_cumsum=strict_cumsum, tolerance=tolerance)
        notes = list(data.notes) + [f"The plot cost {data.runs} extra model runs (FP32 profiling and an "
                                    "FP16 emulation with an FP32 shadow)."]
        if backend != "emulation":
            notes.append("The verdicts are TensorRT's; the per-tensor plot comes from the CPU FP16 emulation.")
        texts.html = _html(doc, data, notes, title="check: FP32 ranges and FP16 error per tensor")
    return texts


def fix_reports(result, original: onnx.ModelProto, feeds: Sequence[Feed], *, argv: Sequence[str],
                model_path: str | None, demo: str | None, output_path: str, want_json: bool = False,
                want_html: bool = False, strict_cumsum: bool = False, tolerance: float = 1e-2) -> ReportTexts:
    from onnx_fp16_rewrite.report.graph_diff import diff_models

    rep = result.report
    diff = diff_models(original, result.model)
    doc = fix_document(rep, argv=argv, model_path=model_path, demo=demo, output_path=output_path, diff=diff)
    texts = ReportTexts(doc, json=json_text(doc) if want_json else None)
    if want_html:
        from onnx_fp16_rewrite.report.plot_data import collect_plot_data, rewritten_nodes

        records = list(rep.passes.passes)
        ranges = None
        if rep.auto is not None:
            records += [r for r in rep.auto.rewrites_tried if r.name in rep.auto.passes_kept]
            ranges = rep.auto.ranges
        data = collect_plot_data(original, feeds, fixed=result.model, ranges=ranges,
                                 rewritten=rewritten_nodes(records), strict_cumsum=strict_cumsum, tolerance=tolerance)
        notes = list(data.notes) + [f"The plot cost {data.runs} extra model runs"
                                    + (" (ranges from --auto's profiling run)." if ranges is not None else ".")]
        texts.html = _html(doc, data, notes, title="fix: FP32 ranges and FP16 error per tensor, before and after")
    return texts


def _html(doc: dict, data, notes: list[str], *, title: str) -> str:
    from onnx_fp16_rewrite.report.html import render_html
    from onnx_fp16_rewrite.report.plots import draw_plot

    plot = draw_plot(data, title) if data.rows else None
    return render_html(doc, plot, notes)
