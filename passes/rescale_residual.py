"""rescale-residual: scale an overflowing stream by 2^-k, exactly, where its meaning lets the scale be absorbed.

The SDXL-VAE fix (madebyollin/sdxl-vae-fp16-fix) shrank weights and biases by fine-tuning; here it is done exactly.
A tensor past FP16 range seeds a *region* (``onnx_fp16_rewrite.patterns.scale_region``): tensors that all get
multiplied by powers of ``s = 2**-k``. Weights and biases of the Conv/Gemm/MatMul that produce it are scaled, the
scale flows through homogeneous and additive ops, through products (Mul, MatMul, Einsum: linear in each operand)
and ratios of equally scaled tensors (causal linear attention), and is absorbed by normalizations (InstanceNorm,
LayerNorm, GroupNorm, RMSNorm, decomposed ones included: eps times ``s**2p``) or by Log (``log(s**p x) = log(x)
- p*k*ln2``: the constant is added back). A graph input, or an in-range tensor whose producer cannot make a
scaled value, gets a ``Mul(s**p)``. Anything else reading a scaled tensor (SiLU's Sigmoid before the norm, a
graph output) refuses the region, with the reason. A power-of-two factor commutes with every FP32 rounding, so
the result is bit-identical in FP32 (barring subnormals) except after a Log (one rounding of ``p*k*ln2``); k is
chosen from measured ranges so the largest scaled tensor is <= target_absmax. Scale invariance is exact in FP32
only: in FP16 a norm's squares keep both ends only where the norm pre-scales them, down where they would still
pass 65504, back up where the scale would flush its eps (and the rows near it) to zero.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.patterns.norm_patterns import NORM_OPS, NormMatch, const_value, consumers, find_norms, measured_absmax
from onnx_fp16_rewrite.patterns.scale_region import LINEAR, Refused, Region
from onnx_fp16_rewrite.patterns.scale_search import find_region
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX
from onnx_fp16_rewrite.io.ort_runner import infer_types
from onnx_fp16_rewrite.pipeline.graph_edit import NameSource
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

class RescaleResidual(Pass):
    name = "rescale-residual"
    summary = "scale an overflowing stream by 2^-k where norms, ratios, next weights or a Log absorb it (exact; a Log: rounding-level)"
    auto_cost = 16  # bit-exact weight rescaling; before fuse-normalization

    def __init__(self, *, trigger_absmax: float = FP16_MAX, target_absmax: float = 16384.0,
                 nodes: Sequence[str] = (), norm_prescale: str = "static") -> None:
        """Tensors with measured FP32 absmax above ``trigger_absmax`` seed regions; k makes every scaled tensor's
        absmax <= ``target_absmax`` (4x headroom below 65504 for inputs beyond the calibration set). ``nodes``:
        only seeds produced by these nodes (to try sites one at a time). ``norm_prescale``: how a decomposed norm
        that absorbs the scale but would still square values past FP16 pre-scales its square (``static``: one
        power of two, its eps stays a constant; ``dynamic``: per row, as fuse-normalization; ``off``: neither this nor
        the restore of a norm whose scaled eps would flush to zero in FP16)."""
        if not 0 < target_absmax < trigger_absmax:
            raise BadInputError(f"rescale-residual: need 0 < target_absmax < trigger_absmax, got {target_absmax}, "
                                f"{trigger_absmax}")
        self.trigger_absmax = float(trigger_absmax)
        self.target_absmax = float(target_absmax)
        self.nodes = tuple(nodes)
        if norm_prescale not in ("static", "dynamic", "off"):
            raise BadInputError(f"rescale-residual: norm_prescale must be static, dynamic or off, got {norm_prescale!r}")
        self.norm_prescale = norm_prescale

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        absmax = measured_absmax(ctx, graph)
        seeds = [t for n in graph.nodes for t in n.outputs
                 if absmax.get(t.name, 0.0) > self.trigger_absmax and (not self.nodes or n.name in self.nodes)]
        if not seeds:
            result.skipped.append(Site("-", "-", f"no tensor above {self.trigger_absmax:g} (measured FP32 absmax)"))
        norms = find_norms(graph)
        # An exported GroupNorm needs no pattern: its Reshape passes the scale on to the InstanceNormalization.
        readers = {(id(r), id(m.x)): m for m in norms if m.kind != "group" for r in m.readers}
        types, _ = infer_types(ctx.model)
        seen: dict[str, str] = {}
        for seed in seeds:
            producer = seed.inputs[0]
            if seed.name in seen:
                if seen[seed.name] == "refused":
                    result.skipped.append(Site(producer.name, producer.op, f"{seed.name} is in a refused region"))
                continue
            try:
                region, k = find_region(graph, seed, readers, types, absmax, self.target_absmax)
                if any(seen.get(name) == "applied" for name in region.tensors):
                    raise Refused("overlaps a region already rescaled", region)
            except Refused as exc:
                for name in (exc.region.tensors if exc.region else [seed.name]):
                    seen.setdefault(name, "refused")
                result.skipped.append(Site(producer.name, producer.op, f"{seed.name} (absmax "
                                           f"{absmax[seed.name]:.4g}) not rescaled: {exc}"))
                continue
            peak = max(absmax.get(name, 0.0) * 2.0 ** (-k * p) for name, p in region.powers.items())
            before = max(absmax.get(name, 0.0) for name in region.tensors)
            detail = _apply(graph, region, k)
            if self.norm_prescale != "off":
                detail += _prescale_norms(graph, region, k, ctx, absmax, seen, self.norm_prescale,
                                          self.target_absmax)
            for name in region.tensors:
                seen[name] = "applied"
            result.modified = True
            exact = "rounding-level (Log correction)" if region.logs else "exact in FP32"
            result.rewritten.append(Site(producer.name, producer.op, f"scaled {len(region.tensors)} tensors by "
                                         f"{_powers(region, k)} (absmax {before:.4g} -> {peak:.4g}); {detail}; {exact}"))
        return result


def _prescale_norms(graph: gs.Graph, region: Region, k: int, ctx: PassContext, absmax: dict[str, float],
                    seen: dict[str, str], mode: str, target_absmax: float) -> str:
    """A decomposed norm absorbs the scale but still squares its input, in FP16. Where the scaled input's square
    would still pass FP16 (T5's final RMSNorm reads the whole stream: no one k fits both the stream's small start
    and the squares of its end), the square is pre-scaled as fuse-normalization does (exact), in the same rewrite:
    either fix alone leaves a failure site, so neither would be kept alone. Where instead the scale would flush
    the norm's eps to zero in FP16, its small end is restored (``_restore_small_end``)."""
    from onnx_fp16_rewrite.passes.fuse_normalization import FuseNormalization

    fuse = FuseNormalization(prescale=mode)
    notes = []
    for sink, p in region.sinks.values():
        if not isinstance(sink, NormMatch) or sink.kind == "group" or sink.square_input is None:
            continue
        scaled = absmax.get(sink.square_input.name, 0.0) * 2.0 ** (-k * p)
        if scaled > fuse.target_absmax:
            changed = fuse._prescale(graph, sink, ctx, scaled, "it absorbs the rescaled stream")[1]
            note = f"{sink.kind} norm {sink.anchor.name} squares values up to {scaled:.4g}: {mode} pre-scale"
        else:
            note = _restore_small_end(graph, sink, k * p, scaled, math.sqrt(target_absmax), ctx)
            changed = bool(note)
        if changed:
            notes.append(note)
            for n in sink.nodes:
                for o in n.outputs:
                    seen[o.name] = "applied"
    return f"; {'; '.join(notes)}" if notes else ""


