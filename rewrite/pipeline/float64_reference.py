"""A float64 reference for FP32 models whose own FP32 evaluation is too noisy to judge against.

An integral image over 1024x1024 accumulates ~10^5-sized sums in FP32 and keeps only ~7
significant digits of them. Comparing a rewrite against that FP32 result measures FP32 noise, not
the rewrite. ``to_float64`` makes every FLOAT of the model DOUBLE (FLOAT16/BFLOAT16 stay as they
are); ``run_float64`` evaluates it.

Engines: ONNX Runtime CPU first (graph optimizations off). Its CPU provider has double kernels for
CumSum, Add/Sub/Mul/Div, MatMul, ReduceMean/ReduceSum, Softmax, LayerNormalization, Sigmoid,
Sqrt, Pow, Slice, Pad. It has none for Conv, AveragePool, GlobalAveragePool or Erf, and session
creation fails with NOT_IMPLEMENTED (checked with onnxruntime 1.32). In that case the model runs in
``onnx.reference.ReferenceEvaluator`` (numpy, much slower, exact float64). The graph is sorted
topologically first, because the evaluator runs nodes in the stored order. Which engine ran is logged
(``extra={"float64_engine": ...}``).

What is converted: value types of graph inputs, outputs and value_info (nested sequence/optional/map
types too); initializers and sparse initializers; TENSOR attributes on every node (Constant ``value``,
ConstantOfShape ``value``, ...). ``Constant`` ``value_float(s)`` are **not** fine as they are: they
produce a FLOAT tensor, so they become a DOUBLE ``value``. A ConstantOfShape without ``value``
(default float32 zero) gets a DOUBLE zero. Dtype attributes (``to``, ``dtype``, ``output_datatype``,
``output_dtype``) of default-domain nodes that say FLOAT become DOUBLE, and so do the ops whose
dtype *default* is FLOAT (RandomNormal/RandomUniform, the window ops, MelWeightMatrix). Subgraphs and
model-local functions are converted the same way. Float *attributes* (alpha, epsilon ...) stay
floats: they are not tensors and kernels apply them at the compute type.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.errors import BadInputError, one_line

__all__ = ["Engine", "run_float64", "to_float64", "toposorted"]

logger = logging.getLogger(__name__)

Engine = Literal["auto", "onnxruntime", "reference"]

_FLOAT, _DOUBLE = TensorProto.FLOAT, TensorProto.DOUBLE
_DEFAULT_DOMAINS = ("", "ai.onnx")
_DTYPE_ATTRS = ("to", "dtype", "output_datatype", "output_dtype")
# Ops whose dtype attribute defaults to FLOAT when absent: (op_type, attribute name).
_FLOAT_DEFAULTS = {
    "RandomNormal": "dtype", "RandomUniform": "dtype", "HannWindow": "output_datatype",
    "HammingWindow": "output_datatype", "BlackmanWindow": "output_datatype",
    "MelWeightMatrix": "output_datatype",
}


# ----------------------------------------------------------------------------- conversion


def _convert_type(tp: onnx.TypeProto) -> None:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(tp, kind)
        if inner.elem_type == _FLOAT:
            inner.elem_type = _DOUBLE
    elif kind in ("sequence_type", "optional_type"):
        _convert_type(getattr(tp, kind).elem_type)
    elif kind == "map_type":
        _convert_type(tp.map_type.value_type)


def _convert_tensor(t: TensorProto) -> None:
    if t.data_type != _FLOAT:
        return
    if t.data_location == TensorProto.EXTERNAL:
        raise BadInputError(f"tensor {t.name!r} is stored externally; load the model with its external data")
    converted = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)
    converted.doc_string = t.doc_string
    t.CopyFrom(converted)


def _convert_sparse(sp: onnx.SparseTensorProto) -> None:
    _convert_tensor(sp.values)


def _double_tensor(values: Iterable[float], scalar: bool) -> TensorProto:
    arr = np.asarray(list(values), dtype=np.float64)
    return numpy_helper.from_array(arr.reshape(()) if scalar else arr)


def _convert_node(node: onnx.NodeProto) -> None:
    default_domain = node.domain in _DEFAULT_DOMAINS
    for i, attr in enumerate(node.attribute):
        if attr.type == AttributeProto.TENSOR:
            _convert_tensor(attr.t)
        elif attr.type == AttributeProto.TENSORS:
            for t in attr.tensors:
                _convert_tensor(t)
        elif attr.type == AttributeProto.SPARSE_TENSOR:
            _convert_sparse(attr.sparse_tensor)
        elif attr.type == AttributeProto.SPARSE_TENSORS:
            for sp in attr.sparse_tensors:
                _convert_sparse(sp)
        elif attr.type == AttributeProto.GRAPH:
            _convert_graph(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            for g in attr.graphs:
                _convert_graph(g)
        elif attr.type == AttributeProto.TYPE_PROTO:
            _convert_type(attr.tp)
        elif attr.type == AttributeProto.TYPE_PROTOS:
            for tp in attr.type_protos:
                _convert_type(tp)
        elif attr.type == AttributeProto.INT and default_domain and attr.name in _DTYPE_ATTRS and attr.i == _FLOAT:
            attr.i = _DOUBLE
        elif node.op_type == "Constant" and default_domain and attr.name in ("value_float", "value_floats"):
            scalar = attr.name == "value_float"
            tensor = _double_tensor([attr.f] if scalar else attr.floats, scalar)
            node.attribute[i].CopyFrom(helper.make_attribute("value", tensor))
    if not default_domain:
        return
    names = {a.name for a in node.attribute}
    if node.op_type == "ConstantOfShape" and "value" not in names:
        node.attribute.append(helper.make_attribute("value", _double_tensor([0.0], scalar=False)))
    default_attr = _FLOAT_DEFAULTS.get(node.op_type)
    if default_attr is not None and default_attr not in names:
        node.attribute.append(helper.make_attribute(default_attr, _DOUBLE))


def _convert_graph(graph: onnx.GraphProto) -> None:
    for vi in (*graph.input, *graph.output, *graph.value_info):
        _convert_type(vi.type)
    for t in graph.initializer:
        _convert_tensor(t)
    for sp in graph.sparse_initializer:
        _convert_sparse(sp)
    for node in graph.node:
        _convert_node(node)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every FLOAT tensor, type and dtype attribute is DOUBLE."""
    from onnx_fp16_rewrite.io import weights

    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights.unshare(result)  # weights shared in the process (io.weights.share) come back as values
    _convert_graph(result.graph)
    for function in result.functions:
        for node in function.node:
            _convert_node(node)
        for vi in getattr(function, "value_info", ()):
            _convert_type(vi.type)
    return result


