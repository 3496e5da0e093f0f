"""Netron-readable annotations: why each node the tool touched is what it is.

Netron shows a node's ``doc_string`` in its side panel, and the model's metadata in the model
panel. After a fix, every node a pass rewrote says ``rewritten by <pass>: <what>``, every node
pinned to FP32 says ``FP32 (pinned by <who>): <why>, |x|max ... > 65504`` (when its range was
measured), and every cast the mixed-precision emitter added says so. One central step reads the
pass records and the plan, so no pass has to write annotations itself. The model's metadata gets
the tool's name and version next to the plan; ``producer_name`` (the exporter) is left alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import onnx

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.fp16_limits import FP16_MAX

TOOL_KEY = "onnx_fp16_rewrite.tool"
# Lines this module writes start with one of these; a re-run replaces them, keeps the rest.
_PREFIXES = ("rewritten by ", "FP32 (pinned by ", "FP32 (", "added by ", "FP16 (")


def tool_info() -> dict[str, str]:
    from onnx_fp16_rewrite.report.provenance import tool_version

    return {"name": "onnx-fp16-rewrite", "version": tool_version()}


def annotate_model(
    model: onnx.ModelProto,
    records: Iterable = (),
    *,
    absmax: Mapping[str, float] | None = None,
    emitted: Mapping[str, str] | None = None,
) -> int:
    """Write the annotations into ``model`` in place; returns how many nodes got one.

    ``records``: the PassRecords of the kept passes, in order (their ``changes`` and sites).
    ``absmax``: FP32 |x|max per tensor, when measured. ``emitted``: node name -> line for what
    the emitter did (added casts, forced FP32 nodes)."""
    absmax = absmax or {}
    notes: dict[str, list[str]] = {}
    pinned_by: dict[str, str] = {}
    for rec in records:
        changes = getattr(rec, "changes", None)
        if rec.status != "kept" or changes is None:
            continue
        for name in list(changes.added) + list(changes.changed):
            notes.setdefault(name, []).append(f"rewritten by {rec.name}: {_site_detail(rec, name)}")
        for name in changes.pinned:
            pinned_by.setdefault(name, rec.name)
    nodes = {n.name: n for n in model.graph.node}
    plan = PrecisionPlan.from_model(model)
    for name, reason in plan.fp32_nodes.items():
        node = nodes.get(name)
        if node is None:
            continue
        who = pinned_by.get(name) or ("auto" if reason.startswith("auto:") else "plan")
        line = f"FP32 (pinned by {who}): {_strip(reason, 'auto: ')}"
        big = max((absmax[t] for t in node.output if t in absmax), default=None)
        if big is not None:
            line += f", |x|max {big:.3g} {'>' if big > FP16_MAX else '<='} 65504"
        notes.setdefault(name, []).append(line)
    for name, line in (emitted or {}).items():
        notes.setdefault(name, []).append(line)
    count = 0
    for name, lines in notes.items():
        node = nodes.get(name)
        if node is None:
            continue
        kept = [ln for ln in node.doc_string.splitlines() if not ln.startswith(_PREFIXES)]
        node.doc_string = "\n".join(list(dict.fromkeys(lines)) + kept)
        count += 1
    store_tool_info(model)
    return count


def store_tool_info(model: onnx.ModelProto) -> None:
    """Name and version of the tool in the model's metadata (replacing an older entry)."""
    kept = [p for p in model.metadata_props if p.key != TOOL_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=TOOL_KEY, value=json.dumps(tool_info(), sort_keys=True))


def emission_notes(before: onnx.ModelProto, after: onnx.ModelProto, mixed_report) -> dict[str, str]:
    """What ``--emit mixed`` did, per node: casts it added, outputs it retyped to FLOAT16, nodes it
    kept FP32 on its own."""
    from onnx_fp16_rewrite.report.graph_diff import node_changes

    ch = node_changes(before, after)
    notes = {name: "added by emit-mixed: cast at an FP16/FP32 boundary" for name in ch.added}
    for name, lines in ch.retyped.items():
        notes[name] = f"FP16 (emit-mixed): {'; '.join(lines)}"
    for name in getattr(mixed_report, "forced_fp32_nodes", []):
        reason = mixed_report.fp32_nodes.get(name, "kept FP32 by the converter")
        notes[name] = f"FP32 (emit-mixed): {_strip(reason, 'converter: ')}"
    return notes


def _site_detail(rec, node: str) -> str:
    """The detail of the site that explains ``node``: the same node, a site whose name the new
    node's name extends, or the pass's only site."""
    sites = [s for s in rec.rewritten if s.node not in ("", "-")]
    for s in sites:
        if s.node == node:
            return s.detail
    if len(rec.rewritten) == 1:
        return rec.rewritten[0].detail
    # Exporters name nodes by scope (/encoders.0/.../sca/sca.0/Pad): the site sharing the
    # longest scope prefix is the one this node was changed for.
    shared = [(len(os.path.commonprefix([node, s.node])), s) for s in sites]
    best = max((n for n, _ in shared), default=0)
    closest = [s for n, s in shared if n == best]
    if best and len(closest) == 1:
        return closest[0].detail
    return f"part of {len(rec.rewritten)} rewritten sites (see the report)"


def _strip(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text
