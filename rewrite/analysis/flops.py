"""Estimated FLOPs per node, and the share of them a precision plan leaves in FP16.

An estimate, not a profile: it says how much arithmetic a rewrite adds and how much of a model a
plan keeps out of FP16, which is what the reports need. Counting rules (one multiply-add = 2):
- Conv: 2 * output elements * (C_in / group) * kernel volume (+ output elements for a bias);
  ConvTranspose: 2 * input elements * (C_out / group) * kernel volume.
- MatMul: 2 * output elements * K; Gemm: 2 * M * N * K (+ M * N for C); Einsum: 2 * the product of
  all index sizes when something is contracted, else the output elements.
- Pooling (AveragePool, MaxPool, LpPool): output elements * kernel volume. Without this a 384x384
  AveragePool would look as cheap as an Add; comparing pooling with integral images is the point.
- Reductions (Reduce*, ArgMax/ArgMin, Global*Pool): input elements (the output can be one number).
- Ops that only relabel memory (Reshape, Squeeze, Unsqueeze, Flatten, Identity, Shape, Size,
  Constant): 0.
- Everything else (elementwise, CumSum, Slice, Pad, Concat, Transpose, Cast ...): output elements.
Shapes are those of a run when ``feeds`` are given (dynamic, ``-1`` and symbolic dims count as
what the model computed on the first feed), else ONNX shape inference's (with data propagation).
With feeds, static inference runs first on a copy whose inputs take the feed's shapes (its
value_info and output shapes dropped, so nothing stale is believed). Where it stops, ORT traces
just the tensors it stopped at, on the nodes they need (``canonical.trace``), and inference goes
on from their shapes; only when that does not finish cheaply is every tensor's shape traced from
one full run, which then stands for all of them (the behaviour before: ``trace=True``). A node
whose shape is still unknown counts 0; ``fp16_flop_fraction`` names such nodes in one warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

__all__ = ["fp16_flop_fraction", "node_flops", "op_flops", "tensor_shapes"]

logger = logging.getLogger(__name__)

Shape = tuple[int | None, ...]

_VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size", "Constant"}
_POOL_OPS = {"AveragePool", "MaxPool", "LpPool"}
_REDUCE_OPS = {"ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def tensor_shapes(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]] | None = None, *,
                  trace: bool | None = None) -> tuple[dict[str, Shape], dict[str, int]]:
    """Shape (None for unknown dims) and element type of every tensor shape inference can type;
    with ``feeds``, the shapes of a run on the first feed take precedence: inferred for the feed's
    input shapes where that fixes every tensor a FLOP count reads, else traced from an ORT run.
    ``trace``: True always traces (no static shortcut), False never does."""
    skel = _inference_skeleton(model)
    shapes, types = _inferred_shapes(model, skel)
    if not feeds:
        return shapes, types
    if trace is not True:
        static = _fed_shapes(skel, feeds[0])
        if static is not None and trace is None:
            static = _seeded(model, skel, feeds[0], *static)
        if static is not None and _complete(model, static[0]):
            shapes.update(static[0])
            return shapes, types
        if trace is False:
            return shapes, types
    shapes.update(_traced(model, feeds[0]))
    return shapes, types


def _fed_shapes(skeleton: onnx.ModelProto, feed: Mapping[str, np.ndarray], seeds: Mapping[str, Shape] | None = None,
                seed_types: Mapping[str, int] | None = None) -> tuple[dict[str, Shape], dict[str, int]] | None:
    """Shapes (and types) inferred with the graph inputs set to ``feed``'s shapes and ``seeds``
    (traced shapes) as value_info; None where ORT would refuse the feed (a missing or unknown
    name, another rank or fixed dim): the trace decides those."""
    skel = _copy(skeleton)  # weight-less: a cheap copy
    g = skel.graph
    inits = {i.name for i in g.initializer}
    names = {i.name for i in g.input}
    # A fed initializer-input: trace_shapes lets the initializer's dims win; leave that to it.
    if not set(feed) <= names - inits or any(i.name not in feed for i in g.input if i.name not in inits):
        return None
    for vi in g.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        want = np.shape(feed[vi.name])
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape") or len(tt.shape.dim) != len(want):
            return None
        for d, n in zip(tt.shape.dim, want):
            if d.HasField("dim_value") and d.dim_value >= 0 and d.dim_value != n:  # ORT: -1 is free
                return None
            d.Clear()
            d.dim_value = int(n)
    # Only what inputs, weights and op semantics imply: a stale value_info or output shape
    # would be believed by inference but not by ORT.
    seeds = seeds or {}
    del g.value_info[:]
    for vi in g.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
            if vi.name in seeds:
                vi.type.tensor_type.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=d)
                                                     for d in seeds[vi.name])
    outputs = {vi.name for vi in g.output}
    g.value_info.extend(helper.make_tensor_value_info(k, seed_types[k], v) for k, v in seeds.items()
                        if k not in outputs)
    return _shapes_of(onnx.shape_inference.infer_shapes(skel, data_prop=True))


_SEED_ROUNDS = 3
_SEED_SHARE = 0.25  # of the model's (known) FLOPs the seed traces may run, all rounds together


def _seeded(model: onnx.ModelProto, skeleton: onnx.ModelProto, feed: Mapping[str, np.ndarray],
            shapes: dict[str, Shape], types: dict[str, int]) -> tuple[dict[str, Shape], dict[str, int]]:
    """Where inference stops (a node's inputs known, an output not: Range over a fed length, Pad
    by computed pads), trace just those outputs (on the nodes they depend on), give inference
    the traced shapes and infer again; a few rounds. Unfinished: the full trace decides."""
    from onnx_fp16_rewrite.canonical.trace import depends_on

    seeds: dict[str, Shape] = {}
    nodes = model.graph.node
    spent = 0.0
    for _ in range(_SEED_ROUNDS):
        if _complete(model, shapes):
            break
        stops = [o for n in nodes if all(not i or _numel(shapes.get(i)) is not None for i in n.input)
                 for o in n.output if o and _numel(shapes.get(o)) is None and types.get(o)]
        # Worth it only while the nodes those need are a small part of the model (a Range over a
        # fed length: its shape arithmetic); else one full trace is cheaper than rounds of them.
        flops = [_node_cost(n, shapes) or 0.0 for n in nodes]
        spent += sum(flops[i] for i in depends_on(model.graph, stops))
        if not stops or spent > _SEED_SHARE * sum(flops):
            break
        traced = {k: v for k, v in _traced(model, feed, only=stops).items() if k in stops}
        if not traced:
            break
        seeds.update(traced)
        fed = _fed_shapes(skeleton, feed, seeds, types)
        if fed is None:
            break
        shapes, new_types = fed
        types = {**types, **new_types}
    return shapes, types


def _complete(model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> bool:
    """Every input and output of every counted (non-view) main-graph node has a fully known shape
    (a superset of what ``op_flops`` reads, so the counts cannot depend on anything unknown)."""
    for node in model.graph.node:
        if node.op_type in _VIEW_OPS:
            continue
        for name in (*node.input, *node.output):
            if name and _numel(shapes.get(name)) is None:
                return False
    return True


def _traced(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], only: Sequence[str] | None = None
            ) -> dict[str, Shape]:
    from onnx_fp16_rewrite.canonical.trace import trace_shapes
    from onnx_fp16_rewrite.pipeline.pass_manager import name_nodes

    names = [n.name for n in model.graph.node]
    if "" in names or len(set(names)) < len(names):  # ORT refuses duplicate names: PassManager's, as always
        model = _copy(model)
        name_nodes(model)
    # A mixed-precision model may take FP16 inputs: feed it what it declares.
    declared = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                for i in model.graph.input if i.type.tensor_type.elem_type}
    typed = {k: np.asarray(v).astype(declared.get(k, np.asarray(v).dtype)) for k, v in feed.items()}
    try:
        return dict(trace_shapes(model, typed, only=only))
    except Exception as exc:  # a model ORT cannot run keeps the inferred shapes
        logger.info("FLOPs: shapes not traced (%s); using shape inference", exc)
        return {}


def _inferred_shapes(model: onnx.ModelProto, skel: onnx.ModelProto | None = None) -> tuple[dict[str, Shape], dict]:
    # On a weight-less skeleton: never a >2 GiB proto, never the caller's model saved as external data.
    return _shapes_of(onnx.shape_inference.infer_shapes(skel or _inference_skeleton(model), data_prop=True))


_STUB_BYTES = 64 << 10


def _inference_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``weights.skeleton`` whose float weights from 64 KiB up are dims-only references too: shape
    inference reads a weight's dims, and values only of small shape tensors (axes, pads, scales),
    so it gets the same shapes without serialising the weights twice (T5-small: 2 s of 2.2)."""
    skel, stripped = weights.skeleton(model, large_bytes=_STUB_BYTES)
    for t in skel.graph.initializer:  # anything but a float weight: as the default skeleton keeps it
        orig = stripped.get(t.name)
        if (orig is not None and orig.data_type not in _FLOAT_TYPES and not weights.is_ref(orig)
                and weights.nbytes(orig) < weights.LARGE_TENSOR_BYTES):
            t.CopyFrom(orig)
    return skel


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _shapes_of(inferred: onnx.ModelProto) -> tuple[dict[str, Shape], dict[str, int]]:
    g = inferred.graph
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    for node in g.node:  # Constant nodes: shape inference types them, but be sure
        if node.op_type == "Constant" and node.output[0] not in shapes:
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
                    types[node.output[0]] = a.t.data_type
    return shapes, types


