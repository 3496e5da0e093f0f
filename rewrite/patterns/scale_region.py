"""Scale regions: tensors that can all be multiplied by powers of ``s = 2**-k`` without changing the graph's outputs.

A region maps tensors to integer *powers* p (the tensor becomes ``s**p * t``). It closes over producers and
consumers of a seed (an over-range tensor) by what each op means:
- homogeneous ops (Relu, Reshape, pooling, CumSum, a Cast between float types, ...) keep p; additive ones (Add,
  Sub, Concat, Where's branches, Max, ...) need the same p on every float operand (constants are scaled);
- a Conv/Gemm/MatMul with constant weights scales its weights by ``p_out - p_in`` and its bias by ``p_out``: it
  passes a scale on, or its weights absorb it (Conv -> Relu -> Conv balanced by a power of two);
- products (Mul, MatMul, Einsum: linear in each operand) add their operands' powers, Div subtracts them, so a
  ratio of two equally scaled tensors (causal linear attention's ``q.cumsum(k x v) / q.cumsum(k)``) is unscaled;
  Sqrt halves p, Pow(x, c) multiplies it by c, Reciprocal negates it, Mul(x, x) doubles it;
- a normalization absorbs any p (eps times ``s**2p``), and so does Log: ``log(s**p x) = log(x) - p*k*ln2``, and
  the constant is added back after it;
- a graph input, or an in-range tensor whose producer cannot make a scaled value (Elu, Sigmoid, ...), gets a
  ``Mul(s**p)`` in front of its readers.
Where a producer offers several ways to be scaled (which operand of a product; a linear op's weights or its
input), the closure picks the first and the search tries the others when the region is refused: a ratio
needs both terms scaled through their shared factor, and weights must not sink into FP16 subnormals.
A power-of-two factor commutes with every FP32 rounding, so everything but the Log correction is bit-exact
in FP32 (barring subnormals); the Log correction is one rounding of ``p*k*ln2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.pipeline.graph_edit import const_value
from onnx_fp16_rewrite.patterns.norm_patterns import NORM_OPS, NormMatch, consumers
from onnx_fp16_rewrite.fp16_limits import FP16_MAX


# Ops with out(s*x) == s*out(x) for s > 0 in their first input (other inputs are shapes, indices or parameters).
HOMOGENEOUS = {"Relu", "LeakyRelu", "Abs", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Resize", "Upsample",
               "Neg", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "DepthToSpace",
               "SpaceToDepth", "Split", "Tile", "Expand", "Pad", "Gather", "CumSum"}
# Ops whose float operands must all carry the same scale.
ADDITIVE = {"Add", "Sub", "Sum", "Concat", "Max", "Min", "Mean", "Where"}
# Ops with constant weights: (weight input, bias input or None).
LINEAR = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1, None)}
PRODUCTS = {"Mul", "MatMul", "Einsum", "Div"}
# Norm ops whose *output* can be scaled through their affine parameters.
AFFINE_INPUTS = {"InstanceNormalization": (1, 2), "LayerNormalization": (1, 2), "GroupNormalization": (1, 2),
                 "RMSNormalization": (1,)}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


class Refused(Exception):
    """The region cannot be scaled; the message says why. ``region``: what had been collected."""

    def __init__(self, reason: str, region: "Region | None" = None) -> None:
        super().__init__(reason)
        self.region = region


@dataclass
class Region:
    powers: dict[str, int] = field(default_factory=dict)
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    consts: dict[tuple[int, int], tuple[gs.Node, int, int]] = field(default_factory=dict)  # -> (node, idx, power)
    inputs: dict[str, gs.Tensor] = field(default_factory=dict)   # a Mul(s**p) goes in front of their readers
    sinks: dict[int, tuple[gs.Node | NormMatch, int]] = field(default_factory=dict)  # norms: eps * s**2p
    logs: dict[int, tuple[gs.Node, int]] = field(default_factory=dict)             # Log: + p*k*ln2 after it
    absorbed: set[int] = field(default_factory=set)  # nodes of decomposed norms that absorb the scale
    linear: dict[int, gs.Node] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    types: dict[str, int] = field(default_factory=dict)
    choices: list[tuple[int, int]] = field(default_factory=list)  # (node id, number of options) met on the way

    def is_float(self, t: gs.Tensor) -> bool:
        if isinstance(t, gs.Constant):
            return np.issubdtype(np.asarray(t.values).dtype, np.floating)
        value = const_value(t)
        if value is not None:
            return np.issubdtype(value.dtype, np.floating)
        return bool(t.name) and self.types.get(t.name, onnx.TensorProto.FLOAT) in _FLOAT_TYPES

    def power(self, node: gs.Node, i: int) -> int:
        """The power of ``node``'s input ``i`` as the node reads it."""
        if (id(node), i) in self.consts:
            return self.consts[(id(node), i)][2]
        return self.powers.get(node.inputs[i].name, 0)

    def out_power(self, t: gs.Tensor) -> int:
        """The power of ``t`` as its producer makes it (a tensor scaled by an inserted Mul is produced unscaled)."""
        return 0 if t.name in self.inputs else self.powers.get(t.name, 0)


