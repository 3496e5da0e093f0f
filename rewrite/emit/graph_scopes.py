"""Types, names and scopes of a graph and its If/Loop/Scan bodies, for the mixed-precision
converter: shape-inferred types (bodies included), schema type variables, outer-scope reads, and
the strict re-inference plus full check of the result."""

from __future__ import annotations

import logging

import onnx
from onnx import helper

from onnx_fp16_rewrite.errors import BadInputError, PassFailedError
from onnx_fp16_rewrite.io.model_io import run_checker

logger = logging.getLogger(__name__)

FP32, FP16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
_VARIADIC = onnx.defs.OpSchema.FormalParameterOption.Variadic


def value_types(model: onnx.ModelProto) -> tuple[dict[str, int], set[str], dict]:
    """Element type of every tensor inference can type (in bodies too), names of non-tensor
    values, value infos."""
    try:
        g = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False).graph
    except Exception as exc:  # inference raises several unrelated types on broken models
        raise BadInputError(f"shape inference failed on the input model: {exc}") from None
    graphs = all_graphs(g)
    infos = {vi.name: vi for sub in reversed(graphs) for vi in (*sub.input, *sub.output, *sub.value_info)}
    types = {t.name: t.data_type for sub in graphs for t in sub.initializer}
    nontensor: set[str] = set()
    for name, vi in infos.items():
        if vi.type.HasField("tensor_type"):
            if vi.type.tensor_type.elem_type:
                types[name] = vi.type.tensor_type.elem_type
        elif vi.type.WhichOneof("value") is not None:
            nontensor.add(name)
    if FP16 in types.values():
        logger.info("input model already has FLOAT16 tensors; they are left as they are")
    return types, nontensor, infos


def convertible(schema: onnx.defs.OpSchema | None, slot: int, is_input: bool) -> bool:
    """True when the formal parameter at ``slot`` is a type variable that admits float16."""
    params = (schema.inputs if is_input else schema.outputs) if schema else []
    if not params or slot >= len(params) and params[-1].option != _VARIADIC:
        return False
    formal = params[min(slot, len(params) - 1)]  # a variadic last formal covers the rest
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    # A fixed type (Resize's scales: "tensor(float)") is no type variable and never converts.
    return "tensor(float16)" in allowed.get(formal.type_str, ())


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def copy(node: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(node)
    return c


def cast(src: str, dst: str, to: int, name: str) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], name=name, to=to)


def all_graphs(g: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``g`` and every subgraph in it, outermost first."""
    out = [g]
    for n in g.node:
        for sub in subgraphs(n):
            out += all_graphs(sub)
    return out


def all_node_names(g: onnx.GraphProto) -> set[str]:
    return {n.name for sub in all_graphs(g) for n in sub.node}


def all_names(g: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*g.input, *g.output, *g.value_info)} | {t.name for t in g.initializer}
    for n in g.node:
        names.update((n.name, *n.input, *n.output))
        for sub in subgraphs(n):
            names |= all_names(sub)
    return names


def outer_refs(graphs: list[onnx.GraphProto]) -> list[str]:
    """Names these subgraphs read from enclosing scopes, in first-use order."""
    refs: list[str] = []
    for g in graphs:
        defined = {v.name for v in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            refs += [t for t in (*n.input, *outer_refs(subgraphs(n))) if t and t not in defined and t not in refs]
            defined.update(n.output)
        refs += [o.name for o in g.output if o.name not in defined and o.name not in refs]
    return refs


def rebuild_types(model: onnx.ModelProto, keep: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    """Replace value_info by a strict re-inference (keeping what only the input model knew about
    schema-less nodes' outputs) and run the full checker."""
    for g in all_graphs(model.graph):  # bodies' value_info is stale after conversion too
        del g.value_info[:]
    outputs = {o.name for o in model.graph.output}
    model.graph.value_info.extend(vi for vi in keep if vi.name not in outputs)
    try:
        out = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        run_checker(out, full_check=True)  # referenced weights: on a skeleton (io.model_io)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError) as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise PassFailedError(f"mixed-precision model is invalid: {first}") from None
    return out