def _numel(shape: Shape | None) -> int | None:
    if shape is None or any(d is None or d < 0 for d in shape):
        return None
    return math.prod(shape)  # () -> 1


def op_flops(op: str, attrs: dict[str, object], ins: Sequence[Shape | None],
             outs: Sequence[Shape | None]) -> float | None:
    """FLOPs of one node from its input and output shapes (see the module docstring);
    None when a shape it needs is unknown."""
    if op in _VIEW_OPS:
        return 0.0
    out0 = _numel(outs[0]) if outs else None
    in0 = _numel(ins[0]) if ins else None
    if op == "Conv":
        w = ins[1] if len(ins) > 1 else None
        if out0 is None or w is None or _numel(w) is None:
            return None
        bias = out0 if len(ins) > 2 and ins[2] is not None else 0
        return 2.0 * out0 * int(np.prod(w[1:])) + bias
    if op == "ConvTranspose":
        w = ins[1] if len(ins) > 1 else None
        if in0 is None or w is None or _numel(w) is None:
            return None
        # Weight [C_in, C_out / group, k...]: each input element feeds C_out/group * kernel volume MACs.
        bias = (out0 or 0) if len(ins) > 2 and ins[2] is not None else 0
        return 2.0 * in0 * int(np.prod(w[1:])) + bias
    if op == "MatMul":
        a = ins[0] if ins else None
        if out0 is None or not a or a[-1] is None:
            return None
        return 2.0 * out0 * a[-1]
    if op == "Gemm":
        a = ins[0] if ins else None
        if out0 is None or a is None or len(a) != 2 or None in a:
            return None
        k = a[0] if attrs.get("transA", 0) else a[1]
        bias = out0 if len(ins) > 2 and ins[2] is not None else 0
        return 2.0 * out0 * k + bias
    if op == "Einsum":
        equation = attrs.get("equation", b"")
        return _einsum_flops(equation.decode() if isinstance(equation, bytes) else str(equation), ins, out0)
    if op in _POOL_OPS:
        kernel = attrs.get("kernel_shape")
        if out0 is None or not kernel:
            return None
        return float(out0) * int(np.prod(kernel))
    if op.startswith("Reduce") or op in _REDUCE_OPS:
        return None if in0 is None else float(in0)
    total = 0
    for shape in outs:
        n = _numel(shape)
        if n is None:
            return None
        total += n
    return float(total)


