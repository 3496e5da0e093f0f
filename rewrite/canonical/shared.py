"""Shared constants and unique tensor names, for rewrites that replace a constant.

A dynamo export lets two ``Where`` mask fills read one ``-3.4e38`` constant. A rewrite that
replaces the fill for one consumer must not change it for the other, and must not give two new
tensors one name (graphsurgeon then warns "Found distinct tensors that share the same name" and
the saved model holds only one of them). ``unshare_constant`` gives one consumer its own copy
under a fresh name; ``fresh_tensor_name`` picks names no tensor or node of the graph has.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.pipeline.graph_edit import const_value

__all__ = ["fresh_tensor_name", "unshare_constant"]


def fresh_tensor_name(graph: gs.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2`` ...: the first name no tensor or node of ``graph`` uses."""
    taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def unshare_constant(graph: gs.Graph, tensor: gs.Tensor, consumer: gs.Node) -> gs.Constant:
    """The constant ``consumer`` reads as ``tensor``, made its own: when other nodes (or the graph
    outputs) read ``tensor`` too, ``consumer`` gets a copy under a fresh name and the others keep
    the original. ``tensor`` may be an initializer or the output of a ``Constant`` node.
    Raises ValueError when ``tensor`` is not a constant or ``consumer`` does not read it."""
    if not any(t is tensor for t in consumer.inputs):
        raise ValueError(f"{consumer.name!r} does not read {tensor.name!r}")
    value = const_value(tensor, fold=False)
    if value is None:
        raise ValueError(f"{tensor.name!r} is not a constant")
    readers = [n for n in tensor.outputs if n is not consumer]
    is_output = any(t is tensor for t in graph.outputs)
    if isinstance(tensor, gs.Constant) and not readers and not is_output:
        return tensor
    copy = gs.Constant(fresh_tensor_name(graph, f"{tensor.name}/{consumer.name}"), np.array(value, copy=True))
    for i, t in enumerate(consumer.inputs):  # item assignment keeps graphsurgeon's links in sync
        if t is tensor:
            consumer.inputs[i] = copy
    return copy

