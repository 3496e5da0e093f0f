"""Graph edits the FP16 emulation is made of: FP16 rounding, FP16-accumulating CumSum, retyping."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fp16_rewrite.io import weights

_FLOAT = onnx.TensorProto.FLOAT
_FLOAT16 = onnx.TensorProto.FLOAT16


def weights_not_inputs(m: onnx.ModelProto) -> None:
    """Drop the graph inputs that carry an initializer (IR < 4 requires them;
    ``keep_initializers_as_inputs`` exports keep them): an engine builds them as weights, and
    the analysis graphs replace or drop weights, which would leave such inputs unfed. IR is
    raised to 4, the first that lets an initializer stand alone (analysis copies only)."""
    g = m.graph
    inits = {i.name for i in g.initializer}
    if any(i.name in inits for i in g.input):
        kept = [_copy_proto(i) for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(kept)
    m.ir_version = max(m.ir_version, 4)


def _copy_proto(p):
    c = type(p)()
    c.CopyFrom(p)
    return c


def round_nodes(src: str, dst: str) -> list[onnx.NodeProto]:
    half = dst + "__half"
    return [
        helper.make_node("Cast", [src], [half], name=half, to=_FLOAT16),
        helper.make_node("Cast", [half], [dst], name=dst + "__round", to=_FLOAT),
    ]


def rounded_edge(
    name: str,
    init_by_name: dict[str, onnx.TensorProto],
    cache: dict[str, str],
    new_inits: list[onnx.TensorProto],
    new_nodes: list[onnx.NodeProto],
) -> str:
    """The FP16-rounded version of an FP32 tensor, made once and shared by all FP16 readers."""
    if name in cache:
        return cache[name]
    rounded = name + "__r16"
    if name in init_by_name:
        # An engine converts weights to FP16 by clamping to the FP16 range, not by overflowing.
        # (chunked, one shared copy per weight; large weights stay out of the proto: io.weights)
        new_inits.append(weights.rounded_fp16(init_by_name[name], rounded))
    else:
        new_nodes.extend(round_nodes(name, rounded))
    cache[name] = rounded
    return rounded


def strict_cumsum_nodes(
    node: onnx.NodeProto,
    init_by_name: dict[str, onnx.TensorProto],
    rank: int | None,
    new_inits: list[onnx.TensorProto],
) -> list[onnx.NodeProto] | None:
    """CumSum as a Scan whose running sum is rounded to FP16 after every step."""
    x, axis_name = node.input[0], node.input[1]
    if axis_name not in init_by_name or rank is None:
        return None
    axis = int(numpy_helper.to_array(init_by_name[axis_name]).reshape(-1)[0]) % rank
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    exclusive, reverse = int(attrs.get("exclusive", 0)), int(attrs.get("reverse", 0))
    p = node.name or node.output[0]
    keep = numpy_helper.from_array(np.array([d for d in range(rank) if d != axis], np.int64), p + "__keepdims")
    new_inits.append(keep)
    body = helper.make_graph(
        [
            helper.make_node("Add", ["s_prev", "x_i"], ["sum"]),
            helper.make_node("Cast", ["sum"], ["sum16"], to=_FLOAT16),
            helper.make_node("Cast", ["sum16"], ["s_next"], to=_FLOAT),
            helper.make_node("Identity", ["s_prev" if exclusive else "s_next"], ["y_i"]),
        ],
        "strict_cumsum_body",
        [helper.make_tensor_value_info("s_prev", _FLOAT, None), helper.make_tensor_value_info("x_i", _FLOAT, None)],
        [helper.make_tensor_value_info("s_next", _FLOAT, None), helper.make_tensor_value_info("y_i", _FLOAT, None)],
    )
    return [
        helper.make_node("Shape", [x], [p + "__shape"], name=p + "__shape"),
        helper.make_node("Gather", [p + "__shape", keep.name], [p + "__stateshape"], name=p + "__gather", axis=0),
        helper.make_node(
            "ConstantOfShape", [p + "__stateshape"], [p + "__zeros"], name=p + "__zeros",
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        ),
        helper.make_node(
            "Scan", [p + "__zeros", x], [p + "__final", node.output[0]], name=p + "__strict_scan",
            body=body, num_scan_inputs=1, scan_input_axes=[axis], scan_output_axes=[axis],
            scan_input_directions=[reverse], scan_output_directions=[reverse],
        ),
    ]


def retype_fp16_as_fp32(m: onnx.ModelProto) -> None:
    """Make every FLOAT16 tensor of a mixed graph FLOAT (the values stay FP16-exact), inside
    If/Loop/Scan bodies too."""
    _retype_graph(m.graph)


def _retype_graph(g: onnx.GraphProto) -> None:
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type
        if tt.elem_type == _FLOAT16:
            tt.elem_type = _FLOAT
    for i, init in enumerate(g.initializer):
        if init.data_type == _FLOAT16:
            # large weights: one shared FP32 copy, kept out of the proto (io.weights)
            g.initializer[i].CopyFrom(weights.derive(init, "f32", lambda a: a.astype(np.float32), init.name))
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == _FLOAT16:
                attr.i = _FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        for sub in subgraphs(node):
            _retype_graph(sub)


SHADOW = "__fp32"


def shadow_nodes(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """An FP32 copy of ``nodes`` whose produced tensors are renamed ``<name>__fp32``; graph
    inputs and weights are shared (the copy reads the original, unrounded weights). Bodies of
    control-flow copies read the FP32 twins of outer tensors too."""
    produced = {o for n in nodes for o in n.output if o}
    return [shadow_node(node, produced) for node in nodes]


def shadow_node(node: onnx.NodeProto, twin: set[str]) -> onnx.NodeProto:
    """An FP32 copy of ``node`` named ``<name>__fp32``: its outputs, and the inputs in ``twin``
    (tensors that have an FP32 twin), renamed ``<name>__fp32``, in its bodies' outer reads too."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = node.name + SHADOW if node.name else ""  # unnamed stays unnamed: no "__fp32" twice
    for i, name in enumerate(copy.input):
        if name in twin:
            copy.input[i] = name + SHADOW
    for i, name in enumerate(copy.output):
        if name:
            copy.output[i] = name + SHADOW
    for sub in subgraphs(copy):
        rename_outer_refs(sub, {t: t + SHADOW for t in twin})
    return copy