def _einsum_flops(equation: str, ins: Sequence[Shape | None], out0: int | None) -> float | None:
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ins):
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, ins):
        if shape is None or None in shape:
            return None
        n_ell = len(shape) - len(term.replace("...", ""))
        labels = term.replace("...", "".join(f"<{i}>" for i in range(n_ell)))
        # "<i>" marks the i-th broadcast dim; split labels into single letters and markers.
        tokens, i = [], 0
        while i < len(labels):
            j = labels.index(">", i) + 1 if labels[i] == "<" else i + 1
            tokens.append(labels[i:j])
            i = j
        for tok, dim in zip(tokens, shape):
            sizes[tok] = max(sizes.get(tok, 1), dim)
    if not rhs and "->" in equation:
        out_labels: set[str] = set()
    elif "->" in equation:
        out_labels = set(rhs.replace("...", ""))
    else:  # implicit output: labels used once
        flat = lhs.replace(",", "").replace("...", "")
        out_labels = {c for c in flat if flat.count(c) == 1}
    contracted = {t for t in sizes if len(t) == 1 and t not in out_labels}
    if not contracted:
        return None if out0 is None else float(out0)
    return 2.0 * float(np.prod(list(sizes.values()), dtype=np.float64))


def node_flops(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]] | None = None, *,
               shapes: Mapping[str, Shape] | None = None, unknown: list[str] | None = None,
               trace: bool | None = None) -> dict[str, float]:
    """Estimated FLOPs of every node of the main graph, keyed by node name (unnamed or duplicate
    names get the names ``PassManager`` would give them), on the shapes of a run on ``feeds`` when
    given (or on ``shapes``; ``trace`` as in ``tensor_shapes``). Nodes with unknown shapes count
    0; their names go to ``unknown`` when given, else to an info log line."""
    nodes = _named_nodes(model)
    if shapes is None:
        shapes, _ = tensor_shapes(model, feeds, trace=trace)
    result, missing = _counts(nodes, shapes)
    if unknown is not None:
        unknown.extend(missing)
    elif missing:
        logger.info("FLOPs: %d node(s) with unknown shapes counted as 0: %s", len(missing), _names(missing))
    return result


