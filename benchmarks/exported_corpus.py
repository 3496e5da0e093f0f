"""Survey of the corpus of library exports: what ``fix --auto --emit fp32`` keeps in FP16, model by model.

For every (model, exporter) of ``onnx_fp16_rewrite.models.exported``:
- before: the FP16 emulation's verdict and worst output rel L2 on the all-FP16 model; the FP16 FLOP fraction the
  tool prints (``analysis.flops``) and an independent count on traced shapes (``models.exported.traced_flops``);
- auto: ``fix_model(auto=True, auto_rewrites=registry.auto_rewrites(), emit="fp32")`` -- the printed and traced
  FP16 FLOP fractions, nodes pinned FP32, rewrites kept, verdict, and the sites still pinned (op, kind, tensor);
- pin: the same without rewrites (what FP32 pinning alone gives).

Run by hand (repository root, in the venv; exports are cached, see ``models.exported.cache``):
    python benchmarks/exported_corpus.py [--only t5-encoder,gpt2-eager] [--exporter torchscript] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback

import numpy as np


def _worst(report) -> tuple[bool, float, int]:
    bad = sum(o.nan + o.inf for o in report.outputs)
    return report.passed, max(float(o.rel_l2) for o in report.outputs), bad


def _run_fix(model, feeds, rewrites) -> dict:
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.models.exported.traced_flops import traced_fp16_fraction

    start = time.perf_counter()
    result = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=rewrites)
    rep, auto = result.report, result.report.auto
    plan = PrecisionPlan.from_model(result.model)
    pinned = {name for name in (n.name for n in result.model.graph.node) if plan.is_fp32(name)}
    passed, rel, bad = _worst(rep.fp16_after)
    sites = [f"{s.op} {s.kind} {s.tensor} ({s.fix}, {len(s.pinned_nodes)} nodes)" for s in auto.sites
             if not s.fix.startswith("pass:")]
    return {
        "printed": rep.fp16_flop_fraction,
        "traced": traced_fp16_fraction(result.model, feeds[0], pinned),
        "pinned": len(pinned),
        "kept": list(auto.passes_kept),
        "tried": {p.name: f"{p.status}: {p.error[:150]}" if p.error else p.status for p in auto.rewrites_tried},
        "passed": passed,
        "rel_l2": rel,
        "nonfinite": bad,
        "sites": sites,
        "seconds": round(time.perf_counter() - start, 1),
    }


def survey(name: str, exporter: str) -> dict:
    from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction
    from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
    from onnx_fp16_rewrite.models import exported
    from onnx_fp16_rewrite.models.exported.traced_flops import traced_fp16_fraction
    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

    model = exported.build(name, exporter)
    feeds = exported.feeds(name, model)
    row: dict = {"model": name, "exporter": exporter, "control": exported.is_control(name),
                 "nodes": len(model.graph.node), "opset": next(o.version for o in model.opset_import if not o.domain)}
    passed, rel, bad = _worst(check_fp16(model, feeds))
    row["before"] = {"passed": passed, "rel_l2": rel, "nonfinite": bad,
                     "printed": fp16_flop_fraction(model, None, feeds),  # on the run's shapes, as check prints it
                     "traced": traced_fp16_fraction(model, feeds[0], set())}
    for key, rewrites in (("auto", auto_rewrites()), ("pin", [])):
        try:
            row[key] = _run_fix(model, feeds, rewrites)
        except Exception as exc:  # a crash is a survey result, not the end of the survey
            row[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            logging.getLogger(__name__).debug("%s", traceback.format_exc())
    return row


def _pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:6.2f}"


def _verdict(r: dict) -> str:
    return "PASS" if r["passed"] else ("NaN " if r["nonfinite"] else "FAIL")


def format_rows(rows: list[dict]) -> str:
    head = (f"{'model':22s} {'exporter':11s} {'ctl':3s} | {'before':6s} {'print%':>6s} {'trace%':>6s} | "
            f"{'auto':4s} {'print%':>6s} {'trace%':>6s} {'pin':>4s} {'rewrites kept':28s} | "
            f"{'pin':4s} {'print%':>6s} {'trace%':>6s} {'pin':>4s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        b = r["before"]
        parts = [f"{r['model']:22s} {r['exporter']:11s} {'yes' if r['control'] else '':3s} | "
                 f"{_verdict(b):6s} {_pct(b['printed'])} {_pct(b['traced'])} |"]
        for key in ("auto", "pin"):
            a = r[key]
            if "error" in a:
                parts.append(f" ERROR {a['error'][:60]} |")
                continue
            kept = ",".join(a["kept"]) if key == "auto" else ""
            parts.append(f" {_verdict(a):4s} {_pct(a['printed'])} {_pct(a['traced'])} {a['pinned']:4d}"
                         + (f" {kept[:28]:28s} |" if key == "auto" else ""))
        lines.append("".join(parts))
    lines.append("")
    lines.append("sites still pinned by auto (op kind tensor):")
    for r in rows:
        a = r["auto"]
        for site in a.get("sites", [])[:4]:
            lines.append(f"  {r['model']}/{r['exporter']}: {site}")
        if "error" in a:
            lines.append(f"  {r['model']}/{r['exporter']}: auto raised {a['error']}")
        not_kept = {k: "valid, fixed no site" if v == "kept" else v for k, v in a.get("tried", {}).items()
                    if k not in a.get("kept", [])}
        if not_kept:
            lines.append(f"  {r['model']}/{r['exporter']}: tried, not kept: "
                         + ", ".join(f"{k} ({v})" for k, v in not_kept.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from onnx_fp16_rewrite.models import exported

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--exporter", choices=exported.EXPORTERS)
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, exporter in exported.NAMES:
        if (only and name not in only) or (args.exporter and exporter != args.exporter):
            continue
        start = time.perf_counter()
        rows.append(survey(name, exporter))
        print(f"# {name}/{exporter}: {time.perf_counter() - start:.0f} s", flush=True)
    print(format_rows(rows))
    for name, exporter, reason in exported.UNSUPPORTED:
        print(f"not exported: {name}/{exporter}: {reason}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