def _restore_small_end(graph: gs.Graph, sink: NormMatch, kp: int, scaled: float, bound: float,
                       ctx: PassContext) -> str:
    """A norm that absorbs ``2^-kp`` squares its scaled input, and its small rows lose the most: where FP16 flushes
    the scaled eps (``eps * 2^-2kp``) to zero, rows near eps flush with it (T5's tiny-embedding token: mean square
    3e-8 at k=6), and ``1/sqrt(0)`` makes a NaN that attention spreads to every token. Here the squared tensor is
    multiplied back by ``2^j`` where the pattern reads it, ``j <= kp`` as large as keeps its absmax <= ``bound``
    (the square <= the pass's target_absmax), and eps by ``2^2j``: exact in FP32 (the norm is scale invariant)."""
    eps = sink.eps * 2.0 ** (-2 * kp)
    if np.float16(eps) != 0 or scaled <= 0:
        return ""
    j = min(kp, math.floor(math.log2(bound / scaled)))
    if j < 1:
        return ""
    assert sink.eps_node is not None and sink.square_input is not None  # layer and rms matches have both
    names = NameSource(graph)
    sq = sink.square_input
    scope = sink.anchor.name.rsplit("/", 1)[0] if "/" in sink.anchor.name else sink.anchor.name
    restored = gs.Variable(names(f"{sq.name}_x2^{j}"), dtype=sq.dtype, shape=sq.shape)
    mul = gs.Node("Mul", names(f"{scope}/restore/Mul"), inputs=[sq, gs.Constant(
        names(f"{scope}/restore.s"), np.asarray(2.0**j, np.float32))], outputs=[restored])
    # Where the pattern reads the squared tensor, as fuse-normalization's pre-scale: the square and the final
    # Div/Mul (a LayerNorm's mean path is left alone, so a constant row stays exactly 0).
    for reader in (consumers(sq) if sink.kind == "layer" else sink.readers):
        for i, t in enumerate(reader.inputs):
            if t is sq:
                reader.inputs[i] = restored
    graph.nodes.append(mul)
    i = 0 if const_value(sink.eps_node.inputs[0]) is not None else 1
    old = sink.eps_node.inputs[i]
    values = const_value(old)
    sink.eps_node.inputs[i] = gs.Constant(names(f"{old.name}_x2^{2 * j}"),
                                          np.asarray(values * np.float64(4.0) ** j, values.dtype))
    if ctx.plan.is_fp32(sink.anchor.name):
        ctx.plan.pin(mul.name, "restores the small end of an FP32-pinned normalization")
    return (f"{sink.kind} norm {sink.anchor.name}: eps x 2^-{2 * kp} would flush to 0 in FP16, so its squared "
            f"tensor x 2^{j} (absmax {scaled:.4g} -> {scaled * 2.0**j:.4g}), eps x 2^{2 * j}")


