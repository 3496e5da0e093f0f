"""Constant folding with onnx-graphsurgeon, iterated with shape inference, in two strengths.

- ``fold_dynamic``: folds what holds for every input shape the model accepts: constant
  subgraphs, and ``Shape`` / ``Shape -> Gather`` of dims that shape inference proves static with
  the graph inputs' dynamic dims left symbolic (a head dim of 64 under a dynamic sequence length).
- ``specialise``: the graph inputs get the feed's concrete shape and every ``Shape`` / ``Size``
  becomes the constant traced from a run, then the same folding: what is left has no shape
  arithmetic at all (``ones_like`` count images, pads and slice bounds become literals).

Folding evaluates subgraphs with ONNX Runtime in FP32, so a folded value has the bits the
model computed at run time. Nondeterministic ops and Q/DQ pairs (TensorRT's INT8 pattern) are
never folded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.io.model_io import past_proto_limit

__all__ = ["fold_dynamic", "sanitize_dims", "specialise", "graph_inputs"]

logger = logging.getLogger(__name__)

_NEVER_FOLD = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial",
               "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Folding that would make one initializer larger than this is left to run time (Expand/Tile of
# constants into huge tensors would bloat the model).
SIZE_THRESHOLD = 64 * 2**20


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def sanitize_dims(model: onnx.ModelProto) -> int:
    """Make every dim that is not a known size *unknown* (no value, no name), in place: ``-1``
    anywhere, and ``0`` in graph inputs (older exporters write 0 for "unknown"). Shape inference
    would otherwise take ``-1`` for a size (``Shape -> Gather`` folding to -1). Returns the count."""
    count = 0
    inputs = {i.name for i in graph_inputs(model)}
    g = model.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and (d.dim_value < 0 or (d.dim_value == 0 and vi.name in inputs)):
                d.Clear()
                count += 1
    return count


def fold_dynamic(model: onnx.ModelProto, *, max_rounds: int = 6) -> onnx.ModelProto:
    """Fold what is constant for every accepted input shape (see the module docstring)."""
    if _nothing_to_fold(model):
        return model  # folding would give this graph back (its round trip costs 0.5 s on T5's weights)
    return _fold_rounds(model, max_rounds)


_SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "EyeLike"}


def _nothing_to_fold(model: onnx.ModelProto) -> bool:
    """Whether graphsurgeon's folding and cleanup provably leave the graph as it is: no Constant
    node (folding turns them into initializers), no shape op, no node whose inputs are all
    initializers, no node with a subgraph, no initializer that is also a graph input, and every
    node output read (cleanup drops dead nodes)."""
    g = model.graph
    consts = {t.name for t in g.initializer}
    if consts & {i.name for i in g.input}:
        return False
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for n in g.node:
        if n.op_type == "Constant" or n.op_type in _SHAPE_OPS or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return False
        ins = [i for i in n.input if i]
        if all(i in consts for i in ins) or not any(o in read for o in n.output if o):
            return False
    return True


def specialise(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]],
               traced: Mapping[str, tuple[int, ...]], *, max_rounds: int = 6) -> onnx.ModelProto:
    """Fix the graph inputs to ``input_shapes`` and fold every Shape/Size with ``traced`` shapes."""
    m = _copy(model)
    for vi in graph_inputs(m):
        shape = input_shapes.get(vi.name)
        if shape is None:
            continue
        tt = vi.type.tensor_type
        tt.shape.Clear()
        for s in shape:
            tt.shape.dim.add().dim_value = int(s)
    del m.graph.value_info[:]  # shapes inferred before may be symbolic; infer them again
    graph = weights.import_graph(m)  # large weights stay references (io.weights)
    replaced = 0
    for node in graph.nodes:
        if node.op not in ("Shape", "Size") or not node.inputs or len(node.outputs) != 1:
            continue
        shape = traced.get(node.inputs[0].name)
        out = node.outputs[0]
        if shape is None or not isinstance(out, gs.Variable):
            continue
        if node.op == "Size":
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            rank = len(shape)
            start = int(node.attrs.get("start", 0))
            end = node.attrs.get("end")
            start = max(0, min(rank, start + rank if start < 0 else start))
            end = rank if end is None else max(0, min(rank, int(end) + rank if int(end) < 0 else int(end)))
            value = np.array(shape[start:end], dtype=np.int64)
        node.outputs.clear()
        out.to_constant(value)
        replaced += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    logger.info("specialise: %d Shape/Size nodes replaced by traced shapes", replaced)
    folded = _fold_rounds(_export(graph, m), max_rounds)
    _traced_value_info(folded, traced)
    return folded


def _traced_value_info(model: onnx.ModelProto, traced: Mapping[str, tuple[int, ...]]) -> None:
    """Where shape inference still leaves a dim unknown (ops it cannot see through), the shape
    traced from the run is the shape of this specialised model: record it."""
    from onnx import helper

    from onnx_fp16_rewrite.io.ort_runner import infer_types

    g = model.graph
    known = {}
    for vi in (*g.input, *g.output, *g.value_info):
        tt = vi.type.tensor_type
        known[vi.name] = tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim)
    try:
        types, _ = infer_types(model)
    except Exception:  # without element types no value_info can be written
        return
    outputs = {o.name for o in g.output}
    add = {out: helper.make_tensor_value_info(out, types[out], list(traced[out]))
           for node in g.node for out in node.output
           if out and not known.get(out) and out in traced and out in types and out not in outputs}
    if add:
        kept = [vi for vi in g.value_info if vi.name not in add]
        del g.value_info[:]
        g.value_info.extend(kept + list(add.values()))


def _fold_rounds(model: onnx.ModelProto, max_rounds: int) -> onnx.ModelProto:
    """Shape inference then graphsurgeon folding, until a round folds nothing more (a fold can
    give inference the shape the next fold needs)."""
    current = model
    for _ in range(max_rounds):
        before = len(current.graph.node)
        graph = weights.import_graph(_infer(current))
        weights.load_refs(graph)  # graphsurgeon evaluates folds in ORT from exported values: arrays, not references
        graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=SIZE_THRESHOLD,
                             should_exclude_node=lambda n: n.op in _NEVER_FOLD)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        current = _export(graph, model)
        # Another round would give this graph back when nothing is left that it could fold.
        if len(current.graph.node) == before or _nothing_to_fold(current):
            break
    return current


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    if past_proto_limit(model):
        return model  # in-memory inference cannot take it; fold what graphsurgeon sees
    try:
        # On a weight-less skeleton (float weights are only dims to inference): the model's
        # weights would otherwise be serialised and parsed four times (0.5 s of T5's 62 MB).
        skel, _ = weights.skeleton(model)
        inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    except Exception as exc:  # inference is an aid to folding; without it we fold less
        logger.info("shape inference failed before folding: %s", exc)
        return model
    # The skeleton stripped only top-level initializers: put the model's own back.
    del inferred.graph.initializer[:]
    inferred.graph.initializer.extend(model.graph.initializer)
    return inferred


def _export(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """graphsurgeon rebuilds the ModelProto: carry over what it does not know about."""
    weights.keep_refs(graph)
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = like.ir_version
    out.producer_name, out.producer_version = like.producer_name, like.producer_version
    out.doc_string = like.doc_string
    out.model_version = like.model_version
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
