"""The HTML report: one self-contained file (plot embedded as a base64 PNG, inline CSS, no
script, no network), rendered from the same document as the JSON report."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1500px;
padding:0 1em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.88em;margin:.4em 0}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap;word-break:break-all;font-size:.85em}
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}
.plot{overflow-x:auto;border:1px solid #ddd}.note{color:#555;font-size:.9em}
code{font-size:.9em}
"""
EXIT_MEANING = {0: "fixed and verified", 2: "bad input", 3: "a pass was rolled back",
                4: "FP16 still fails", 5: "TensorRT missing"}
_MAX_ROWS = 200


def render_html(doc: dict, plot=None, notes: Sequence[str] = ()) -> str:
    """The page for a report document (``json_report``); ``plot``: a ``plots.Plot`` or None."""
    cmd = doc["command"]
    name = doc["input"]["path"] or f"--demo {doc['input']['demo']}"
    verdict_ok = doc["exit_code"] == 0
    meaning = EXIT_MEANING.get(doc["exit_code"], "failed") if cmd == "fix" else ("FP16 passes" if verdict_ok
                                                                                   else "FP16 fails")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request: the page loads nothing
        f"<title>onnx-rewrite {_e(cmd)}: {_e(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>onnx-rewrite {_e(cmd)}: {_e(name)}</h1>",
        f'<p>Exit code {doc["exit_code"]}: <span class="{"ok" if verdict_ok else "bad"}">{_e(meaning)}</span></p>',
        _section("Command", _command(doc)),
        _section("Verdicts per output", _verdicts(doc["verdicts"]) + _flops(doc["flops"])),
        _section("Per-layer ranges and FP16 error", _plot(plot, notes)),
    ]
    details = doc["details"]
    if cmd == "fix" and details.get("auto"):
        parts.append(_section("Failure sites (fix --auto)", _sites(details["auto"])))
    parts.append(_section("Failing tensors", _failing(doc["failing_tensors"]), anchor="failing-tensors"))
    if cmd == "fix":
        parts.append(_section("Passes tried", _passes(details)))
        if doc.get("diff"):
            parts.append(_section("What changed (diff of input and output)", _diff(doc["diff"])))
    if doc["trtexec"]:
        parts.append(_section("Build with trtexec", "".join(f"<pre>{_e(t)}</pre>" for t in doc["trtexec"])))
    if doc["warnings"]:
        parts.append(_section("Warnings", _list(doc["warnings"])))
    parts.append(_section("Versions", _table(["library", "version"],
                                             [[k, v or "not installed"] for k, v in doc["versions"].items()])))
    parts.append("</body></html>")
    return "\n".join(parts)


def _command(doc: dict) -> str:
    inp = doc["input"]
    rows = [["command line", f"<code>{_e(doc['command_line'])}</code>"]]
    if inp["path"]:
        rows += [["input", _e(inp["path"])], ["input sha256", f"<code>{_e(inp['sha256'])}</code>"]]
    else:
        rows.append(["input", f"built-in demo {_e(inp['demo'])}"])
    if doc.get("output"):
        rows.append(["output", f"{_e(doc['output']['path'])} (--emit {_e(doc['output']['emit'])})"])
    rows.append(["tool", f"{_e(doc['tool']['name'])} {_e(doc['tool']['version'])}"])
    return _table(["", ""], rows, escape=False)


def _verdicts(verdicts: list[dict]) -> str:
    rows = []
    for v in verdicts:
        ok = '<span class="ok">ok</span>' if v["ok"] else '<span class="bad">FAIL</span>'
        rows.append([_e(v["stage"]), _e(v["backend"]), _e(v["output"]), ok, _num(v["nan"]), _num(v["inf"]),
                     _num(v["max_abs_error"], v, "max_abs_error"), _num(v["rel_l2"], v, "rel_l2"), _num(v["rel_l2_tolerance"])])
    return _table(["stage", "backend", "output", "verdict", "NaN", "Inf", "max abs err", "rel L2", "tolerance"],
                  rows, escape=False)  # every text cell above is escaped already


def _flops(flops: dict) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    return (f'<p>FP16 FLOP fraction (estimated FLOPs in FP16 nodes): before {pct(flops["fp16_fraction_before"])}, '
            f'after {pct(flops["fp16_fraction_after"])}</p>')


def _plot(plot, notes: Sequence[str]) -> str:
    if plot is None:
        return '<p class="note">No plot (no range data).</p>'
    data = base64.b64encode(plot.png).decode("ascii")
    areas = "".join(f'<area shape="rect" coords="{",".join(map(str, box))}" title="{_e(label)}" alt="{_e(label)}" '
                    f'data-tensor="{_e(tensor)}" href="#failing-tensors">' for tensor, label, box in plot.site_boxes)
    img = (f'<div class="plot"><img id="layer-plot" src="data:image/png;base64,{data}" width="{plot.width}" '
           f'height="{plot.height}" usemap="#sites" alt="FP32 |x|max and FP16 error per tensor">'
           f'<map name="sites">{areas}</map></div>')
    caption = ('<p class="note">Top: FP32 |x|max (black) and 99.9th percentile (gray) per float tensor, against '
               "FP16's largest value 65504 (dashed) and smallest normal 6.1e-5 (dotted). Bottom: FP16 relative "
               "L2 error per tensor (x: before, +: after the fix; at 1e3: non-finite). Red bands: failure sites; "
               "blue: tensors stored in FP32 after the fix; green triangles: nodes a pass rewrote.</p>")
    return img + caption + _list(notes)