def error_nodes(tensor: str) -> list[onnx.NodeProto]:
    """Sum of squared differences between a tensor and its FP32 shadow, sum of squares, max
    and min of the shadow (its FP32 range, so no separate profiling run is needed)."""
    p = tensor + "__e"
    return [
        helper.make_node("ReduceMax", [tensor + SHADOW], [tensor + "__fmax"], name=p + "_fmax", keepdims=0),
        helper.make_node("ReduceMin", [tensor + SHADOW], [tensor + "__fmin"], name=p + "_fmin", keepdims=0),
        helper.make_node("Sub", [tensor, tensor + SHADOW], [p + "_diff"], name=p + "_diff"),
        helper.make_node("ReduceSumSquare", [p + "_diff"], [tensor + "__err"], name=p + "_err", keepdims=0),
        helper.make_node("ReduceSumSquare", [tensor + SHADOW], [tensor + "__ref"], name=p + "_ref", keepdims=0),
    ]


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def names_read_by_subgraphs(g: onnx.GraphProto) -> set[str]:
    """Every name some If/Loop/Scan body of ``g`` reads, at any depth: one walk (a walk per
    weight, as before, cost 1 s on T5's 140)."""
    names: set[str] = set()
    for node in g.node:
        for sub in subgraphs(node):
            names.update(i for n in sub.node for i in n.input)
            names |= names_read_by_subgraphs(sub)
    return names


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:  # by type first: most nodes have only int and float attributes
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def rename_outer_refs(g: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename the names a subgraph reads from enclosing scopes (ONNX forbids shadowing, so
    names defined inside never collide with outer ones)."""
    local = {v.name for v in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for n in g.node:
        for k, t in enumerate(n.input):
            if t not in local and t in mapping:
                n.input[k] = mapping[t]
        for sub in subgraphs(n):
            rename_outer_refs(sub, {k: v for k, v in mapping.items() if k not in local})
    for o in g.output:
        if o.name not in local and o.name in mapping:
            o.name = mapping[o.name]
