"""rescale-accumulation: run an accumulation chain on x * 2^-k and undo the scale where it ends.

A chain starts at a CumSum/ReduceSum whose measured FP32 output exceeds ``target_absmax`` and grows
forward through ops that commute with scaling (sums, slices, pads, reshapes, Add/Sub of chain
values or constants). Its inputs get a ``Mul(2^-k)``; where it ends, the scale is folded into a
constant Div/Mul that follows (NAFNet's ``/ (k1*k2)`` = 147456, which itself does not fit in FP16,
becomes 147456 * 2^-k) or undone by a ``Mul(2^k)``; constants inside the chain are scaled too.
Powers of two commute with FP32 rounding, so the rewrite is bit-exact in FP32 (barring FP32
over/underflow). ``k`` is the smallest that brings the chain's measured absmax under
``target_absmax``. Small values must not vanish: the chain is linear, so the error from inputs that
fall below FP16's smallest subnormal 2^-24 (rounding to 0 or to it) is bounded by their share of
the inputs' L1 mass; above ``max_underflow_share`` the site is refused. (Values that merely become
subnormal keep an absolute precision of 2^-25, finer than the rounding of the chain's large sums.)

Removing infinities is not the same as being right: an integral image rescaled into range still
cancels ~1e4-sized FP16 numbers down to a small window sum (the notes measure relative error 1.5
for 3x3 windows on 256x256). So every site is judged in the FP16 emulation before it is kept: the
chain is cut out (inputs = its entries, outputs = its exits), emulated with every tensor FP16,
and compared with FP32; above ``max_rel_l2`` the site is skipped with the numbers (box-filter or
protect-fp32 are the fixes there). All chains of a run are judged together, in one cut-out
(``analysis.cutout_judge``: the same scores as judging each alone, at the cost of about one); under
fix --auto, inside the candidate's own diagnosis run instead (``PassContext.judge``,
``analysis.embedded_judges``: no FP32 run of the judges' own).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.analysis.cutout_judge import Cutout, judge_with_l1
from onnx_fp16_rewrite.errors import BadInputError, one_line
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX
from onnx_fp16_rewrite.pipeline.graph_edit import Emitter, const_value
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

FP16_MIN_SUBNORMAL = 2.0**-24
# Ops linear in their first input with everything else fixed (indices, shapes, axes).
_PASS_THROUGH = {"CumSum", "ReduceSum", "Slice", "Pad", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                 "Flatten", "Identity", "Expand", "Tile", "Gather", "Neg"}
_SUMS = {"Add", "Sub", "Concat"}  # linear in all their (float) inputs


@dataclass
class _Chain:
    seed: str
    nodes: list[str]
    entries: list[str]  # tensors from outside the chain that it reads (scaled by 2^-k)
    constants: list[tuple[str, int]] = field(default_factory=list)  # (node, input index) scaled by 2^-k
    folds: list[tuple[str, int]] = field(default_factory=list)  # Div/Mul (node, constant index)
    unscaled: list[str] = field(default_factory=list)  # chain tensors read outside: Mul(2^k)
    exits: list[str] = field(default_factory=list)  # what the chain hands on: fold outputs, unscaled tensors
    absmax: float = 0.0


class RescaleAccumulation(Pass):
    name = "rescale-accumulation"
    summary = "scale accumulation chains (CumSum/ReduceSum ...) by 2^-k and undo it after; bit-exact, judged in FP16"
    auto_cost = 10  # bit-exact in FP32 and no extra FLOPs: the first thing --auto tries

    def __init__(self, *, seed_ops: Sequence[str] = ("CumSum", "ReduceSum"), target_absmax: float = 8192.0,
                 max_rel_l2: float = 1e-2, max_underflow_share: float = 1e-4) -> None:
        """``seed_ops``: ops that start a chain (linear ones only: the seed's input is scaled); ``target_absmax``: the largest value the scaled
        chain may hold; ``max_rel_l2``: the largest FP16 relative L2 error at the chain's exits
        (measured in the emulation) for the rewrite to be kept."""
        if not 0 < target_absmax <= FP16_MAX:
            raise BadInputError(f"rescale-accumulation: target_absmax must be in (0, {FP16_MAX:g}]")
        nonlinear = sorted(set(seed_ops) - _PASS_THROUGH - _SUMS)
        if nonlinear:
            raise BadInputError(f"rescale-accumulation: seed_ops must be linear accumulations, not {', '.join(nonlinear)}")
        if max_rel_l2 <= 0 or not 0 <= max_underflow_share <= 1:
            raise BadInputError("rescale-accumulation: max_rel_l2 must be > 0, max_underflow_share in [0, 1]")
        self.seed_ops = tuple(seed_ops)
        self.target_absmax = float(target_absmax)
        self.max_rel_l2 = float(max_rel_l2)
        self.max_underflow_share = float(max_underflow_share)

    def nothing_to_do(self, model: onnx.ModelProto) -> PassResult | None:
        return None if any(n.op_type in self.seed_ops for n in model.graph.node) else PassResult(modified=False)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        graph.toposort()
        absmax = ctx.tensor_absmax()
        taken: set[str] = set()
        chains: list[_Chain] = []
        for node in [n for n in graph.nodes if n.op in self.seed_ops]:
            if node.name in taken:
                continue  # already inside an earlier chain (nodes are in topological order)
            chain = _grow(node, graph, taken)
            chain.absmax = max(absmax.get(t.name, 0.0) for n in graph.nodes if n.name in chain.nodes
                               for t in n.outputs)
            if chain.absmax <= self.target_absmax:
                result.skipped.append(Site(node.name, node.op, f"in range: the chain's FP32 absmax "
                                           f"{chain.absmax:.4g} <= target_absmax {self.target_absmax:g}"))
                continue
            leaving = [t for t in chain.unscaled if absmax.get(t, 0.0) > FP16_MAX]
            if leaving:
                result.skipped.append(Site(node.name, node.op, f"the chain's value {leaving[0]} leaves it with "
                                           f"absmax {absmax[leaving[0]]:.4g}, beyond FP16 whatever the scale"))
                continue
            chains.append(chain)
        if not chains:
            return result
        ks = [max(1, math.ceil(math.log2(c.absmax / self.target_absmax))) for c in chains]
        # Every chain is judged (a score does not depend on the others judged beside it), with the
        # L1 mass of its inputs and the part of it that 2^-k pushes below FP16's smallest
        # subnormal; those the underflow refuses are not rewritten whatever their score. The
        # judge is judge_cutouts' (one FP32 run a sample for every chain's entries and exits,
        # streamed) unless the caller brings its own (fix --auto: the candidate's diagnosis).
        below = {c.seed: FP16_MIN_SUBNORMAL * 2.0**k for c, k in zip(chains, ks)}
        cutouts = [Cutout(c.seed, c.entries, c.exits, functools.partial(_apply, chain=c, k=k)) for c, k in zip(chains, ks)]
        if ctx.judge is not None:
            scores, l1 = ctx.judge(ctx.model, cutouts, below)
        else:
            scores, l1 = judge_with_l1(ctx.model, cutouts, ctx.feeds, below)
        # Sums of |x| scaled by 2^-k after the fact: a power of two, so bit for bit the sums of |x| * 2^-k.
        underflow = [self._underflow(k, *(v * 2.0**-k for v in l1[c.seed])) for c, k in zip(chains, ks)]
        for chain, k, reason in zip(chains, ks, underflow):
            seed = next(n for n in graph.nodes if n.name == chain.seed)
            judged = ""
            if reason is None:
                reason, judged = self._decide(chain, k, scores[chain.seed])
            if reason:
                result.skipped.append(Site(chain.seed, seed.op, reason))
                continue
            # Exact outside the chain: only its own tensors change value (those it hands on are restored).
            members = {n.name for n in graph.nodes if n.name in chain.nodes}
            result.values_changed = (result.values_changed or []) + [
                t.name for n in graph.nodes if n.name in members for t in n.outputs if t.name not in chain.unscaled]
            _apply(graph, chain=chain, k=k)
            logger.debug("rescale-accumulation %s: %d nodes by 2^-%d; %s", chain.seed, len(chain.nodes), k, judged)
            result.modified = True
            result.rewritten.append(Site(chain.seed, seed.op, (
                f"{len(chain.nodes)} node(s) scaled by 2^-{k} (absmax {chain.absmax:.4g} -> "
                f"{chain.absmax / 2**k:.4g}); {len(chain.folds)} folded into a constant Div/Mul, "
                f"{len(chain.unscaled)} undone by Mul(2^{k}); {judged}")))
        return result

    def _underflow(self, k: int, mass: float, lost: float) -> str | None:
        """Why scaling a chain by 2^-k loses too much to FP16 underflow (its inputs' summed
        ``mass`` and ``lost`` over every sample), or None."""
        share = lost / mass if mass > 0 else 0.0
        if share > self.max_underflow_share:
            return (f"scaling by 2^-{k} would push {share:.3g} of the chain inputs' magnitude (L1) below FP16's "
                    f"smallest subnormal 2^-24 (> max_underflow_share {self.max_underflow_share:g})")
        return None

    def _decide(self, chain: _Chain, k: int, score: tuple[float, float] | Exception) -> tuple[str | None, str]:
        """(why not, or None; the FP16 judgement) for scaling ``chain`` by 2^-k, given its judged score."""
        if isinstance(score, Exception):  # an unextractable chain cannot be judged, so it is not rewritten
            return f"cannot judge the chain in FP16 emulation: {type(score).__name__}: {one_line(score)}", ""
        before, after = score
        judged = f"FP16 rel L2 at the exits {before:.3g} -> {after:.3g} (emulated, every tensor FP16)"
        if after > self.max_rel_l2:
            return (f"scaling by 2^-{k} brings the chain in range (absmax {chain.absmax:.4g} -> "
                    f"{chain.absmax / 2**k:.4g}) but its FP16 result is still wrong: rel L2 at the exits "
                    f"{before:.3g} -> {after:.3g} > max_rel_l2 {self.max_rel_l2:g} (cancellation of large "
                    f"partial sums; box-filter or protect-fp32 fix this)"), judged
        return None, judged


def _grow(seed: gs.Node, graph: gs.Graph, taken: set[str]) -> _Chain:
    """The chain from ``seed``: a fixpoint over consumers that are linear in chain values."""
    members = {seed.name: seed}
    region_tensors = {t.name for t in seed.outputs}
    changed = True
    while changed:
        changed = False
        for t in [t for n in list(members.values()) for t in n.outputs]:
            for c in t.outputs:
                if c.name in members or c.name in taken or not _linear(c, region_tensors):
                    continue
                members[c.name] = c
                region_tensors.update(o.name for o in c.outputs)
                changed = True
    taken.update(members)
    chain = _Chain(seed.name, list(members), [])
    for n in members.values():
        for i, t in enumerate(_float_inputs(n)):
            if t is None or t.name in region_tensors:
                continue
            if const_value(t) is not None:
                chain.constants.append((n.name, i))
            elif t.name not in chain.entries:
                chain.entries.append(t.name)
    outputs = {o.name for o in graph.outputs}
    for n in members.values():
        for t in n.outputs:
            outside = [c for c in t.outputs if c.name not in members]
            folds = [c for c in outside if _fold_index(c, t) is not None]
            chain.folds += [(c.name, _fold_index(c, t)) for c in folds]
            chain.exits += [c.outputs[0].name for c in folds]
            if len(folds) < len(outside) or t.name in outputs:
                chain.unscaled.append(t.name)
                chain.exits.append(t.name)
    return chain


def _float_inputs(n: gs.Node) -> list[gs.Tensor | None]:
    """The inputs that carry chain values (the others are indices, axes, shapes): None elsewhere."""
    if n.op in _SUMS:
        return list(n.inputs)
    if n.op == "Pad":  # data and the constant pad value
        return [n.inputs[0], None, n.inputs[2] if len(n.inputs) > 2 and n.inputs[2].name else None]
    return [n.inputs[0]] + [None] * (len(n.inputs) - 1)


def _linear(n: gs.Node, region: set[str]) -> bool:
    if n.op not in _PASS_THROUGH and n.op not in _SUMS:
        return False
    if n.op == "Pad" and n.attrs.get("mode", "constant") == "constant" and len(n.inputs) > 2 and \
            n.inputs[2].name and const_value(n.inputs[2]) is None:
        return False
    ins = [t for t in _float_inputs(n) if t is not None]
    if n.op in _PASS_THROUGH and ins[0].name not in region:
        return False
    return any(t.name in region for t in ins) and all(t.name in region or const_value(t) is not None for t in ins)


def _fold_index(c: gs.Node, t: gs.Tensor) -> int | None:
    """Index of the constant operand of ``c`` when it is ``t / const`` or ``t * const``."""
    if c.op not in ("Div", "Mul") or len(c.inputs) != 2:
        return None
    if c.op == "Div" and c.inputs[0] is not t:
        return None
    idx = 1 if c.inputs[0] is t else 0
    value = const_value(c.inputs[idx])
    ok = value is not None and np.issubdtype(value.dtype, np.floating) and c.inputs[1 - idx] is t
    return idx if ok else None


def _apply(graph: gs.Graph, *, chain: _Chain, k: int) -> None:
    """Scale ``chain`` by 2^-k in ``graph`` (the full graph, or the judge's cut-out of it: every name
    is looked up, so both work)."""
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    e = Emitter(graph, chain.seed + "/rescale")
    down, up = 2.0**-k, 2.0**k
    members = [nodes[n] for n in chain.nodes]
    for name in chain.entries:
        scaled = e.op("Mul", [tensors[name], e.const(np.float32(down))])
        for n in members:
            for i, t in enumerate(n.inputs):
                if t.name == name:
                    n.inputs[i] = scaled
    for node_name, i in chain.constants:
        value = const_value(nodes[node_name].inputs[i])
        nodes[node_name].inputs[i] = e.const(value * value.dtype.type(down), value.dtype.type)
    for node_name, i in chain.folds:
        c = nodes[node_name]
        value = const_value(c.inputs[i])
        c.inputs[i] = e.const(value * value.dtype.type(down if c.op == "Div" else up), value.dtype.type)
    inside = set(chain.nodes) | {name for name, _ in chain.folds}
    for name in chain.unscaled:  # the producer now makes a scaled copy; Mul(2^k) restores the original
        t = tensors[name]
        producer = t.inputs[0]
        scaled = gs.Variable(e.fresh_name("scaled"), dtype=t.dtype)
        producer.outputs[producer.outputs.index(t)] = scaled
        for c in list(t.outputs):
            if c.name in inside:
                for i, inp in enumerate(c.inputs):
                    if inp is t:
                        c.inputs[i] = scaled
        e.op("Mul", [scaled, e.const(np.float32(up))], out=t)
