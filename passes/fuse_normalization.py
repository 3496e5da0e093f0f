"""fuse-normalization: decomposed LayerNorm / RMSNorm / exported GroupNorm -> one normalization node.

TensorRT runs its normalization layer (INormalizationLayer) in FP32 internally, and says so itself: "Running
layernorm after self-attention with FP16 Reduce or Pow may cause overflow ... use INormalizationLayer (ONNX
opset >= 17)". A decomposed norm instead stores ``Pow(x, 2)`` in FP16, which overflows once |x| > 256. So:

- where the model's opset has the op (LayerNormalization >= 17, GroupNormalization >= 21, RMSNormalization
  >= 23), the pattern becomes that op. GroupNormalization-18 had a per-*group* scale and bias and is deprecated
  (opset 21 redefined it per channel), so GroupNorm is only fused from opset 21. The opset is upgraded (with
  onnx.version_converter) only when ``opset`` asks for it;
- elsewhere a LayerNorm/RMSNorm is *pre-scaled*: the squared tensor (x for RMSNorm, x - mean for LayerNorm) is
  multiplied by ``2**-k`` where the pattern reads it (the square and the final divide) and eps by ``2**-2k``.
  Normalization is scale invariant, and a power-of-two scale commutes with every FP32 rounding (square, mean,
  sqrt, divide), so the result is bit-identical in FP32. Pre-scaling is only done where the measured absmax of
  the squared tensor exceeds ``target_absmax``. ``prescale="static"`` uses one k from that absmax. It is one Mul,
  but one k for all rows: rows far smaller than the largest lose their squares to FP16 underflow, and eps * 2**-2k
  itself underflows FP16, so a constant row gives 0/0. ``prescale="dynamic"`` (default) picks k per row at run
  time, ``k = floor(log2(clip(max|x|, 1, 2**15)))`` (Abs, ReduceMax, Clip, Log, Floor, Pow: cheap, one value per
  row): any integer k is exact, every row's largest value lands in [1, 2), and small rows keep their eps.
An exported GroupNorm that cannot be fused needs nothing: InstanceNormalization already computes in FP32 inside
TensorRT (its *input* overflowing is rescale-residual's business).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.patterns.norm_patterns import (
    NormMatch,
    const_value,
    consumers,
    find_norms,
    measured_absmax,
    remove_nodes,
    trailing_axes,
)
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

FUSED_OP = {"layer": ("LayerNormalization", 17), "rms": ("RMSNormalization", 23),
            "group": ("GroupNormalization", 21)}


class FuseNormalization(Pass):
    name = "fuse-normalization"
    summary = "fuse decomposed LayerNorm/RMSNorm/GroupNorm into normalization ops, else pre-scale by 2^-k (exact)"
    auto_cost = 30  # changes ops (within rtol): after the exact rewrites

    def __init__(
        self,
        *,
        opset: int | None = None,
        fuse: bool = True,
        prescale: str = "dynamic",
        target_absmax: float = 64.0,
        nodes: Sequence[str] = (),
    ) -> None:
        """``opset``: upgrade the model to this opset first (never done unless asked). ``fuse``: replace patterns
        by normalization ops where the opset has them. ``prescale``: ``dynamic`` (per row, default), ``static``
        (one measured k) or ``off``, for patterns that are not fused. ``target_absmax``: pre-scale a pattern only
        when its squared tensor's measured absmax exceeds this (64 -> squares <= 4096, 16x below FP16's 65504 for
        inputs beyond the calibration set); static k brings it down to it. ``nodes``: only the patterns whose
        first node has one of these names (to try sites one at a time)."""
        if opset is not None and not 1 <= opset <= onnx.defs.onnx_opset_version():
            raise BadInputError(f"fuse-normalization: unknown opset {opset}")
        if not 0 < target_absmax <= 128:
            raise BadInputError(f"fuse-normalization: target_absmax must be in (0, 128], got {target_absmax}")
        self.opset = opset
        self.fuse = fuse
        if prescale not in ("dynamic", "static", "off"):
            raise BadInputError(f"fuse-normalization: prescale must be dynamic, static or off, got {prescale!r}")
        self.prescale = prescale
        self.target_absmax = float(target_absmax)
        self.nodes = tuple(nodes)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        if self.opset is not None:
            if self.opset > graph.opset:
                _upgrade(graph, self.opset)
                result.modified = True
                result.rewritten.append(Site("-", "-", f"model upgraded to opset {self.opset} (asked for)"))
            elif self.opset < graph.opset:
                result.skipped.append(Site("-", "-", f"model opset {graph.opset} is above the requested "
                                                     f"{self.opset}: not downgraded"))
        shapes = _shapes(ctx.model)
        absmax: dict[str, float] | None = None
        matches = [m for m in find_norms(graph) if not self.nodes or m.anchor.name in self.nodes]
        if not matches:
            result.skipped.append(Site("-", "-", "no decomposed LayerNorm, RMSNorm or exported GroupNorm found"))
        for m in matches:
            op, min_opset = FUSED_OP[m.kind]
            if self.fuse and graph.opset >= min_opset:
                site = self._fuse(graph, m, op, shapes, ctx)
                if site is not None:
                    result.rewritten.append(site)
                    result.modified = True
                    continue
                reason = "shapes do not allow it (normalized axes not trailing or affine terms not per-channel)"
            elif not self.fuse:
                reason = "fusion disabled"
            else:
                reason = f"{op} needs opset {min_opset}, the model has {graph.opset} (opset={min_opset} upgrades)"
            if m.kind == "group":
                result.skipped.append(Site(m.anchor.name, m.anchor.op, f"not fused: {reason}; nothing to pre-scale:"
                                           " InstanceNormalization already computes in FP32"))
            elif self.prescale == "off":
                result.skipped.append(Site(m.anchor.name, m.anchor.op, f"not fused: {reason}; pre-scaling off"))
            else:
                absmax = absmax if absmax is not None else measured_absmax(ctx, graph)
                site, changed = self._prescale(graph, m, ctx, absmax.get(m.square_input.name, 0.0), reason)
                result.modified |= changed
                (result.rewritten if changed else result.skipped).append(site)
        return result

    def _fuse(self, graph: gs.Graph, m: NormMatch, op: str, shapes: dict[str, list], ctx: PassContext) -> Site | None:
        x_shape = shapes.get(m.x.name)
        rank = len(x_shape) if x_shape is not None else None
        if m.kind == "group":
            if rank is None or rank < 3:
                return None
            channels = x_shape[1] if isinstance(x_shape[1], int) else (m.gamma.size if m.gamma is not None else None)
            if channels is None or channels % m.groups:
                return None
            gamma, beta = _per_channel(m.gamma, rank, channels, 1.0), _per_channel(m.beta, rank, channels, 0.0)
            if gamma is None or beta is None:
                return None
            g_scale, g_bias = (np.repeat(v.astype(np.float32), channels // m.groups) for v in m.group_affine)
            inputs = [m.x, _const(f"{m.output.name}.scale", g_scale * gamma),
                      _const(f"{m.output.name}.bias", g_bias * gamma + beta)]
            attrs = {"epsilon": m.eps, "num_groups": m.groups}
        else:
            axis = trailing_axes(m.axes, rank)
            if axis is None:
                return None
            norm_shape = x_shape[axis:] if x_shape is not None else None
            scale = _trailing(m.gamma, norm_shape, len(m.axes), 1.0)
            if scale is None or (m.kind == "layer" and _trailing(m.beta, norm_shape, len(m.axes), 0.0) is None):
                return None
            inputs = [m.x, _const(f"{m.output.name}.scale", scale)]
            if m.kind == "layer" and m.beta is not None:
                inputs.append(_const(f"{m.output.name}.bias", _trailing(m.beta, list(scale.shape), len(m.axes), 0.0)))
            attrs = {"axis": axis, "epsilon": m.eps}
        scope = m.anchor.name.rsplit("/", 1)[0] if "/" in m.anchor.name else m.anchor.name
        fused = gs.Node(op, f"{scope}/{op}", attrs, inputs, [m.output])
        pinned = [n.name for n in m.nodes if ctx.plan.is_fp32(n.name)]
        remove_nodes(graph, m.nodes)
        graph.nodes.append(fused)
        if pinned:
            ctx.plan.pin(fused.name, f"fused from FP32-pinned {pinned[0]}")
        return Site(fused.name, op, f"fused {len(m.nodes)} nodes ({m.kind} norm from {m.anchor.name}) into {op}; "
                                    "TensorRT computes it in FP32 internally")

    def _prescale(self, graph: gs.Graph, m: NormMatch, ctx: PassContext, absmax: float,
                  reason: str) -> tuple[Site, bool]:
        anchor = m.anchor
        if not math.isfinite(absmax):
            return Site(anchor.name, anchor.op, f"not fused: {reason}; squared tensor is non-finite in FP32"), False
        k = math.ceil(math.log2(absmax / self.target_absmax)) if absmax > self.target_absmax else 0
        if k <= 0:
            return Site(anchor.name, anchor.op, f"not fused: {reason}; squares fit FP16 (squared tensor absmax "
                                                f"{absmax:.4g} <= {self.target_absmax:g}): nothing to pre-scale"), False
        scope = anchor.name.rsplit("/", 1)[0] if "/" in anchor.name else anchor.name
        sq = m.square_input
        # Scale the squared tensor (x for RMSNorm, x - mean for LayerNorm) where the pattern reads it: the square
        # and the final Div/Mul. The mean path of a LayerNorm is left alone, so a constant row stays exactly 0.
        targets = consumers(sq) if m.kind == "layer" else m.readers
        assert m.eps_node is not None  # layer and rms matches always have their Add(eps)
        eps_in = 0 if const_value(m.eps_node.inputs[0]) is not None else 1
        eps_const = m.eps_node.inputs[eps_in]
        eps_value = const_value(eps_const)
        if self.prescale == "static" or graph.opset < 11:  # Clip takes its bounds as inputs from opset 11
            s = np.float32(2.0**-k)
            factor = _const(f"{sq.name}/prescale.k", s)
            eps_new: gs.Tensor = _const(f"{eps_const.name}_x2^-{2 * k}", np.asarray(eps_value * s * s, eps_value.dtype))
            added: list[gs.Node] = []
            how = (f"by 2^-{k} (squared tensor absmax {absmax:.4g} -> {absmax * float(s):.4g}), eps {m.eps:.3g} -> "
                   f"{m.eps * float(s * s):.3g}")
        else:
            added, factor, eps_new = _row_power_of_two(graph, f"{scope}/prescale", sq, m.axes, eps_const)
            how = (f"per row by 2^-floor(log2(max|x|)) (0 to 15; static would need 2^-{k} for absmax "
                   f"{absmax:.4g}), eps by its square")
        scaled = gs.Variable(f"{sq.name}/prescaled", dtype=np.float32)
        added.append(gs.Node("Mul", f"{scope}/prescale/Mul", inputs=[sq, factor], outputs=[scaled]))
        graph.nodes.extend(added)
        for reader in targets:
            for i, t in enumerate(reader.inputs):
                if t is sq:
                    reader.inputs[i] = scaled
        m.eps_node.inputs[eps_in] = eps_new
        if ctx.plan.is_fp32(anchor.name):
            for n in added:
                ctx.plan.pin(n.name, "pre-scale of an FP32-pinned normalization")
        return Site(anchor.name, anchor.op, f"pre-scaled the {m.kind} norm's squared tensor {how}: exact in FP32 "
                                            f"(not fused: {reason})"), True


def _row_power_of_two(graph: gs.Graph, scope: str, x: gs.Tensor, axes: list[int],
                      eps: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor, gs.Tensor]:
    """Nodes computing ``inv = 2**-e`` with ``e = floor(log2(clip(max|x|, 1, 2**15)))`` per normalized row, and
    ``eps * inv**2``. Any integer e keeps the rewrite exact in FP32; this e puts every row's largest value in
    [1, 2) (rows below 1 are left alone, so a zero row still meets an FP16-representable eps). Clipping before the
    Log keeps every intermediate finite (no log(0) = -inf for a zero row)."""
    p = f"{x.name}/prescale"  # tensor names: unique per squared tensor

    def node(op: str, inputs: list, **attrs) -> gs.Tensor:
        out = gs.Variable(f"{p}/{op}_{len(nodes)}_output_0", dtype=np.float32)
        nodes.append(gs.Node(op, f"{scope}/{op}_{len(nodes)}", attrs, inputs, [out]))
        return out

    nodes: list[gs.Node] = []
    absolute = node("Abs", [x])
    if graph.opset >= 18:
        peak = node("ReduceMax", [absolute, gs.Constant(f"{p}/axes", np.asarray(axes, np.int64))], keepdims=1)
    else:
        peak = node("ReduceMax", [absolute], axes=list(axes), keepdims=1)
    peak = node("Clip", [peak, _const(f"{p}/one", np.float32(1.0)), _const(f"{p}/cap", np.float32(2.0**15))])
    log2 = node("Mul", [node("Log", [peak]), _const(f"{p}/inv_ln2", np.float32(1.0 / math.log(2.0)))])
    inv = node("Pow", [_const(f"{p}/two", np.float32(2.0)), node("Neg", [node("Floor", [log2])])])
    eps_new = node("Mul", [eps, node("Mul", [inv, inv])])
    return nodes, inv, eps_new


def _upgrade(graph: gs.Graph, target: int) -> None:
    """Replace the graph's contents by their onnx.version_converter upgrade to ``target``."""
    from onnx import version_converter

    model = gs.export_onnx(graph)
    upgraded = gs.import_onnx(version_converter.convert_version(model, target))
    graph.nodes, graph.inputs, graph.outputs = upgraded.nodes, upgraded.inputs, upgraded.outputs
    graph.opset, graph.import_domains = upgraded.opset, upgraded.import_domains
    logger.info("upgraded the model to opset %d", target)


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Inferred shape (ints for static dims, else None) of every tensor of the model before the pass."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return shapes