# ----------------------------------------------------------------------------- topological order


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    produced = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    produced |= {t.values.name for t in graph.sparse_initializer}
    needed: set[str] = set()
    for node in graph.node:
        needed |= _node_needs(node)
        produced.update(node.output)
    return needed - produced - {""}


def _node_needs(node: onnx.NodeProto) -> set[str]:
    needs = {name for name in node.input if name}
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            needs |= _outer_names(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            for g in attr.graphs:
                needs |= _outer_names(g)
    return needs


def toposorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when its main graph is already in topological order, else a sorted copy.

    The order is stable: among ready nodes the one stored first goes first. Subgraph reads from the
    enclosing scope count as inputs. Raises BadInputError for a cycle or a value that nothing produces.
    """
    graph = model.graph
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    available |= {t.values.name for t in graph.sparse_initializer}
    needs = [_node_needs(node) - available for node in graph.node]
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    missing = sorted({name for n in needs for name in n} - producer.keys())
    if missing:
        raise BadInputError(f"graph values that no node, input or initializer provides: {missing[:5]}")
    deps = [{producer[name] for name in n} for n in needs]
    if all(all(d < i for d in dep) for i, dep in enumerate(deps)):
        return model
    users: dict[int, list[int]] = {}
    for i, dep in enumerate(deps):
        for d in dep:
            users.setdefault(d, []).append(i)
    waiting = [len(dep) for dep in deps]
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users.get(i, ()):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(graph.node):
        raise BadInputError("the graph has a cycle; it cannot be evaluated")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(graph.node[i] for i in order)
    logger.debug("sorted %d nodes topologically for the reference evaluator", len(order))
    return result


# ----------------------------------------------------------------------------- running


def _ort_refusals() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, n) for n in ("NotImplemented", "Fail", "InvalidGraph", "InvalidArgument")
                 if hasattr(state, n))


def _cast_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.input
                if v.type.WhichOneof("value") == "tensor_type"}
    cast = {}
    for name, value in feeds.items():
        if declared.get(name) == _DOUBLE:
            cast[name] = np.asarray(value, dtype=np.float64)
        else:
            cast[name] = np.asarray(value)
    return cast


def _run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Outputs from ORT CPU, or None when ORT refuses the model (no double kernel, type errors)."""
    from onnx_fp16_rewrite.io.ort_runner import make_session

    try:
        session = make_session(model)
    except _ort_refusals() as exc:
        logger.info("onnxruntime cannot run the float64 model (%s); using onnx.reference", one_line(exc))
        return None
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    sorted_model = toposorted(model)
    evaluator = ReferenceEvaluator(sorted_model, new_ops=[_inference_batch_norm()])
    names = [o.name for o in sorted_model.graph.output]
    return dict(zip(names, evaluator.run(names, feeds), strict=True))


def _inference_batch_norm():
    """BatchNormalization as the spec defines it for a node with one output: inference mode, with the
    running statistics. onnx.reference's opset 9-13 kernel uses the batch statistics whenever the
    node carries ``momentum`` (TorchScript exports always do; onnx/onnx#8442), which made this
    reference 8e-2 off on an exported Conv+BN detector."""
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_batch_normalization import BatchNormalization_14

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None,
                 is_test=None, spatial=None):  # noqa: ARG002 (attributes of every opset's form)
            if len(self.onnx_node.output) > 1:  # training outputs asked for: the library's own kernel
                return BatchNormalization_14._run(self, x, scale, bias, mean, var, epsilon, momentum, 1)
            eps = 1e-5 if epsilon is None else epsilon
            shape = (-1,) + (1,) * (x.ndim - 2)
            y = scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
            return ((y + bias.reshape(shape)).astype(x.dtype),)

    return BatchNormalization