def _sites(auto: dict) -> str:
    rows = []
    for s in auto["sites"]:
        fix = s["fix"] if s["fix"] != "fp32-region" else f"FP32 region ({len(s['pinned_nodes'])} nodes)"
        rows.append([s["kind"], s["op"], _num(s["fp32_absmax"], s, "fp32_absmax"),
                     _num(s["fp16_rel_error"], s, "fp16_rel_error"), fix, s["node"], s["back_in_range"] or "-"])
    tried = [[r["name"], r["status"] if r["status"] != "kept" or r["name"] in auto["passes_kept"]
              else "valid in FP32, fixed no site", r.get("error") or ""] for r in auto["rewrites_tried"]]
    runs = (f'<p>{auto["fp32_nodes"]} FP32 nodes; {auto["profiling_runs"]} profiling + {auto["emulation_runs"]} '
            f'emulation + {auto["validation_runs"]} validation runs.</p>')
    return (runs + _table(["kind", "op", "FP32 |x|max", "FP16 rel err", "fix", "site", "back in range"],
                          rows)
            + "<h3>Rewrites tried</h3>" + _table(["pass", "outcome", "reason"], tried))


def _failing(stages: list[dict]) -> str:
    out = []
    for st in stages:
        head = (f"<p><b>{_e(st['stage'])}</b>: {st['count']} failing tensors"
                + ("" if st["complete"] else f" ({st['listed']} listed)") + "</p>")
        rows = [[f["kind"], f["op"], f["node"], f["tensor"], _num(f["absmax"], f, "absmax")]
                for f in st["tensors"][:_MAX_ROWS]]
        table = _table(["kind", "op", "node", "tensor", "absmax"], rows) if rows else ""
        if len(st["tensors"]) > _MAX_ROWS:
            table += f'<p class="note">... {len(st["tensors"]) - _MAX_ROWS} more in the JSON report</p>'
        out.append(head + (f"<details><summary>list</summary>{table}</details>" if len(rows) > 10 else table))
    return "".join(out)


def _passes(details: dict) -> str:
    records = list(details["passes"]["passes"])
    if details.get("auto"):
        records += [dict(r, name=f"{r['name']} (tried by --auto)") for r in details["auto"]["rewrites_tried"]]
    if not records:
        return "<p>No pass ran.</p>"
    out = []
    for r in records:
        val = r.get("validation")
        check = "-" if not val else ("FP32 validation ok" if val["ok"] else "FP32 validation failed")
        changes = r.get("changes")
        summary = (f"{len(changes['added'])} added, {len(changes['removed'])} removed, "
                   f"{len(changes['changed'])} changed, {len(changes['pinned'])} pinned") if changes else "-"
        out.append(f"<h3>{_e(r['name'])}: {_e(r['status'])}</h3>"
                   + _table(["rewritten", "skipped", "nodes", "validation", "seconds"],
                            [[len(r["rewritten"]), len(r["skipped"]), summary, check, r["seconds"]]]))
        if r.get("error"):
            out.append(f'<p class="bad">{_e(r["error"])}</p>')
        sites = [["+", s["op"], s["node"], s["detail"]] for s in r["rewritten"][:_MAX_ROWS]]
        sites += [["-", s["op"], s["node"], s["detail"]] for s in r["skipped"][:_MAX_ROWS]]
        if sites:
            out.append("<details><summary>sites (+ rewritten, - skipped with the reason)</summary>"
                       + _table(["", "op", "node", "detail / reason"], sites) + "</details>")
    return "".join(out)


def _diff(diff: dict) -> str:
    rows = [[origin, len(names), ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")]
            for origin, names in diff["by_origin"].items()]
    ops = ", ".join(f"+{v} {k}" for k, v in diff["ops_added"].items())
    ops += (", " if ops and diff["ops_removed"] else "") + ", ".join(f"-{v} {k}" for k, v in diff["ops_removed"].items())
    return (f"<p>{_e(diff['summary'])}. Passes applied: {_e(', '.join(diff['passes']) or 'none')}. "
            f"Ops: {_e(ops or 'no change')}.</p>" + _table(["by", "nodes", "names"], rows)
            + (f"<p>Removed: {_e(', '.join(diff['removed'][:30]))}</p>" if diff["removed"] else "")
            + '<p class="note">The same on the command line: <code>onnx-rewrite diff ORIGINAL FIXED</code>.</p>')


def _section(title: str, body: str, *, anchor: str | None = None) -> str:
    ident = f' id="{anchor}"' if anchor else ""
    return f"<section{ident}><h2>{_e(title)}</h2>{body}</section>"


def _table(head: Sequence[str], rows: Sequence[Sequence], *, escape: bool = True) -> str:
    def cell(c) -> str:
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return f'<td class="num">{c:.4g}</td>' if isinstance(c, float) else f'<td class="num">{c}</td>'
        if isinstance(c, _Num):
            return f'<td class="num">{_e(c)}</td>'
        return f"<td>{_e(c) if escape else c}</td>"

    header = "".join(f"<th>{_e(h)}</th>" for h in head) if any(head) else ""
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table>{'<tr>' + header + '</tr>' if header else ''}{body}</table>"


class _Num(str):
    """A table cell holding a number (right-aligned)."""


def _num(v, obj: dict | None = None, key: str | None = None) -> _Num:
    """A number as text; a null stands for what the object's ``nonfinite`` map says."""
    if v is None:
        return _Num((obj or {}).get("nonfinite", {}).get(key or "", "") or "-")
    return _Num(f"{v:.4g}" if isinstance(v, float) else str(v))


def _list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>" if items else ""


def _e(text) -> str:
    return html.escape(str(text), quote=True)
