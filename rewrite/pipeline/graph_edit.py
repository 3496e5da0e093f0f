"""Small onnx-graphsurgeon helpers shared by the rewrite passes: constant lookup and node emission."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

__all__ = ["Emitter", "NameSource", "carry_pins", "cumsum_attrs", "const_value", "single_consumer"]

logger = logging.getLogger(__name__)


def const_value(t: gs.Tensor | None, *, fold: bool = True) -> np.ndarray | None:
    """The value of a constant tensor: an initializer, the output of a ``Constant`` node, or (``fold``) the
    result of a small constant subgraph -- shape arithmetic as exporters write it (Shape of a statically
    shaped tensor, ConstantOfShape, Concat, Reshape, Slice, Transpose, Cast, arithmetic on constants),
    evaluated with onnx.reference. Canonicalisation folds these once; this keeps matchers right before it."""
    if t is None:
        return None
    literal = _literal(t)
    if literal is not None or not fold or isinstance(t, gs.Constant) or not t.inputs:
        return literal
    return _fold(t)


def _literal(t: gs.Tensor) -> np.ndarray | None:
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


# Ops that never fold: their result is not a function of constant inputs, or they hold subgraphs.
_UNFOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceConstruct"}
_FOLD_LIMIT = 48  # nodes: shape arithmetic is small; a bigger cone is not what matchers look for


def _static_shape(x: gs.Tensor) -> list[int] | None:
    shape = x.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _fold(t: gs.Tensor) -> np.ndarray | None:
    """Evaluate the constant cone that produces ``t``, or None when it reads anything computed at run time."""
    order: list[gs.Node] = []                        # producers first
    seen: set[int] = set()
    leaves: dict[str, np.ndarray] = {}

    def visit(x: gs.Tensor) -> bool:
        if x.name in leaves:
            return True
        literal = _literal(x)
        if literal is not None:
            leaves[x.name] = literal
            return True
        if not x.inputs:
            return False                             # a graph input
        node = x.inputs[0]
        if id(node) in seen:
            return True
        if node.op in _UNFOLDABLE or (node.domain or "") not in ("", "ai.onnx") or len(seen) >= _FOLD_LIMIT:
            return False
        if node.op in ("Shape", "Size"):
            shape = _static_shape(node.inputs[0])
            if shape is None:
                return False
            if node.op == "Size":
                leaves[x.name] = np.asarray(int(np.prod(shape)), np.int64)
            else:
                start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
                leaves[x.name] = np.asarray(shape[start:end] if end is not None else shape[start:], np.int64)
            return True
        seen.add(id(node))
        if not all(visit(i) for i in node.inputs if i.name):
            return False
        order.append(node)
        return True

    if not visit(t) or not order:
        return leaves.get(t.name)
    opset = _opset_of(order)
    return None if opset is None else _evaluate(order, leaves, t, opset)


# Attribute forms that later opsets replaced by inputs: the newest opset where each is still valid. A node's own
# form says which semantics it has, so the cone is evaluated at an opset that accepts all of its forms.
_ATTR_FORM_LAST = {("Squeeze", "axes"): 12, ("Unsqueeze", "axes"): 12, ("Split", "split"): 12,
                   ("ReduceSum", "axes"): 12, ("Slice", "starts"): 9, ("Pad", "pads"): 10, ("Upsample", "scales"): 8}
_INPUT_FORM_FIRST = {"Slice": (1, 10), "Pad": (1, 11), "Squeeze": (1, 13), "Unsqueeze": (1, 13),
                     "ReduceSum": (1, 13), "ReduceMean": (1, 18), "ReduceMax": (1, 18), "ReduceMin": (1, 18),
                     "ReduceProd": (1, 18), "Split": (1, 13)}


def _opset_of(nodes: list[gs.Node]) -> int | None:
    low, high = 1, 18
    for n in nodes:
        for (op, attr), last in _ATTR_FORM_LAST.items():
            if n.op == op and attr in n.attrs:
                high = min(high, last)
        first = _INPUT_FORM_FIRST.get(n.op)
        if first is not None and len(n.inputs) > first[0]:
            low = max(low, first[1])
    return high if low <= high else None


def _evaluate(nodes: list[gs.Node], leaves: dict[str, np.ndarray], t: gs.Tensor, opset: int) -> np.ndarray | None:
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    try:
        protos = [OnnxExporter.export_node(n) for n in nodes]
        inits = [onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in leaves.items()]
        graph = onnx.helper.make_graph(protos, "fold", [], [onnx.helper.make_value_info(t.name, onnx.TypeProto())],
                                       inits)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        (value,) = ReferenceEvaluator(model).run(None, {})
        return np.asarray(value)
    except Exception as exc:  # not foldable after all (an op the evaluator lacks): the tensor is not constant
        logger.debug("could not fold %s: %s", t.name, exc)
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


class NameSource:
    """New tensor/node names that nothing in the graph has: ``base``, else ``base_1``, ``base_2``... A constant
    shared by several readers and replaced per reader gets one distinct name per copy."""

    def __init__(self, graph: gs.Graph) -> None:
        self.taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


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