def float_cast(node: gs.Node, region: Region) -> bool:
    """A Cast from a float type to a float type: homogeneous (a no-op Cast(to=FLOAT) on FLOAT above all)."""
    to = node.attrs.get("to")
    return node.op == "Cast" and to in _FLOAT_TYPES and region.is_float(node.inputs[0])


def _zero_pad(node: gs.Node) -> bool:
    """Pad is homogeneous unless it pads with a non-zero constant."""
    if node.attrs.get("mode", "constant") != "constant":
        return True
    value = const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    return value is None or not np.any(value)


def _int_exponent(node: gs.Node) -> int | None:
    value = const_value(node.inputs[1]) if node.op == "Pow" and len(node.inputs) > 1 else None
    if value is None or value.size != 1 or float(value.reshape(-1)[0]) != int(value.reshape(-1)[0]):
        return None
    return int(value.reshape(-1)[0]) or None


def _is_linear(node: gs.Node) -> bool:
    return node.op in LINEAR and len(node.inputs) > 1 and const_value(node.inputs[1]) is not None \
        and const_value(node.inputs[0]) is None


def _homogeneous(node: gs.Node, region: Region) -> bool:
    return (node.op in HOMOGENEOUS and not (node.op == "Pad" and not _zero_pad(node))) or float_cast(node, region)


def close(graph: gs.Graph, seed: gs.Tensor, readers: dict, types: dict[str, int], absmax: dict[str, float],
          forced: dict[int, int]) -> Region:
    """The region of ``seed`` (power 1) under the choices ``forced`` (node id -> option); raises Refused."""
    region = _Closure(graph, readers, types, absmax, forced)
    try:
        region.run(seed)
    except Refused as exc:
        exc.region = region.region
        raise
    return region.region


