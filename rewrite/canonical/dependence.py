"""Which values a graph computes from its inputs' *shapes* alone (after folding: from dynamic dims).

A tensor is ``data`` when it depends on a graph input's values, ``shape`` when it depends only
on shapes (through Shape/Size) and constants, ``const`` otherwise. What ``fold_dynamic`` leaves
as ``shape`` is arithmetic on dynamic dims: the part specialisation folds and restoration puts back.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

__all__ = ["shape_dependent"]

_FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def shape_dependent(model: onnx.ModelProto, types: dict[str, int] | None = None) -> tuple[list[str], list[str]]:
    """(names of main-graph nodes whose outputs are ``shape`` values, names of ``shape`` float
    tensors read by ``data`` nodes: values such as a ``ones_like`` count image or a ``sqrt(d)``
    scale that rewrites can only reason about once they are literals)."""
    g = model.graph
    kind: dict[str, str] = {i.name: "const" for i in g.initializer}
    for vi in g.input:
        kind.setdefault(vi.name, "data")
    nodes: list[str] = []
    shape_tensors: set[str] = set()
    readers: dict[str, list[str]] = {}
    for node in g.node:
        ins = [kind.get(i, "data") for i in node.input if i]
        has_subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
            k = "const" if ins and ins[0] == "const" else "shape"
        elif has_subgraph or "data" in ins:
            k = "data"
        elif "shape" in ins:
            k = "shape"
        else:
            k = "const" if ins or node.op_type == "Constant" else "data"  # no-input ops other than Constant: random, etc.
        for o in node.output:
            if o:
                kind[o] = k
                if k == "shape":
                    shape_tensors.add(o)
        if k == "shape":
            nodes.append(node.name)
        for i in node.input:
            readers.setdefault(i, []).append(k)
    types = types or {}
    floats = [t for t in sorted(shape_tensors) if types.get(t) in _FLOAT and "data" in readers.get(t, [])]
    return nodes, floats
