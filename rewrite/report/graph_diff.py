"""What changed between two versions of a model, node by node.

Nodes are matched by name (the plan, TensorRT layers and every pass key on names, and the
PassManager makes them unique). A node is
- ``added`` / ``removed``: its name exists on one side only;
- ``changed``: same name, but another op, other inputs/outputs or other attributes;
- ``retyped``: an output's element type differs (FLOAT -> FLOAT16 in a mixed-precision model);
- ``pinned`` / ``unpinned``: it entered or left the FP32 precision plan.
Who made a change is read from the annotations the fixer writes (``rewritten by <pass>``) and
from the plan's reasons, so two files are enough for a reviewer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

logger = logging.getLogger(__name__)

_TYPE_NAMES = {v: k for k, v in onnx.TensorProto.DataType.items()}


@dataclass
class NodeChanges:
    """Node names per kind of change; ``retyped`` maps a node to ``tensor: OLD -> NEW`` lines."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    retyped: dict[str, list[str]] = field(default_factory=dict)
    pinned: list[str] = field(default_factory=list)
    unpinned: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.retyped or self.pinned or self.unpinned)

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.removed)} removed, {len(self.changed)} changed, "
                f"{len(self.retyped)} retyped, {len(self.pinned)} pinned, {len(self.unpinned)} unpinned")


@dataclass
class ModelDiff:
    """A diff of two models, grouped by who made each change (a pass, ``emit``, or ``unknown``)."""

    changes: NodeChanges
    by_origin: dict[str, list[str]]  # origin -> node names added, changed or pinned by it
    ops_added: dict[str, int]
    ops_removed: dict[str, int]
    passes: list[str]  # the pass history stored in the fixed model


def node_changes(before: onnx.ModelProto, after: onnx.ModelProto, *, types: bool = True) -> NodeChanges:
    """Node-level changes from ``before`` to ``after`` (``types=False`` skips shape inference)."""
    old = {n.name: n for n in before.graph.node}
    new = {n.name: n for n in after.graph.node}
    ch = NodeChanges()
    ch.added = [n for n in new if n not in old]
    ch.removed = [n for n in old if n not in new]
    ch.changed = [n for n in new if n in old and not _same_node(old[n], new[n])]
    if types:
        t_old, t_new = _output_types(before), _output_types(after)
        for name, node in new.items():
            if name not in old:
                continue
            lines = [f"{o}: {_TYPE_NAMES.get(t_old[o], t_old[o])} -> {_TYPE_NAMES.get(t_new[o], t_new[o])}"
                     for o in node.output if o in t_old and o in t_new and t_old[o] != t_new[o]]
            if lines:
                ch.retyped[name] = lines
    p_old, p_new = PrecisionPlan.from_model(before), PrecisionPlan.from_model(after)
    ch.pinned = [n for n in p_new.fp32_nodes if n not in p_old.fp32_nodes and n in new]
    ch.unpinned = [n for n in p_old.fp32_nodes if n not in p_new.fp32_nodes and n in old]
    return ch


def diff_models(original: onnx.ModelProto, fixed: onnx.ModelProto) -> ModelDiff:
    """The full diff, with each change attributed from the fixed model's annotations."""
    from onnx_fp16_rewrite.pipeline.pass_manager import HISTORY_KEY

    ch = node_changes(original, fixed)
    nodes = {n.name: n for n in fixed.graph.node}
    plan = PrecisionPlan.from_model(fixed)
    by_origin: dict[str, list[str]] = {}
    touched = list(dict.fromkeys(ch.added + ch.changed + list(ch.retyped) + ch.pinned))
    for name in touched:
        origin = _origin(nodes[name].doc_string, plan.fp32_nodes.get(name))
        by_origin.setdefault(origin, []).append(name)
    history = next((p.value for p in fixed.metadata_props if p.key == HISTORY_KEY), "")
    old_ops = _op_counts(original)
    new_ops = _op_counts(fixed)
    return ModelDiff(
        changes=ch,
        by_origin=by_origin,
        ops_added={k: new_ops[k] - old_ops.get(k, 0) for k in sorted(new_ops) if new_ops[k] > old_ops.get(k, 0)},
        ops_removed={k: old_ops[k] - new_ops.get(k, 0) for k in sorted(old_ops) if old_ops[k] > new_ops.get(k, 0)},
        passes=[p for p in history.split(",") if p],
    )


def render_diff(diff: ModelDiff, *, limit: int = 20) -> str:
    ch = diff.changes
    lines = [f"diff: {ch.summary()}"]
    if diff.passes:
        lines.append(f"  passes applied: {', '.join(diff.passes)}")
    if diff.ops_added:
        lines.append("  ops added: " + ", ".join(f"{k} x{v}" for k, v in diff.ops_added.items()))
    if diff.ops_removed:
        lines.append("  ops removed: " + ", ".join(f"{k} x{v}" for k, v in diff.ops_removed.items()))
    for origin, names in diff.by_origin.items():
        lines.append(f"  {origin}: {len(names)} nodes")
        for name in names[:limit]:
            lines.append(f"    {_mark(ch, name)} {name}")
        if len(names) > limit:
            lines.append(f"    ... {len(names) - limit} more")
    if ch.removed:
        lines.append(f"  removed: {len(ch.removed)} nodes")
        for name in ch.removed[:limit]:
            lines.append(f"    - {name}")
        if len(ch.removed) > limit:
            lines.append(f"    ... {len(ch.removed) - limit} more")
    return "\n".join(lines)


def _mark(ch: NodeChanges, name: str) -> str:
    if name in ch.added:
        return "+"
    if name in ch.pinned and name not in ch.changed:
        return "F"  # pinned to FP32
    if name in ch.retyped and name not in ch.changed:
        return "T"
    return "~"


def _origin(doc: str, plan_reason: str | None) -> str:
    """``pass <name>`` from an annotation, ``emit`` for emission's casts, else what the plan says."""
    for line in doc.splitlines():
        if line.startswith("rewritten by "):
            return "pass " + line[len("rewritten by "):].split(":", 1)[0].strip()
        if line.startswith("added by "):
            return line[len("added by "):].split(":", 1)[0].strip()
        if line.startswith("FP32 (pinned by "):
            return "pinned by " + line[len("FP32 (pinned by "):].split(")", 1)[0].strip()
        if line.startswith("FP16 (emit-mixed)"):
            return "emit-mixed (retyped to FP16)"
        if line.startswith("FP32 (emit-mixed)"):
            return "emit-mixed (kept FP32)"
    if plan_reason is not None:
        return "pinned (auto)" if plan_reason.startswith("auto:") else "pinned"
    return "unattributed"


def _same_node(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    return (a.op_type == b.op_type and a.domain == b.domain and list(a.input) == list(b.input)
            and list(a.output) == list(b.output)
            and [x.SerializeToString() for x in a.attribute] == [x.SerializeToString() for x in b.attribute])


def _output_types(model: onnx.ModelProto) -> dict[str, int]:
    from onnx_fp16_rewrite.io.ort_runner import infer_types

    try:
        types, _ = infer_types(model)
        return types
    except Exception as exc:  # a model shape inference cannot type: compare what is declared
        logger.info("diff: shape inference failed (%s); comparing declared types only", exc)
        g = model.graph
        return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output) + list(g.value_info)}


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
