"""Float computations that are index arithmetic, not data: kept FP32 (they cost nothing).

T5's relative-position buckets are float math (Cast, Abs, Log, Div, Mul, Min) ending in a Cast to
int64 and a Gather; in FP16 a bucket boundary moves and the Gather picks another row (the mixed
model's error rose to 1e-2). Two kinds of float nodes are found:

- *index-only*: every float output reaches only integer results -- a Cast to an integer or bool
  type, a comparison (Less, Greater, Equal, ...), ArgMax/ArgMin, Shape/Size, NonZero, IsNaN/IsInf,
  or another index-only node. Nothing FP16 reads them, so FP32 adds no Cast at all.
- *shape-derived*: float values computed only from shapes (Shape, Size, Range over them) and
  constants, e.g. ``sqrt(float(d))`` from a Shape; FP16 readers get one Cast of a small tensor.

Float data cast from an integer *input* (uint8 images) is neither: it does not come from a shape.
"""

from __future__ import annotations

import onnx

__all__ = ["index_arithmetic_nodes"]

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_SINK_OPS = {"Less", "Greater", "Equal", "LessOrEqual", "GreaterOrEqual", "ArgMax", "ArgMin", "Shape", "Size",
             "NonZero", "IsNaN", "IsInf"}
_SHAPE_SOURCES = {"Shape", "Size"}
_DOMAINS = ("", "ai.onnx")


def index_arithmetic_nodes(graph: onnx.GraphProto, types: dict[str, int]) -> dict[int, str]:
    """Indices of the nodes of ``graph`` (not its subgraphs) that are index arithmetic, with the
    reason. ``types`` maps tensor names to ``TensorProto`` element types (shape inference)."""
    nodes = list(graph.node)
    keep_data = {o.name for o in graph.output} | _subgraph_reads(nodes)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(i)
    found: dict[int, str] = {}

    def is_float(t: str) -> bool:
        return types.get(t) in _FLOATS

    # Backward: consumers come after producers, so one reverse sweep settles every node.
    for i in range(len(nodes) - 1, -1, -1):
        n = nodes[i]
        outs = [t for t in n.output if t]
        if n.domain not in _DOMAINS or n.op_type == "Constant" or _has_subgraph(n) or not any(map(is_float, outs)):
            continue  # constants are stored in whatever type their readers need
        if all(not is_float(t) or (t not in keep_data and consumers.get(t) and
                                   all(j in found or _is_sink(nodes[j], types) for j in consumers[t]))
               for t in outs):
            found[i] = "index arithmetic: feeds only integer indices, shapes or comparisons"

    # Forward: values derived from shapes only.
    shape_derived: set[str] = set()
    inits = {t.name for t in graph.initializer} | {n.output[0] for n in nodes if n.op_type == "Constant" and n.output}
    for i, n in enumerate(nodes):
        ins = [t for t in n.input if t]
        if n.domain not in _DOMAINS or _has_subgraph(n):
            continue
        if n.op_type in _SHAPE_SOURCES:
            shape_derived.update(n.output)
        elif ins and any(t in shape_derived for t in ins) and all(t in shape_derived or t in inits for t in ins):
            shape_derived.update(t for t in n.output if t)
            if i not in found and any(is_float(t) for t in n.output) and n.op_type != "ConstantOfShape":
                found[i] = "index arithmetic: computed from shapes only"
    return found


def _is_sink(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    """A node that turns floats into integer or boolean results."""
    if node.domain not in _DOMAINS:
        return False
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return to is not None and to not in _FLOATS
    return node.op_type in _SINK_OPS and not any(types.get(t) in _FLOATS for t in node.output if t)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _subgraph_reads(nodes: list[onnx.NodeProto]) -> set[str]:
    """Every name any subgraph (at any depth) reads: such tensors may be data there."""
    names: set[str] = set()
    for n in nodes:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for m in g.node:
                    names.update(m.input)
                names.update(o.name for o in g.output)
                names |= _subgraph_reads(list(g.node))
    return names
