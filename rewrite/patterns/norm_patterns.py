"""Recognising normalizations as exporters write them, shared by fuse-normalization and rescale-residual.

Three decomposed forms are matched on a graphsurgeon graph:
- LayerNorm (torch.onnx below opset 17): ``ReduceMean -> Sub -> Pow(2)|Mul(d,d) -> ReduceMean -> Add(eps) -> Sqrt
  -> Div|Reciprocal+Mul [-> Mul(gamma)] [-> Add(beta)]``;
- RMSNorm / T5LayerNorm: ``Pow(2)|Mul(x,x) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal|Div(1,.) -> Mul(x,.)``
  or ``-> Div(x, .)``, ``[-> Mul(weight)]``;
- GroupNorm as PyTorch exports it: ``Reshape([0,G,-1]) -> InstanceNormalization -> Reshape(Shape(x)) [-> Mul(gamma)]
  [-> Add(beta)]``.
A match records every node of the pattern, the nodes that read the normalized tensor ``x`` (a pass that scales
``x`` rewires exactly those), and the eps constant (which a scaling by ``s`` must multiply by ``s**2``).
Matches are strict: every intermediate tensor must be read only inside the pattern, so replacing the nodes can
never change a value someone else reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.pipeline.graph_edit import const_value

if TYPE_CHECKING:
    from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

# Ops whose epsilon attribute makes them scale invariant once it is multiplied by s**2.
NORM_OPS = {"InstanceNormalization": 1e-5, "LayerNormalization": 1e-5, "GroupNormalization": 1e-5,
            "RMSNormalization": 1e-5}


@dataclass
class NormMatch:
    """One decomposed normalization. ``kind``: layer, rms or group."""

    kind: str
    x: gs.Tensor
    nodes: list[gs.Node]
    readers: list[gs.Node]          # nodes of the pattern that read x
    output: gs.Tensor               # the last tensor of the pattern (what consumers read)
    eps: float
    eps_node: gs.Node | None        # Add(var, eps) (layer/rms) or None (group: attribute of the IN node)
    axes: list[int] = field(default_factory=list)
    square_input: gs.Tensor | None = None   # the tensor squared (layer: x - mean, rms: x)
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    groups: int = 0
    inorm: gs.Node | None = None
    group_affine: tuple[np.ndarray, np.ndarray] | None = None  # InstanceNormalization's per-group scale, bias

    @property
    def anchor(self) -> gs.Node:
        return self.nodes[0]


def measured_absmax(ctx: "PassContext", graph: gs.Graph) -> dict[str, float]:
    """FP32 absmax of every tensor a node produces (``ctx.tensor_absmax``) and of every float graph input (from
    the feeds, which the profile does not cover)."""
    absmax = dict(ctx.tensor_absmax())
    for t in graph.inputs:
        values = [np.asarray(f[t.name]) for f in ctx.feeds if t.name in f]
        if values and all(np.issubdtype(v.dtype, np.floating) for v in values):
            absmax[t.name] = max(float(np.abs(v).max(initial=0.0)) for v in values)
    return absmax


def scalar(t: gs.Tensor | None) -> float | None:
    """A one-element float constant's value."""
    v = const_value(t)
    if v is None or v.size != 1 or not np.issubdtype(v.dtype, np.floating):
        return None
    return float(v.reshape(-1)[0])


def consumers(t: gs.Tensor) -> list[gs.Node]:
    """The nodes reading ``t``, each once (graphsurgeon lists ``Mul(t, t)`` twice)."""
    seen: dict[int, gs.Node] = {}
    for node in t.outputs:
        seen.setdefault(id(node), node)
    return list(seen.values())


def sole_consumer(t: gs.Tensor, op: str | tuple[str, ...] | None, outputs: set[str]) -> gs.Node | None:
    """The only node reading ``t`` (of type ``op`` when given), when ``t`` is not a graph output."""
    readers = consumers(t)
    if len(readers) != 1 or t.name in outputs:
        return None
    ops = (op,) if isinstance(op, str) else op
    return readers[0] if ops is None or readers[0].op in ops else None


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """For a binary node reading ``t`` once, its other input."""
    ins = list(node.inputs)
    if len(ins) != 2 or ins.count(t) != 1:
        return None
    return ins[1] if ins[0] is t else ins[0]


