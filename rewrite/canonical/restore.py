"""Give a model that was analysed and fixed in specialised form its dynamic dims back.

Specialisation turned values computed from dynamic dims into initializers, under the names the
dynamic graph computes them. If the fixed model still reads those initializers by those names,
the dynamic graph's nodes that compute them are put back in their place and the graph inputs
and outputs get their declared dims again. That is exact only if no rewrite baked a shape into
something new (a Reshape target of its own, a constant derived from a folded one), so the result
is proven, not assumed: it must run on a second, different input shape (dynamic dims halved or
doubled, the feed's values tiled) and match the dynamic original there within the FP32
tolerance. Otherwise the specialised model is kept and the caller says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.errors import one_line
from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.pipeline.validate import Tolerance, Validator

__all__ = ["probe_feeds", "reattach", "verify_dynamic"]

logger = logging.getLogger(__name__)


def reattach(fixed: onnx.ModelProto, dynamic: onnx.ModelProto, folded: set[str]) -> tuple[onnx.ModelProto | None, str]:
    """``fixed`` with the initializers named in ``folded`` computed again by ``dynamic``'s nodes and
    ``dynamic``'s input/output declarations; (None, reason) when names clash. The restored nodes
    that compute floats are pinned to FP32 in the plan: the analysis saw their values as FP32
    constants (a count image summed over 512x512 pixels passes 65504), and they cost nothing."""
    out = onnx.ModelProto()
    out.CopyFrom(fixed)
    g = out.graph
    f_names = {n.name for n in g.node}
    f_tensors = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    f_inits = {i.name: i for i in g.initializer}
    available = f_tensors | (set(f_inits) - folded)
    producer = {o: n for n in dynamic.graph.node for o in n.output if o}
    dyn_inits = {i.name: i for i in dynamic.graph.initializer}
    present = [i.name for i in g.initializer if i.name in folded]
    wanted: set[int] = set()
    stack = list(present)
    while stack:  # back from the folded tensors to what the fixed model still has
        node = producer.get(stack.pop())
        if node is None or id(node) in wanted:
            continue
        wanted.add(id(node))
        stack.extend(i for i in node.input if i and i not in dyn_inits and i not in available)
    cone = [n for n in dynamic.graph.node if id(n) in wanted]
    for node in cone:
        if node.name in f_names:
            return None, f"node name {node.name!r} of the dynamic shape arithmetic is taken in the fixed model"
        for o in node.output:
            if o in f_tensors or (o in f_inits and o not in folded):
                return None, f"tensor name {o!r} of the dynamic shape arithmetic is taken in the fixed model"
    made = {o for n in cone for o in n.output}
    for node in cone:
        for i in node.input:
            if i and i not in made and i not in dyn_inits and i not in f_tensors and i not in f_inits:
                return None, f"tensor {i!r} that the shape arithmetic reads is gone from the fixed model"
    needed = {i for n in cone for i in n.input if i in dyn_inits}
    for name in needed:
        if name in f_inits and name not in folded:
            if weights.tensor_array(f_inits[name]).tobytes() != weights.tensor_array(dyn_inits[name]).tobytes():
                return None, f"initializer {name!r} differs between the fixed and the dynamic model"
    keep = [i for i in g.initializer if i.name not in present]
    del g.initializer[:]
    g.initializer.extend(keep)
    have = {i.name for i in g.initializer}
    g.initializer.extend(dyn_inits[n] for n in sorted(needed) if n not in have)
    g.node.extend(cone)
    _pin_float_nodes(out, cone, set(present))
    del g.value_info[:]  # the traced concrete shapes no longer hold
    declared = {v.name: v for v in (*dynamic.graph.input, *dynamic.graph.output)}
    for vi in (*g.input, *g.output):
        if vi.name in declared:
            vi.CopyFrom(declared[vi.name])
    graph = weights.import_graph(out)
    graph.toposort()
    weights.keep_refs(graph)
    sorted_model = gs.export_onnx(graph, do_type_check=False)
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "model_version"):
        setattr(sorted_model, field, getattr(out, field))
    del sorted_model.metadata_props[:]
    sorted_model.metadata_props.extend(out.metadata_props)
    del sorted_model.graph.value_info[:]
    return sorted_model, f"{len(cone)} shape node(s) restored for {len(present)} specialised constant(s)"


# Ops that only select, move or convert values: where such a node makes one of the folded constants
# the analysis checked (the emulation stores a constant in FP16 like any weight), FP16 gives exactly
# that constant's FP16 rounding, so it needs no pin -- GPT-2's position-embedding Gather(wpe, Range(Shape));
# likewise a chain that only moves weight values (T5's Gather(relative_attention_bias, buckets) ->
# Transpose). Arithmetic (T5's bucket Log/Div/Mul) computes differently in FP16 than its rounded
# result and stays pinned.
_DATA_MOVEMENT = frozenset({"Gather", "GatherElements", "GatherND", "Slice", "Reshape", "Transpose", "Squeeze",
                            "Unsqueeze", "Concat", "Expand", "Tile", "Identity", "Flatten", "Cast", "Split"})


def _pin_float_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], constants: set[str]) -> None:
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.io.ort_runner import infer_types

    try:
        types, _ = infer_types(model)
    except Exception:  # untyped: pin every restored node that is not pure integer shape arithmetic
        types = {}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    from onnx_fp16_rewrite.canonical.dependence import shape_dependent

    # Only values computed from shapes: a data Slice that merely feeds a Shape keeps its precision.
    from_shapes = set(shape_dependent(model)[0])
    plan = PrecisionPlan.from_model(model)
    weights_moved = {i.name for i in model.graph.initializer if i.data_type in floats}
    for node in nodes:  # topological order (the dynamic graph's)
        float_inputs = [i for i in node.input if i and types.get(i, onnx.TensorProto.FLOAT) in floats]
        if node.op_type in _DATA_MOVEMENT and float_inputs and all(i in weights_moved for i in float_inputs):
            weights_moved.update(o for o in node.output if o)
            continue  # it only moves weight values: FP16 rounds them as it rounds the weights themselves
        if node.op_type in _DATA_MOVEMENT and all(o in constants for o in node.output if o):
            continue  # it makes exactly a tensor the analysis saw as a constant (stored FP16 like a weight)
        if node.name in from_shapes and any(types.get(o, onnx.TensorProto.FLOAT) in floats for o in node.output if o):
            plan.pin(node.name, "shape arithmetic restored after specialisation (computed from shapes only)")
    plan.store_in(model)


def probe_feeds(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[list[Feed]]:
    """Candidate feeds of another shape: every dynamic dim halved (when even), else doubled, then
    each size alone; dims with the same size in the feed change together (a batch or a sequence
    shared by inputs).
    Values are the feed's, tiled or cropped, so token ids and masks stay valid."""
    feed = feeds[0]
    sizes: set[int] = set()
    dyn_axes: dict[str, list[int]] = {}
    for vi in model.graph.input:
        if vi.name not in feed:
            continue
        dims = vi.type.tensor_type.shape.dim
        axes = [a for a, d in enumerate(dims) if not d.HasField("dim_value")]
        dyn_axes[vi.name] = axes
        sizes |= {int(np.shape(feed[vi.name])[a]) for a in axes if a < np.ndim(feed[vi.name])}
    if not sizes:
        return []
    half = {s: (s // 2 if s % 2 == 0 and s >= 2 else 2 * s) for s in sizes}
    double = {s: 2 * s for s in sizes}
    # Then one size group at a time (a ViT takes another batch but only its own resolution).
    singles = [{**{t: t for t in sizes}, s: m[s]} for s in sorted(sizes) for m in (half, double)] if len(sizes) > 1 else []
    return [[_resize(feed, dyn_axes, m)] for m in (half, double, *singles)]


def _resize(feed: Feed, axes: dict[str, list[int]], new: dict[int, int]) -> Feed:
    out = {}
    for name, arr in feed.items():
        a = np.asarray(arr)
        for axis in axes.get(name, []):
            if axis < a.ndim:
                a = np.take(a, np.arange(new[a.shape[axis]]) % a.shape[axis], axis=axis)
        out[name] = a
    return out


def verify_dynamic(candidate: onnx.ModelProto, dynamic: onnx.ModelProto, feeds: Sequence[Feed],
                   tolerance: Tolerance) -> tuple[bool, str]:
    """Does ``candidate`` match ``dynamic`` on a second input shape (the first probe the dynamic
    model itself accepts)?"""
    for probe in probe_feeds(dynamic, feeds):
        try:
            validator = Validator(dynamic, probe, default=tolerance)
        except Exception as exc:  # the original refuses this shape: try the next probe
            logger.info("probe shape refused by the dynamic model: %s", one_line(exc))
            continue
        result = validator.validate(candidate)
        shapes = ", ".join(f"{k}:{'x'.join(map(str, np.shape(v)))}" for k, v in probe[0].items())
        if result.ok:
            return True, f"verified on a second shape ({shapes})"
        return False, f"differs from the original on {shapes}: {result.summary()[:200]}"
    return False, "no second input shape that the original model accepts was found to verify it"