def _as_float64(value):
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return value.astype(np.float64, copy=False)
    return value


def run_float64(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, engine: Engine = "auto"
) -> dict[str, np.ndarray]:
    """Evaluate ``model`` in float64 (see the module docstring); returns ``{output: array}``.

    Feeds for FLOAT inputs are cast to float64; floating outputs are returned as float64 (FLOAT16
    outputs are upcast exactly). ``engine``: ``"auto"`` tries ORT then falls back to the reference
    evaluator; ``"onnxruntime"`` raises BadInputError if ORT refuses; ``"reference"`` skips ORT.
    """
    if engine not in ("auto", "onnxruntime", "reference"):
        raise BadInputError(f"engine must be 'auto', 'onnxruntime' or 'reference', not {engine!r}")
    double = to_float64(model)
    feeds64 = _cast_feeds(double, feeds)
    outputs = None
    used = "onnxruntime"
    if engine != "reference":
        outputs = _run_onnxruntime(double, feeds64)
        if outputs is None and engine == "onnxruntime":
            raise BadInputError("onnxruntime CPU cannot run this model in float64 (see the log)")
    if outputs is None:
        used = "reference"
        outputs = _run_reference(double, feeds64)
    logger.info("float64 reference computed with %s", used, extra={"float64_engine": used})
    return {name: _as_float64(value) for name, value in outputs.items()}