def reduce_axes(node: gs.Node) -> list[int] | None:
    """Axes of a ReduceMean/ReduceSum/ReduceMax with keepdims=1 (attribute or constant input)."""
    if node.attrs.get("keepdims", 1) != 1:
        return None
    if len(node.inputs) > 1:
        axes = const_value(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def is_square(node: gs.Node, x: gs.Tensor) -> bool:
    """``Pow(x, 2)`` or ``Mul(x, x)``."""
    if node.op == "Pow":
        return len(node.inputs) == 2 and node.inputs[0] is x and scalar(node.inputs[1]) == 2.0
    return node.op == "Mul" and len(node.inputs) == 2 and node.inputs[0] is x and node.inputs[1] is x


def trailing_axes(axes: list[int], rank: int | None) -> int | None:
    """The first axis when ``axes`` are the trailing axes of a tensor (LayerNormalization's ``axis``), else None."""
    norm = sorted(a + rank if a < 0 and rank is not None else a for a in axes)
    if rank is None:
        if all(a < 0 for a in axes) and norm == list(range(-len(axes), 0)):
            return -len(axes)
        return None
    return norm[0] if norm == list(range(rank - len(axes), rank)) else None


class _Chain:
    """Walks a single-consumer chain, collecting nodes; any failure makes ``ok`` False."""

    def __init__(self, outputs: set[str]) -> None:
        self.nodes: list[gs.Node] = []
        self.outputs = outputs

    def next(self, t: gs.Tensor, op: str | tuple[str, ...]) -> gs.Node | None:
        node = sole_consumer(t, op, self.outputs)
        if node is not None:
            self.nodes.append(node)
        return node


def _rsqrt_tail(chain: _Chain, var: gs.Tensor, numerator: gs.Tensor) -> tuple[gs.Node, gs.Tensor, float] | None:
    """``Add(var, eps) -> Sqrt -> Div(numerator, .)`` or ``-> Reciprocal|Div(1,.) -> Mul(numerator, .)``.
    Returns (the Add node, the normalized tensor, eps)."""
    add = chain.next(var, "Add")
    if add is None:
        return None
    eps = scalar(other_input(add, var))
    sqrt = chain.next(add.outputs[0], "Sqrt") if eps is not None and eps >= 0 else None
    if sqrt is None:
        return None
    std = sqrt.outputs[0]
    nxt = chain.next(std, ("Div", "Reciprocal"))
    if nxt is None:
        return None
    if nxt.op == "Div":
        if nxt.inputs[1] is not std:
            return None
        if nxt.inputs[0] is numerator:
            return add, nxt.outputs[0], eps
        if scalar(nxt.inputs[0]) != 1.0:
            return None
    mul = chain.next(nxt.outputs[0], "Mul")
    if mul is None or other_input(mul, nxt.outputs[0]) is not numerator:
        return None
    return add, mul.outputs[0], eps


def _affine(chain: _Chain, t: gs.Tensor, want_bias: bool) -> tuple[gs.Tensor, np.ndarray | None, np.ndarray | None]:
    """Optional ``Mul(., gamma)`` then ``Add(., beta)`` with constant operands."""
    gamma = beta = None
    node = sole_consumer(t, "Mul", chain.outputs)
    if node is not None and const_value(other_input(node, t)) is not None:
        gamma = const_value(other_input(node, t))
        chain.nodes.append(node)
        t = node.outputs[0]
    node = sole_consumer(t, "Add", chain.outputs) if want_bias else None
    if node is not None and const_value(other_input(node, t)) is not None:
        beta = const_value(other_input(node, t))
        chain.nodes.append(node)
        t = node.outputs[0]
    return t, gamma, beta


def match_layer_norm(mean: gs.Node, outputs: set[str]) -> NormMatch | None:
    """Anchor: the first ReduceMean of a decomposed LayerNorm. ``outputs``: the graph's output names."""
    if mean.op != "ReduceMean" or not mean.inputs:
        return None
    x, axes = mean.inputs[0], reduce_axes(mean)
    chain = _Chain(outputs)
    chain.nodes.append(mean)
    sub = chain.next(mean.outputs[0], "Sub")
    if axes is None or sub is None or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return None
    d = sub.outputs[0]
    # d is read twice: by the square and by the final Div/Mul.
    squares = [n for n in consumers(d) if is_square(n, d)]
    if len(squares) != 1 or len(consumers(d)) != 2 or d.name in outputs:
        return None
    chain.nodes.append(squares[0])
    var = chain.next(squares[0].outputs[0], "ReduceMean")
    if var is None or reduce_axes(var) != axes:
        return None
    tail = _rsqrt_tail(chain, var.outputs[0], d)
    if tail is None:
        return None
    add, normed, eps = tail
    out, gamma, beta = _affine(chain, normed, want_bias=True)
    return NormMatch("layer", x, chain.nodes, [mean, sub], out, eps, add, axes, d, gamma, beta)


def match_rms_norm(square: gs.Node, outputs: set[str]) -> NormMatch | None:
    """Anchor: the Pow(x, 2) / Mul(x, x) of a decomposed RMSNorm."""
    if not square.inputs or not is_square(square, square.inputs[0]):
        return None
    x = square.inputs[0]
    chain = _Chain(outputs)
    chain.nodes.append(square)
    var = chain.next(square.outputs[0], "ReduceMean")
    axes = reduce_axes(var) if var is not None else None
    if axes is None:
        return None
    tail = _rsqrt_tail(chain, var.outputs[0], x)
    if tail is None:
        return None
    add, normed, eps = tail
    out, gamma, _ = _affine(chain, normed, want_bias=False)
    readers = [n for n in chain.nodes if any(i is x for i in n.inputs)]
    return NormMatch("rms", x, chain.nodes, readers, out, eps, add, axes, x, gamma, None)


def match_group_norm(inorm: gs.Node, outputs: set[str]) -> NormMatch | None:
    """Anchor: the InstanceNormalization of an exported GroupNorm."""
    if inorm.op != "InstanceNormalization" or len(inorm.inputs) != 3:
        return None
    grouped = inorm.inputs[0]
    if len(grouped.inputs) != 1 or grouped.inputs[0].op != "Reshape" or sole_consumer(grouped, None, outputs) is None:
        return None
    reshape_in = grouped.inputs[0]
    x, target = reshape_in.inputs[0], const_value(reshape_in.inputs[1])
    scale, bias = const_value(inorm.inputs[1]), const_value(inorm.inputs[2])
    if target is None or target.size != 3 or int(target[2]) != -1 or scale is None or bias is None:
        return None
    groups = int(target[1])
    chain = _Chain(outputs)
    chain.nodes += [reshape_in, inorm]
    reshape_out = chain.next(inorm.outputs[0], "Reshape")
    if reshape_out is None or groups != scale.size or groups != bias.size:
        return None
    shape_src = reshape_out.inputs[1]
    from_shape = len(shape_src.inputs) == 1 and shape_src.inputs[0].op == "Shape" and shape_src.inputs[0].inputs[0] is x
    if not from_shape and const_value(shape_src) is None:
        return None
    out, gamma, beta = _affine(chain, reshape_out.outputs[0], want_bias=True)
    # PyTorch exports the per-group affine of the InstanceNormalization as ones/zeros; the fusion folds any
    # other values into per-channel terms.
    return NormMatch("group", x, chain.nodes, [reshape_in], out, float(inorm.attrs.get("epsilon", 1e-5)), None,
                     gamma=gamma, beta=beta, groups=groups, inorm=inorm,
                     group_affine=(scale.reshape(-1), bias.reshape(-1)))


def remove_nodes(graph: gs.Graph, nodes: list[gs.Node]) -> None:
    """Detach and drop ``nodes`` (by identity: graphsurgeon nodes compare by value); their outputs become free
    for a replacement to produce."""
    doomed = {id(n) for n in nodes}
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()
    graph.nodes = [n for n in graph.nodes if id(n) not in doomed]


def find_norms(graph: gs.Graph) -> list[NormMatch]:
    """Every decomposed normalization of ``graph``, in node order; LayerNorm wins over the RMS pattern that
    its centred half would also match."""
    found: list[NormMatch] = []
    taken: set[int] = set()
    outputs = {t.name for t in graph.outputs}
    for matcher in (match_layer_norm, match_group_norm, match_rms_norm):
        for node in graph.nodes:
            if id(node) in taken:
                continue
            m = matcher(node, outputs)
            if m is not None and not any(id(n) in taken for n in m.nodes):
                found.append(m)
                taken.update(id(n) for n in m.nodes)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    found.sort(key=lambda m: order[id(m.anchor)])
    logger.debug("found %d decomposed normalizations", len(found))
    return found