class _Closure:
    def __init__(self, graph, readers, types, absmax, forced) -> None:
        self.region = Region(types=types)
        self.readers, self.absmax, self.forced = readers, absmax, forced
        self.outputs = {t.name for t in graph.outputs}
        self.order = {id(n): i for i, n in enumerate(graph.nodes)}
        self.work: list[gs.Tensor] = []
        self.pending: dict[int, gs.Node] = {}

    def join(self, t: gs.Tensor, p: int) -> None:
        r = self.region
        if t.name in r.powers:
            if r.powers[t.name] != p:
                raise Refused(f"{t.name} would need two scales (2^-{r.powers[t.name]}k and 2^-{p}k)")
            return
        if p == 0:
            return
        if isinstance(t, gs.Constant) or (t.inputs and const_value(t) is not None):
            raise Refused(f"constant {t.name} would have to be scaled in place")
        r.powers[t.name], r.tensors[t.name] = p, t
        self.work.append(t)

    def scale_const(self, node: gs.Node, idx: int, p: int) -> None:
        if p:
            self.region.consts[(id(node), idx)] = (node, idx, p)

    def choose(self, node: gs.Node, options: int) -> int:
        self.region.choices.append((id(node), options))
        return self.forced.get(id(node), 0)

    def run(self, seed: gs.Tensor) -> None:
        self.seed = seed
        self.join(seed, 1)
        while self.work or self.pending:
            while self.work:
                t = self.work.pop()
                if t.name in self.outputs:
                    raise Refused(f"{t.name} is a graph output (its values would change)")
                self.backward(t, self.region.powers[t.name])
                for c in consumers(t):
                    self.forward(c, t, self.region.powers[t.name])
            if self.pending:  # the earliest product first: its operands are settled by now
                key = min(self.pending, key=lambda i: self.order.get(i, 0))
                node = self.pending.pop(key)
                ins = [self.region.power(node, i) for i in range(len(node.inputs)) if self.region.is_float(node.inputs[i])]
                self.join(node.outputs[0], ins[0] - ins[1] if node.op == "Div" else sum(ins))

    def backward(self, t: gs.Tensor, p: int) -> None:
        """Make the producer of ``t`` produce ``s**p * t``."""
        r = self.region
        if not t.inputs:
            r.inputs[t.name] = t
            return
        if t.name in r.inputs:
            return
        n = t.inputs[0]
        floats = [(i, x) for i, x in enumerate(n.inputs) if r.is_float(x)]
        if _is_linear(n):
            r.linear[id(n)] = n                       # weights or input: settled in finish()
            if self.choose(n, 2) == 1:
                self.join(n.inputs[0], p)
        elif n.op == "Gather" and const_value(n.inputs[0]) is not None:
            self.scale_const(n, 0, p)                 # an embedding table
        elif n.op == "Clip":
            self._clip(n, p)
            self.join(n.inputs[0], p)
        elif _homogeneous(n, r):
            self.join(n.inputs[0], p)
        elif n.op in ADDITIVE:
            for i, x in floats:
                self.scale_const(n, i, p) if const_value(x) is not None else self.join(x, p)
        elif n.op in PRODUCTS and len(floats) >= 2:
            self._backward_product(n, floats, p)
        elif n.op == "Sqrt":
            self.join(n.inputs[0], 2 * p)
        elif n.op == "Reciprocal":
            self.join(n.inputs[0], -p)
        elif n.op == "Pow" and _int_exponent(n) and p % _int_exponent(n) == 0:
            self.join(n.inputs[0], p // _int_exponent(n))
        elif n.op in AFFINE_INPUTS and all(const_value(n.inputs[i]) is not None for i in AFFINE_INPUTS[n.op]
                                           if i < len(n.inputs)):
            for i in AFFINE_INPUTS[n.op]:
                if i < len(n.inputs):
                    self.scale_const(n, i, p)
        elif t is not self.seed and self.absmax.get(t.name, math.inf) <= FP16_MAX / 2 and \
                all(self.absmax.get(x.name, 0.0) <= FP16_MAX for x in n.inputs):
            # In range and made from in-range values: scaling it right after its producer keeps FP16 working.
            r.inputs[t.name] = t
            r.notes.append(f"Mul after {t.name} ({n.op} cannot produce a scaled value)")
        else:
            raise Refused(f"{t.name} comes from {n.op} {n.name}, which cannot produce a scaled value")

    def _clip(self, node: gs.Node, p: int) -> None:
        """Clip(s**p x, s**p lo, s**p hi) = s**p Clip(x, lo, hi): the bounds are scaled (opset >= 11 inputs)."""
        if "min" in node.attrs or "max" in node.attrs:
            raise Refused(f"Clip {node.name} has its bounds as attributes (opset < 11)")
        for i in (1, 2):
            if i < len(node.inputs) and node.inputs[i].name:
                if const_value(node.inputs[i]) is None:
                    raise Refused(f"Clip {node.name} has bounds computed at run time")
                self.scale_const(node, i, p)

    def _backward_product(self, n: gs.Node, floats: list, p: int) -> None:
        r = self.region
        if any(x.name in r.powers for _, x in floats):
            return                                    # already scaled through an operand (checked later)
        if n.op == "Mul" and floats[0][1] is floats[1][1]:
            if p % 2:
                raise Refused(f"{n.name} squares {floats[0][1].name}: an odd power cannot come from a square")
            self.join(floats[0][1], p // 2)
            return
        const = [i for i, x in floats if const_value(x) is not None]
        if const and (n.op != "Div" or const == [1]):
            self.scale_const(n, const[0], -p if n.op == "Div" else p)
            return
        acts = [i for i, x in floats if const_value(x) is None]
        pick = acts[self.choose(n, len(acts)) % len(acts)]
        self.join(n.inputs[pick], -p if (n.op == "Div" and pick == 1) else p)

    def forward(self, c: gs.Node, t: gs.Tensor, p: int) -> None:
        """Consumer ``c`` of ``t`` absorbs the scale or passes it on."""
        r = self.region
        if c.op in ("Shape", "Size"):
            return
        if c.op in NORM_OPS and c.inputs[0] is t:
            r.sinks[id(c)] = (c, p)
            return
        match = self.readers.get((id(c), id(t)))
        if match is not None:
            r.sinks[id(match)] = (match, p)
            r.absorbed.update(id(n) for n in match.readers)
            return
        if c.op == "Log":
            r.logs[id(c)] = (c, p)
            return
        outs = [o for o in c.outputs if r.is_float(o)]
        if _homogeneous(c, r) and c.inputs[0] is t:
            for o in outs:
                self.join(o, p)
        elif c.op == "Clip" and c.inputs[0] is t:
            self._clip(c, p)
            self.join(c.outputs[0], p)
        elif c.op in ADDITIVE:
            for i, x in enumerate(c.inputs):
                if r.is_float(x):
                    self.scale_const(c, i, p) if const_value(x) is not None else self.join(x, p)
            for o in outs:
                self.join(o, p)
        elif _is_linear(c):
            if c.inputs[0] is not t:
                raise Refused(f"{t.name} is a weight of {c.op} {c.name}")
            r.linear[id(c)] = c
            if self.choose(c, 2) == 0:
                self.join(c.outputs[0], p)
            # else its weights absorb the scale (times s**-p) and its output is unscaled: Conv -> Relu -> Conv
            # range balancing by a power of two (cross-layer equalisation, Nagel et al. 2019)
        elif c.op in PRODUCTS:
            others = [x for x in c.inputs if x is not t and r.is_float(x) and const_value(x) is None]
            if c.op == "Mul" and c.inputs[0] is t and c.inputs[1] is t:
                self.join(c.outputs[0], 2 * p)
            elif others:
                self.pending[id(c)] = c               # settled once the other operand's scale is known
            else:
                self.join(c.outputs[0], -p if (c.op == "Div" and c.inputs[1] is t) else p)
        elif c.op == "Sqrt" and p % 2 == 0:
            self.join(c.outputs[0], p // 2)
        elif c.op == "Reciprocal":
            self.join(c.outputs[0], -p)
        elif c.op == "Pow" and c.inputs[0] is t and _int_exponent(c):
            self.join(c.outputs[0], p * _int_exponent(c))
        else:
            hint = " (SiLU/Sigmoid before the norm)" if c.op in ("Sigmoid", "Tanh", "Softplus") else ""
            raise Refused(f"{c.op} {c.name} reads {t.name} and is not scale invariant{hint}")


def finish(region: Region) -> None:
    """Settle the weights and biases of linear ops, then verify every node maps powers consistently."""
    for n in region.linear.values():
        w, b = LINEAR[n.op]
        out, data = region.out_power(n.outputs[0]), region.powers.get(n.inputs[0].name, 0)
        region.consts.pop((id(n), w), None)
        if out - data:
            region.consts[(id(n), w)] = (n, w, out - data)
        if b is not None and b < len(n.inputs) and n.inputs[b].name and out:
            region.consts[(id(n), b)] = (n, b, out)
    touched = {id(n): n for t in region.tensors.values() for n in list(t.inputs) + consumers(t)}
    touched.update({id(n): n for n, _, _ in region.consts.values()})
    for node in touched.values():
        if id(node) in region.sinks or id(node) in region.absorbed or id(node) in region.logs \
                or node.op in ("Shape", "Size"):
            continue
        ins = [region.power(node, i) for i, x in enumerate(node.inputs) if region.is_float(x)]
        outs = {region.out_power(o) for o in node.outputs if region.is_float(o)}
        if len(outs) != 1:
            raise Refused(f"{node.op} {node.name} would produce mixed scales", region)
        out = outs.pop()
        if node.op in LINEAR and id(node) in region.linear:
            w, b = LINEAR[node.op]
            ok = region.power(node, 0) + region.power(node, w) == out and \
                (b is None or b >= len(node.inputs) or not node.inputs[b].name or region.power(node, b) == out)
        elif node.op in ("Mul", "MatMul", "Einsum"):
            ok = sum(ins) == out
        elif node.op == "Div":
            ok = ins[0] - ins[1] == out
        elif node.op in AFFINE_INPUTS:
            ok = ins[0] == 0 and all(v == out for v in ins[1:])
        elif node.op == "Sqrt":
            ok = ins[0] == 2 * out
        elif node.op == "Reciprocal":
            ok = ins[0] == -out
        elif node.op == "Pow":
            ok = _int_exponent(node) is not None and ins[0] * _int_exponent(node) == out
        elif node.op == "Clip" or _homogeneous(node, region):
            ok = ins[0] == out and (node.op != "Clip" or all(v == out for v in ins[1:]))
        elif node.op in ADDITIVE:
            ok = all(v == out for v in ins)
        else:                                         # an op that produces a tensor scaled by an inserted Mul
            ok = all(v == 0 for v in ins) and out == 0
        if not ok:
            raise Refused(f"{node.op} {node.name} would mix scaled and unscaled operands", region)
