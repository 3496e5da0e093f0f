"""Concrete tensor shapes traced from an ONNX Runtime run, where static inference cannot give them.

Every main-graph tensor gets a ``Shape`` node whose (tiny int64) output is added as a graph
output of a copy; one run on a feed then returns the concrete shape of every tensor without
keeping any activation alive past its last reader. Tensors inside If/Loop/Scan bodies are not
traced (their shapes can change per iteration). With ``only``, just the named tensors are traced,
on a copy holding only the nodes they depend on: the shape of a Range over a fed length costs
its few shape-arithmetic producers, not a run of the model.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_fp16_rewrite.io.ort_runner import Feed, infer_types, make_session

__all__ = ["depends_on", "trace_shapes", "feed_signature"]

logger = logging.getLogger(__name__)

_PREFIX = "__canon_trace_shape"


def trace_shapes(model: onnx.ModelProto, feed: Feed, *, only: Collection[str] | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every main-graph tensor (inputs, initializers and node outputs) on ``feed``;
    with ``only``, of those node outputs alone (tensors, not sequences: the caller's inference says)."""
    shapes: dict[str, tuple[int, ...]] = {k: tuple(np.shape(v)) for k, v in feed.items()}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    if only is not None:
        return _trace_only(model, feed, [t for t in dict.fromkeys(only) if t not in shapes])
    try:  # only tensors get a Shape (a Sequence output would make the session fail)
        typed: set[str] | None = set(infer_types(model)[0])
    except Exception:  # no inference: try every output
        typed = None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    taken = {n.name for n in g.node}
    traced: dict[str, str] = {}
    for node in list(g.node):
        for out in node.output:
            if not out or out in shapes or out in traced or (typed is not None and out not in typed):
                continue
            name = f"{_PREFIX}_{len(traced)}"
            while name in taken:
                name += "_"
            traced[out] = name
            g.node.append(helper.make_node("Shape", [out], [name], name=name))
            g.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, [None]))
    if not traced:
        return shapes
    session = make_session(m)
    names = list(traced.values())
    values = session.run(names, dict(feed))
    by_output = dict(zip(names, values))
    for tensor, out in traced.items():
        shapes[tensor] = tuple(int(d) for d in by_output[out])
    return shapes


def depends_on(graph: onnx.GraphProto, targets: Collection[str]) -> list[int]:
    """Indices (in graph order) of the nodes that compute ``targets``: their producers and everything
    those read, subgraph bodies' outer references included."""
    from onnx_fp16_rewrite.emit.graph_scopes import outer_refs, subgraphs

    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    keep: set[int] = set()
    stack = list(targets)
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in keep:
            continue
        keep.add(i)
        node = graph.node[i]
        stack.extend(t for t in (*node.input, *outer_refs(list(subgraphs(node)))) if t)
    return sorted(keep)


def _trace_only(model: onnx.ModelProto, feed: Feed, targets: list[str]) -> dict[str, tuple[int, ...]]:
    from onnx_fp16_rewrite.emit.graph_scopes import outer_refs, subgraphs

    g = model.graph
    producer = {o for n in g.node for o in n.output if o}
    nodes = [g.node[i] for i in depends_on(g, targets)]
    read = {t for n in nodes for t in (*n.input, *outer_refs(list(subgraphs(n))))} | {i.name for i in g.input}
    names = {t: f"{_PREFIX}_{k}" for k, t in enumerate(t for t in targets if t in producer)}
    if not names:
        return {}
    taken = {n.name for n in nodes} | {o for n in nodes for o in n.output} | read
    for t, name in list(names.items()):
        while name in taken:
            name += "_"
        names[t] = name
    # A new graph, not a copy: only the weights those nodes read are carried.
    graph = helper.make_graph(
        [*nodes, *(helper.make_node("Shape", [t], [n], name=n) for t, n in names.items())], g.name, list(g.input),
        [helper.make_tensor_value_info(n, TensorProto.INT64, [None]) for n in names.values()],
        initializer=[i for i in g.initializer if i.name in read])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    values = make_session(m).run(list(names.values()), dict(feed))
    return {t: tuple(int(d) for d in v) for t, v in zip(names, values)}


def feed_signature(feeds: Sequence[Feed]) -> dict[str, tuple[int, ...]] | None:
    """The input shapes shared by all ``feeds``, or None when they differ (a model specialised to
    one shape could not run the others)."""
    if not feeds:
        return None
    first = {k: tuple(np.shape(v)) for k, v in feeds[0].items()}
    for feed in feeds[1:]:
        if {k: tuple(np.shape(v)) for k, v in feed.items()} != first:
            return None
    return first