def _powers(region: Region, k: int) -> str:
    """``2^-k`` or, with several powers, ``2^-k x {1, 2}``."""
    powers = sorted(set(region.powers.values()))
    return f"2^-{k}" if powers == [1] else f"2^-{k} x powers {powers}"


def _apply(graph: gs.Graph, region: Region, k: int) -> str:
    names = NameSource(graph)
    s = 2.0**-k
    for node, idx, pw in region.consts.values():
        old = node.inputs[idx]
        values = const_value(old)
        new = np.asarray(values * np.float64(s) ** pw, dtype=values.dtype)
        shared = len(consumers(old)) > 1 or list(node.inputs).count(old) > 1 or not isinstance(old, gs.Constant)
        if shared:
            node.inputs[idx] = gs.Constant(names(f"{old.name}_x2^{-k * pw}"), new)
        else:
            old.values = new
    for t in region.inputs.values():
        p = region.powers[t.name]
        scaled = gs.Variable(names(f"{t.name}_x2^{-k * p}"), dtype=t.dtype, shape=t.shape)
        readers = consumers(t)
        scope = f"/rescale/{t.name}"
        graph.nodes.append(gs.Node("Mul", names(f"{scope}/Mul"), inputs=[t, gs.Constant(
            names(f"{scope}.s"), np.asarray(np.float32(s) ** p, np.float32))], outputs=[scaled]))
        for r in readers:
            for i, x in enumerate(r.inputs):
                if x is t:
                    r.inputs[i] = scaled
    sinks = []
    for sink, p in region.sinks.values():
        if isinstance(sink, NormMatch):
            assert sink.eps_node is not None
            i = 0 if const_value(sink.eps_node.inputs[0]) is not None else 1
            old = sink.eps_node.inputs[i]
            values = const_value(old)
            sink.eps_node.inputs[i] = gs.Constant(names(f"{old.name}_x2^-{2 * k * p}"),
                                                  np.asarray(values * np.float64(s) ** (2 * p), values.dtype))
            sinks.append(f"eps x 2^-{2 * k * p} in {sink.kind} norm {sink.anchor.name}")
        else:
            eps = float(sink.attrs.get("epsilon", NORM_OPS[sink.op]))
            sink.attrs["epsilon"] = float(np.float32(eps) * np.float32(s) ** (2 * p))
            sinks.append(f"eps x 2^-{2 * k * p} in {sink.op} {sink.name}")
    for log, p in region.logs.values():
        # log(s**p * x) = log(x) - p*k*ln2: add the constant back after the Log.
        out = log.outputs[0]
        raw = gs.Variable(names(f"{out.name}/unshifted"), dtype=out.dtype, shape=out.shape)
        log.outputs[0] = raw
        graph.nodes.append(gs.Node("Add", names(f"{log.name}/rescale_Add"), inputs=[raw, gs.Constant(
            names(f"{log.name}/rescale.shift"), np.asarray(p * k * math.log(2.0), np.float32))], outputs=[out]))
        sinks.append(f"Log {log.name} absorbs it (+{p}*{k}*ln2 after it)")
    sources = [n.name for n, i, _ in region.consts.values() if n.op in LINEAR or n.op in ("MatMul", "Gather")]
    sources += [f"input {t.name}" for t in region.inputs.values() if not t.inputs]
    logger.info("rescale-residual: %d tensors by 2^-%d", len(region.tensors), k)
    muls = f"; {', '.join(region.notes)}" if region.notes else ""
    return (f"weights/biases of {', '.join(sorted(set(sources))) or 'none'}; "
            f"{', '.join(sinks) or 'no norm or Log (a ratio absorbs it)'}{muls}")
