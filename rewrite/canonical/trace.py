"""Concrete tensor shapes traced from an ONNX Runtime run, where static inference cannot give them.

Every main-graph tensor gets a ``Shape`` node whose (tiny int64) output is added as a graph
output of a copy; one run on a feed then returns the concrete shape of every tensor without
keeping any activation alive past its last reader. Tensors inside If/Loop/Scan bodies are not
traced (their shapes can change per iteration).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_fp16_rewrite.io.ort_runner import Feed, infer_types, make_session

__all__ = ["trace_shapes", "feed_signature"]

logger = logging.getLogger(__name__)

_PREFIX = "__canon_trace_shape"


def trace_shapes(model: onnx.ModelProto, feed: Feed) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every main-graph tensor (inputs, initializers and node outputs) on ``feed``."""
    shapes: dict[str, tuple[int, ...]] = {k: tuple(np.shape(v)) for k, v in feed.items()}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
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