def _trailing(v: np.ndarray | None, norm_shape: list | None, n_axes: int, fill: float) -> np.ndarray | None:
    """A gamma/beta that broadcasts over the normalized (trailing) axes only, as an array of their shape."""
    if v is None:
        if norm_shape is None or any(not isinstance(d, int) or d <= 0 for d in norm_shape):
            return None
        return np.full(norm_shape, fill, np.float32)
    v = np.asarray(v, np.float32)
    lead = v.shape[: max(v.ndim - n_axes, 0)]
    if any(d != 1 for d in lead):
        return None
    tail = list(v.shape[len(lead):])
    target = list(norm_shape) if norm_shape is not None and all(isinstance(d, int) for d in norm_shape) else tail
    if len(tail) < len(target):
        tail = [1] * (len(target) - len(tail)) + tail
    if any(t not in (1, d) for t, d in zip(tail, target)):
        return None
    return np.broadcast_to(v.reshape(tail), target).astype(np.float32)


def _per_channel(v: np.ndarray | None, rank: int, channels: int, fill: float) -> np.ndarray | None:
    """A gamma/beta of an NCHW tensor that varies along axis 1 only, as a [C] vector."""
    if v is None:
        return np.full(channels, fill, np.float32)
    v = np.asarray(v, np.float32)
    if v.ndim > rank:
        return None
    shape = [1] * (rank - v.ndim) + list(v.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1), (channels,)).astype(np.float32)


def _const(name: str, value: np.ndarray | np.floating) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))