def _named_nodes(model: onnx.ModelProto) -> Sequence[onnx.NodeProto]:
    """The main graph's nodes under the names ``PassManager`` would give them (a copy of the nodes
    alone: copying a whole model copied its weights, 0.3 s of T5-small's count)."""
    from onnx_fp16_rewrite.pipeline.pass_manager import name_nodes

    named = onnx.ModelProto()
    named.graph.node.extend(model.graph.node)
    name_nodes(named)
    return named.graph.node


def _node_cost(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> float | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = [shapes.get(i) if i else None for i in node.input]
    outs = [shapes.get(o) for o in node.output if o]
    return op_flops(node.op_type, attrs, ins, outs)


def _counts(nodes: Sequence[onnx.NodeProto], shapes: Mapping[str, Shape]) -> tuple[dict[str, float], list[str]]:
    result: dict[str, float] = {}
    missing: list[str] = []
    for node in nodes:
        flops = _node_cost(node, shapes)
        if flops is None:
            missing.append(node.name)
            flops = 0.0
        result[node.name] = flops
    return result, missing


def _names(names: list[str]) -> str:
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")


def fp16_flop_fraction(model: onnx.ModelProto, plan: PrecisionPlan | None = None,
                       feeds: Sequence[Mapping[str, np.ndarray]] | None = None, *,
                       trace: bool | None = None) -> float:
    """Share of the estimated FLOPs in nodes that run in FP16, on the shapes of a run on ``feeds``
    when given (see the module docstring; ``trace`` as in ``tensor_shapes``); one warning names
    nodes whose shapes stay unknown.

    A weakly typed model (no FLOAT16 tensor): a node is FP16 unless ``plan`` pins it (``plan`` None:
    the plan stored in the model). A mixed-precision model: a node is FP16 when its float outputs
    are FLOAT16 (the plan is not consulted). Nodes without float outputs (shape arithmetic) count
    on neither side. Returns 0.0 for a model with no float FLOPs.
    """
    nodes = _named_nodes(model)
    shapes, types = tensor_shapes(model, feeds, trace=trace)
    flops, unknown = _counts(nodes, shapes)
    if unknown:
        logger.warning("FLOPs: %d node(s) with unknown shapes counted as 0: %s", len(unknown), _names(unknown))
    mixed = any(t == TensorProto.FLOAT16 for t in types.values())
    if plan is None:
        plan = PrecisionPlan.from_model(model)
    fp16 = total = 0.0
    for node in nodes:
        float_outs = [types.get(o) for o in node.output if o and types.get(o) in _FLOAT_TYPES]
        if not float_outs:
            continue
        is_fp16 = (any(t == TensorProto.FLOAT16 for t in float_outs) if mixed
                   else not plan.is_fp32(node.name))
        total += flops[node.name]
        fp16 += flops[node.name] if is_fp16 else 0.0
    return fp16 / total if total > 0 else 0.0
