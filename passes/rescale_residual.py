"""rescale-residual: scale an overflowing residual stream by 2^-k, exactly, where normalizations absorb it.

The SDXL-VAE fix (madebyollin/sdxl-vae-fp16-fix) shrank weights and biases by fine-tuning; here it is done exactly.
A tensor past FP16 range is the seed of a *region*: a set of tensors that all get multiplied by ``s = 2**-k``.
The region closes over
- producers: a Conv/ConvTranspose/Gemm/MatMul with constant weights scales its weights and bias (a *source*);
  an embedding Gather scales its table; a graph input gets a ``Mul(s)``; homogeneous ops (Relu, Reshape,
  Resize, pooling, ...) and additive ones (Add, Sub, Concat: every operand is scaled, constants included) pull
  their inputs in; a Mul/Div by a constant scales the constant;
- consumers: homogeneous and additive ops carry the scale to their outputs, a Conv/MatMul reading a scaled tensor
  passes it on once its bias is scaled too, and a normalization (InstanceNormalization, LayerNormalization,
  GroupNormalization, RMSNormalization, or a decomposed LayerNorm/RMSNorm) *absorbs* it: with eps multiplied by
  ``s**2``, ``(s*x - s*mean) / sqrt(s**2*var + s**2*eps) == (x - mean) / sqrt(var + eps)``.
Anything else reading a scaled tensor (SiLU's Sigmoid before the norm, a graph output, a square) refuses the
region, with the reason. A power-of-two factor commutes with every FP32 rounding, so the result is bit-identical
in FP32 (barring subnormals); k is chosen from measured ranges so the largest scaled tensor is <= target_absmax.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.patterns.norm_patterns import NORM_OPS, NormMatch, const_value, consumers, find_norms, measured_absmax
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX
from onnx_fp16_rewrite.io.ort_runner import infer_types
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

# Ops with out(s*x) == s*out(x) for s > 0 in their first input (other inputs are shapes, indices or parameters).
HOMOGENEOUS = {"Relu", "LeakyRelu", "Abs", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Resize", "Upsample",
               "Neg", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "DepthToSpace", "SpaceToDepth", "Split",
               "Tile", "Expand", "Pad", "Gather"}
# Ops whose float operands must all carry the same scale.
ADDITIVE = {"Add", "Sub", "Sum", "Concat", "Max", "Min", "Mean"}
# Ops with constant weights: (weight input, bias input or None).
LINEAR = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2)}
# Norm ops whose *output* can be scaled through their affine parameters.
AFFINE_INPUTS = {"InstanceNormalization": (1, 2), "LayerNormalization": (1, 2), "GroupNormalization": (1, 2),
                 "RMSNormalization": (1,)}


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


class _Refused(Exception):
    pass


@dataclass
class _Region:
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    consts: dict[tuple[int, int], tuple[gs.Node, int, int]] = field(default_factory=dict)  # -> (node, idx, power)
    inputs: dict[str, gs.Tensor] = field(default_factory=dict)
    sinks: dict[int, gs.Node | NormMatch] = field(default_factory=dict)
    absorbed: set[int] = field(default_factory=set)  # nodes of decomposed norms that absorb the scale
    linear: dict[int, gs.Node] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)

    def is_float(self, t: gs.Tensor) -> bool:
        if isinstance(t, gs.Constant):
            return np.issubdtype(np.asarray(t.values).dtype, np.floating)
        if const_value(t) is not None:
            return np.issubdtype(const_value(t).dtype, np.floating)
        return bool(t.name) and self.types.get(t.name, onnx.TensorProto.FLOAT) in _FLOAT_TYPES


class RescaleResidual(Pass):
    name = "rescale-residual"
    summary = "scale overflowing Conv/MatMul outputs and the residual stream by 2^-k into normalizations (exact)"
    auto_cost = 16  # bit-exact weight rescaling; before fuse-normalization

    def __init__(self, *, trigger_absmax: float = FP16_MAX, target_absmax: float = 16384.0,
                 nodes: Sequence[str] = ()) -> None:
        """Tensors with measured FP32 absmax above ``trigger_absmax`` seed regions; k makes every scaled tensor's
        absmax <= ``target_absmax`` (4x headroom below 65504 for inputs beyond the calibration set). ``nodes``:
        only seeds produced by these nodes (to try sites one at a time)."""
        if not 0 < target_absmax < trigger_absmax:
            raise BadInputError(f"rescale-residual: need 0 < target_absmax < trigger_absmax, got {target_absmax}, "
                                f"{trigger_absmax}")
        self.trigger_absmax = float(trigger_absmax)
        self.target_absmax = float(target_absmax)
        self.nodes = tuple(nodes)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        absmax = measured_absmax(ctx, graph)
        seeds = [t for n in graph.nodes for t in n.outputs
                 if absmax.get(t.name, 0.0) > self.trigger_absmax and (not self.nodes or n.name in self.nodes)]
        if not seeds:
            result.skipped.append(Site("-", "-", f"no tensor above {self.trigger_absmax:g} (measured FP32 absmax)"))
        norms = find_norms(graph)
        types, _ = infer_types(ctx.model)
        seen: dict[str, str] = {}
        for seed in seeds:
            producer = seed.inputs[0]
            if seed.name in seen:
                if seen[seed.name] == "refused":
                    result.skipped.append(Site(producer.name, producer.op, f"{seed.name} is in a refused region"))
                continue
            try:
                region = _close(graph, seed, norms, types)
                _check(region, graph)
                if any(seen.get(name) == "applied" for name in region.tensors):
                    raise _Refused("overlaps a region already rescaled")
            except _Refused as exc:
                partial = getattr(exc, "region", None)
                for name in (partial.tensors if partial else [seed.name]):
                    seen.setdefault(name, "refused")
                result.skipped.append(Site(producer.name, producer.op, f"{seed.name} (absmax "
                                           f"{absmax[seed.name]:.4g}) not rescaled: {exc}"))
                continue
            peak = max(absmax.get(name, 0.0) for name in region.tensors)
            if not math.isfinite(peak):
                result.skipped.append(Site(producer.name, producer.op, f"{seed.name}: non-finite range in FP32"))
                continue
            k = max(1, math.ceil(math.log2(peak / self.target_absmax)))
            detail = _apply(graph, region, k)
            for name in region.tensors:
                seen[name] = "applied"
            result.modified = True
            result.rewritten.append(Site(producer.name, producer.op, f"scaled {len(region.tensors)} tensors by "
                                         f"2^-{k} (absmax {peak:.4g} -> {peak * 2.0**-k:.4g}); {detail}; exact in FP32"))
        return result


def _close(graph: gs.Graph, seed: gs.Tensor, norms: list[NormMatch], types: dict[str, int]) -> _Region:
    """The region of ``seed``: the closure described in the module docstring; raises _Refused with a reason."""
    region = _Region(types=types)
    # An exported GroupNorm needs no pattern: its Reshape passes the scale on to the InstanceNormalization.
    readers = {(id(r), id(m.x)): m for m in norms if m.kind != "group" for r in m.readers}
    outputs = {t.name for t in graph.outputs}
    work: list[gs.Tensor] = []

    def join(t: gs.Tensor) -> None:
        if isinstance(t, gs.Constant):
            raise _Refused(f"constant {t.name} would have to be scaled in place")
        if t.name not in region.tensors:
            region.tensors[t.name] = t
            work.append(t)

    def scale_const(node: gs.Node, idx: int, power: int = 1) -> None:
        region.consts[(id(node), idx)] = (node, idx, power)

    join(seed)
    try:
        while work:
            t = work.pop()
            if t.name in outputs:
                raise _Refused(f"{t.name} is a graph output (its values would change)")
            _backward(t, join, scale_const, region)
            for c in consumers(t):
                _forward(c, t, join, scale_const, region, readers)
    except _Refused as exc:
        exc.region = region  # type: ignore[attr-defined]
        raise
    return region


def _backward(t: gs.Tensor, join, scale_const, region: _Region) -> None:
    """Make the producer of ``t`` produce ``s * t``."""
    if not t.inputs:
        region.inputs[t.name] = t
        return
    p = t.inputs[0]
    floats = [(i, x) for i, x in enumerate(p.inputs) if region.is_float(x)]
    if p.op in LINEAR or (p.op == "MatMul" and const_value(p.inputs[1]) is not None):
        region.linear[id(p)] = p
    elif p.op == "Gather" and const_value(p.inputs[0]) is not None:
        scale_const(p, 0)                             # an embedding table
    elif p.op in HOMOGENEOUS and not (p.op == "Pad" and not _zero_pad(p)):
        join(p.inputs[0])
    elif p.op in ADDITIVE:
        for i, x in floats:
            if const_value(x) is not None:
                scale_const(p, i)
            else:
                join(x)
    elif p.op in ("Mul", "Div") or (p.op == "MatMul"):
        const = [i for i, x in floats if const_value(x) is not None]
        if any(x.name in region.tensors for _, x in floats):
            pass                                      # already scaled through an operand (checked in _check)
        elif const and (p.op != "Div" or const == [1]):
            scale_const(p, const[0], -1 if p.op == "Div" else 1)
        else:
            join(p.inputs[0])                         # the numerator / first factor
    elif p.op in AFFINE_INPUTS and all(const_value(p.inputs[i]) is not None for i in AFFINE_INPUTS[p.op]
                                       if i < len(p.inputs)):
        for i in AFFINE_INPUTS[p.op]:
            if i < len(p.inputs):
                scale_const(p, i)
    else:
        raise _Refused(f"{t.name} comes from {p.op} {p.name}, which cannot produce a scaled value")


def _forward(c: gs.Node, t: gs.Tensor, join, scale_const, region: _Region, readers: dict) -> None:
    """Check that consumer ``c`` of the scaled tensor ``t`` absorbs the scale or passes it on."""
    if c.op in ("Shape", "Size"):
        return
    if c.op in NORM_OPS and c.inputs[0] is t:
        region.sinks[id(c)] = c
        return
    match = readers.get((id(c), id(t)))
    if match is not None:
        region.sinks[id(match)] = match
        region.absorbed.update(id(n) for n in match.readers)
        return
    float_outs = [o for o in c.outputs if region.is_float(o)]
    if c.op in HOMOGENEOUS and c.inputs[0] is t and not (c.op == "Pad" and not _zero_pad(c)):
        for o in float_outs:
            join(o)
    elif c.op in ADDITIVE:
        for i, x in enumerate(c.inputs):
            if region.is_float(x) and const_value(x) is not None:
                scale_const(c, i)
            elif region.is_float(x):
                join(x)
        for o in float_outs:
            join(o)
    elif c.op in LINEAR or (c.op == "MatMul" and const_value(c.inputs[1]) is not None):
        if c.inputs[0] is not t:
            raise _Refused(f"{t.name} is a weight of {c.op} {c.name}")
        region.linear[id(c)] = c
        join(c.outputs[0])
    elif c.op in ("Mul", "MatMul") or (c.op == "Div" and c.inputs[0] is t):
        join(c.outputs[0])
    else:
        hint = " (SiLU/Sigmoid before the norm)" if c.op in ("Sigmoid", "Tanh", "Softplus") else ""
        raise _Refused(f"{c.op} {c.name} reads {t.name} and is not scale invariant{hint}")


def _check(region: _Region, graph: gs.Graph) -> None:
    """Verify that every node touching the region maps scale exponents consistently (1 = scaled by s)."""
    def power(node: gs.Node, i: int) -> int:
        x = node.inputs[i]
        if (id(node), i) in region.consts:
            return region.consts[(id(node), i)][2]
        return 1 if x.name in region.tensors else 0

    for p in list(region.linear.values()):
        w_idx, b_idx = LINEAR.get(p.op, (1, None))
        data_scaled = p.inputs[0].name in region.tensors
        if not data_scaled:
            region.consts[(id(p), w_idx)] = (p, w_idx, 1)
        if b_idx is not None and b_idx < len(p.inputs):
            region.consts[(id(p), b_idx)] = (p, b_idx, 1)
    touched = {id(n): n for t in region.tensors.values() for n in list(t.inputs) + consumers(t)}
    touched.update({id(n): n for n, _, _ in region.consts.values()})
    for node in touched.values():
        if id(node) in region.sinks or id(node) in region.absorbed or node.op in ("Shape", "Size"):
            continue
        ins = [power(node, i) for i, x in enumerate(node.inputs) if region.is_float(x)]
        outs = {1 if o.name in region.tensors else 0 for o in node.outputs if region.is_float(o)}
        if len(outs) != 1:
            raise _Refused(f"{node.op} {node.name} would produce mixed scales")
        out = outs.pop()
        if node.op in ("Mul", "MatMul"):
            ok = sum(ins) == out                      # bilinear: the scales multiply
        elif node.op == "Div":
            ok = ins[0] - ins[1] == out
        elif node.op in LINEAR:
            ok = ins[0] + ins[1] == out and all(v == out for v in ins[2:])
        elif node.op in AFFINE_INPUTS:                # a norm producing the stream: its gamma/beta carry the scale
            ok = ins[0] == 0 and all(v == out for v in ins[1:])
        elif node.op in HOMOGENEOUS:
            ok = ins[0] == out
        else:                                         # additive: every operand at the output's scale
            ok = all(v == out for v in ins)
        if not ok:
            raise _Refused(f"{node.op} {node.name} would mix scaled and unscaled operands")


def _apply(graph: gs.Graph, region: _Region, k: int) -> str:
    s = np.float32(2.0**-k)
    for node, idx, pw in region.consts.values():
        old = node.inputs[idx]
        values = const_value(old)
        new = np.asarray(values * np.float32(s) ** pw, dtype=values.dtype)
        shared = len(consumers(old)) > 1 or list(node.inputs).count(old) > 1 or not isinstance(old, gs.Constant)
        node.inputs[idx] = gs.Constant(f"{old.name}_x2^{-k * pw}" if shared else old.name, new)
    for t in region.inputs.values():
        scaled = gs.Variable(f"{t.name}_x2^-{k}", dtype=t.dtype, shape=t.shape)
        readers = consumers(t)
        graph.nodes.append(gs.Node("Mul", f"/rescale/{t.name}/Mul", inputs=[t, gs.Constant(f"/rescale/{t.name}.s",
                                                                                            np.asarray(s))],
                                   outputs=[scaled]))
        for r in readers:
            for i, x in enumerate(r.inputs):
                if x is t:
                    r.inputs[i] = scaled
    sinks = []
    for sink in region.sinks.values():
        if isinstance(sink, NormMatch):
            assert sink.eps_node is not None
            i = 0 if const_value(sink.eps_node.inputs[0]) is not None else 1
            old = sink.eps_node.inputs[i]
            values = const_value(old)
            sink.eps_node.inputs[i] = gs.Constant(f"{old.name}_x2^-{2 * k}", np.asarray(values * s * s, values.dtype))
            sinks.append(f"{sink.kind} norm {sink.anchor.name}")
        else:
            eps = float(sink.attrs.get("epsilon", NORM_OPS[sink.op]))
            sink.attrs["epsilon"] = float(np.float32(eps) * s * s)
            sinks.append(f"{sink.op} {sink.name}")
    sources = [n.name for n, i, _ in region.consts.values() if n.op in LINEAR or n.op in ("MatMul", "Gather")]
    sources += [f"input {t.name}" for t in region.inputs.values()]
    logger.info("rescale-residual: %d tensors by 2^-%d", len(region.tensors), k)
    return (f"weights/biases of {', '.join(sorted(set(sources))) or 'none'}; eps x 2^-{2 * k} in "
            f"{', '.join(sinks) or 'no norm'}")


def _zero_pad(node: gs.Node) -> bool:
    """Pad is homogeneous unless it pads with a non-zero constant."""
    if node.attrs.get("mode", "constant") != "constant":
        return True
    value = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    return value is None or not np.any(value)
