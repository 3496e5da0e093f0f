"""Small onnx-graphsurgeon helpers shared by the rewrite passes: constant lookup and node emission."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

__all__ = ["Emitter", "carry_pins", "cumsum_attrs", "const_value", "single_consumer"]

logger = logging.getLogger(__name__)


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor: an initializer, or the output of a ``Constant`` node."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        value = t.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
            if key in t.inputs[0].attrs:
                return np.asarray(t.inputs[0].attrs[key], dtype=dtype)
        for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
            if key in t.inputs[0].attrs:
                return np.asarray(list(t.inputs[0].attrs[key]), dtype=dtype)
    return None


def cumsum_attrs(node: gs.Node) -> tuple[int | None, int, int]:
    """(axis or None when it is computed at run time, exclusive, reverse) of a CumSum node."""
    axis = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    a = int(axis.reshape(-1)[0]) if axis is not None and axis.size == 1 else None
    return a, int(node.attrs.get("exclusive", 0)), int(node.attrs.get("reverse", 0))


def single_consumer(t: gs.Tensor, graph_outputs: Sequence[gs.Tensor]) -> gs.Node | None:
    """The only node reading ``t``, or None (several readers, none, or ``t`` is a graph output)."""
    if len(t.outputs) != 1 or any(t is o for o in graph_outputs):
        return None
    return t.outputs[0]


def carry_pins(plan: PrecisionPlan, replaced: Sequence[str], new_nodes: Sequence[gs.Node]) -> list[str]:
    """When nodes the plan pins to FP32 are replaced, pin their replacements instead (an earlier
    pass or the user wanted FP32 there) and drop the stale names; returns the replaced pinned names."""
    pinned = [name for name in replaced if plan.is_fp32(name)]
    for name in pinned:
        del plan.fp32_nodes[name]
    for node in new_nodes if pinned else ():
        plan.pin(node.name, f"replaces {pinned[0]}, which was pinned to FP32")
    return pinned


class Emitter:
    """Adds nodes to ``graph`` with unique names under ``prefix`` (e.g. the rewritten node's name),
    so reports and TensorRT layer names say where each new node came from."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.nodes: list[gs.Node] = []
        self._taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        self._count = 0

    def fresh_name(self, base: str) -> str:
        """A name no tensor or node of the graph has, under the prefix."""
        while True:
            self._count += 1
            name = f"{self.prefix}/{base}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def const(self, value: np.ndarray | float | int | Sequence[int], dtype: type = np.float32) -> gs.Constant:
        return gs.Constant(self.fresh_name("const"), np.asarray(value, dtype=dtype))

    def ints(self, values: Sequence[int] | int) -> gs.Constant:
        return self.const(values, np.int64)

    def op(self, op: str, inputs: Sequence[gs.Tensor], attrs: dict | None = None, *,
           out: gs.Variable | None = None, dtype: type = np.float32) -> gs.Variable:
        """One node; returns its output (``out`` when given: the node then produces that existing
        tensor, whose old producer must have been detached)."""
        name = self.fresh_name(op)
        if out is None:
            out = gs.Variable(name + "_output_0", dtype=dtype)
        node = gs.Node(op, name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=[out])
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return out
