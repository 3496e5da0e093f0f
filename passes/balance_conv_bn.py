"""balance-conv-bn: move a BatchNormalization's mean shift into the Conv before it and split its gain by powers of two.

``Conv(x; W, b) -> BatchNormalization(gamma, beta, mean, var, eps)`` computes ``a * (W*x + b - mean) + beta`` with
``a = gamma / sqrt(var + eps)`` per channel. When a channel's Conv output is nearly constant (``|mean|`` far above
its spread ``r = max|y - mean|``) and the BN amplifies the small difference, an FP16-stored Conv output keeps only
a few bits of ``y - mean`` (spacing 0.004 near 4): the BN then amplifies rounding. Folding the BN into the Conv,
as TensorRT does at build time, is not a fix in general: the folded weights ``a * W`` can pass 65504.

The rewrite (cross-layer range equalisation, Nagel et al. 2019, for FP16 range instead of INT8) forms the
difference inside the Conv, where it accumulates in FP32, and gives each channel ``c`` a power of two ``2**e_c``:
    Conv(x; W * 2**e, (b - mean) * 2**e) -> BatchNormalization(gamma * 2**-e, beta, mean = 0, var, eps).
``e_c`` is ``round(log2 a_c)`` (the Conv output then has the BN output's scale), lowered until the scaled weights,
bias and measured Conv output stay below ``target_absmax``. The result is ``a * (W*x + (b - mean)) + beta``: the
same as the original up to FP32 rounding of ``b - mean`` (more exact, in fact: the original rounds ``W*x + b``
before subtracting ``mean``), so FP32 validation uses the float64 rule where the original's own error dominates.
Only Convs with constant weights read by nothing but the BN, and BNs with constant parameters (inference form),
are rewritten; a site is skipped, with the measured numbers, where no channel cancels (``|mean| < min_cancel * r``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.graph_edit import NameSource, const_value
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext
from onnx_fp16_rewrite.patterns.norm_patterns import consumers

logger = logging.getLogger(__name__)

_NO_SITE = "no Conv -> BatchNormalization with constant parameters"


class BalanceConvBn(Pass):
    name = "balance-conv-bn"
    summary = "fold a BatchNorm's mean into the Conv bias and split its gain by 2^e between Conv and BN (FP32 rounding-level)"
    auto_cost = 18  # rounding-level, no extra nodes: after the bit-exact rescalings

    def __init__(self, *, target_absmax: float = 8192.0, min_cancel: float = 8.0, nodes: Sequence[str] = ()) -> None:
        """``target_absmax``: bound for the scaled weights, bias and Conv output. ``min_cancel``: rewrite a site
        only when some channel's ``|mean|`` is at least this many times its measured spread ``max|y - mean|``
        (3 bits lost to cancellation in an FP16-stored Conv output). ``nodes``: only these BatchNormalizations."""
        if not 0 < target_absmax <= 32768 or min_cancel < 1:
            raise BadInputError("balance-conv-bn: need 0 < target_absmax <= 32768 and min_cancel >= 1")
        self.target_absmax = float(target_absmax)
        self.min_cancel = float(min_cancel)
        self.nodes = tuple(nodes)

    def nothing_to_do(self, model: onnx.ModelProto) -> PassResult | None:
        if any(n.op_type == "BatchNormalization" and (not self.nodes or n.name in self.nodes) for n in model.graph.node):
            return None
        return PassResult(modified=False, skipped=[Site("-", "-", _NO_SITE)])

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        sites = [s for s in (_match(n, graph) for n in graph.nodes if n.op == "BatchNormalization"
                             and (not self.nodes or n.name in self.nodes)) if s is not None]
        reasons = [(n, r) for n, r in sites if isinstance(r, str)]
        result.skipped += [Site(n.name, n.op, r) for n, r in reasons]
        sites = [(n, r) for n, r in sites if not isinstance(r, str)]
        if not sites:
            if not result.skipped:
                result.skipped.append(Site("-", "-", _NO_SITE))
            return result
        spreads = _spreads(ctx, [(conv.outputs[0].name, p["mean"]) for _, (conv, p) in sites])
        names = NameSource(graph)
        for bn, (conv, p) in sites:
            site = self._rewrite(conv, bn, p, spreads[conv.outputs[0].name], names)
            (result.rewritten if site.detail.startswith("moved") else result.skipped).append(site)
        result.modified = bool(result.rewritten)
        return result

    def _rewrite(self, conv: gs.Node, bn: gs.Node, p: dict[str, np.ndarray], spread: np.ndarray,
                 names: NameSource) -> Site:
        mean, gain = p["mean"].astype(np.float64), p["gamma"] / np.sqrt(p["var"] + p["eps"])
        cancel = np.abs(mean) / np.maximum(spread, 1e-30)
        if not np.any(cancel >= self.min_cancel):
            return Site(bn.name, bn.op, f"no channel cancels: |mean| / max|y - mean| <= {cancel.max():.3g} "
                                        f"(< {self.min_cancel:g}); the Conv output keeps y - mean in FP16")
        w = p["w"].astype(np.float64)
        shift = p["b"].astype(np.float64) - mean
        per_channel = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        bound = np.maximum.reduce([per_channel, np.abs(shift), spread, np.full_like(spread, 1e-30)])
        e = np.minimum(np.round(np.log2(np.maximum(np.abs(gain), 1e-30))), np.floor(np.log2(self.target_absmax / bound)))
        e = np.clip(e, -60, 60)
        scale = 2.0**e
        shape = (-1,) + (1,) * (w.ndim - 1)
        conv.inputs[1] = gs.Constant(names(f"{conv.inputs[1].name}_balanced"), (w * scale.reshape(shape)).astype(np.float32))
        bias = gs.Constant(names(f"{conv.name}.bias_balanced"), (shift * scale).astype(np.float32))
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias
        else:
            conv.inputs.append(bias)
        bn.inputs[1] = gs.Constant(names(f"{bn.inputs[1].name}_balanced"), (p["gamma"] / scale).astype(np.float32))
        bn.inputs[3] = gs.Constant(names(f"{bn.inputs[3].name}_zero"), np.zeros_like(p["mean"], np.float32))
        folded = float(np.max(np.abs(w) * np.abs(gain).reshape(shape)))
        note = (f"; TensorRT's Conv+BN fusion would fold weights up to {folded:.3g}, past FP16: keep this BN "
                f"unfused or pin it") if folded > 65504 else ""
        worst = int(np.argmax(cancel))
        return Site(bn.name, bn.op, f"moved the mean into {conv.name}'s bias and split the gain by 2^e "
                                    f"(e in [{int(e.min())}, {int(e.max())}]); worst channel {worst}: |mean| "
                                    f"{abs(mean[worst]):.3g} vs spread {spread[worst]:.3g}, gain {gain[worst]:.3g}; "
                                    f"FP32 rounding-level{note}")


def _match(bn: gs.Node, graph: gs.Graph) -> tuple[gs.Node, dict | str] | None:
    """(bn, (conv, parameters)) for a Conv -> BN in inference form, (bn, reason) when it is not one, or None."""
    x = bn.inputs[0]
    conv = x.inputs[0] if x.inputs else None
    if conv is None or conv.op != "Conv":
        return None
    if len(consumers(x)) != 1 or any(x is o for o in graph.outputs):
        return bn, f"{x.name} is read by more than the BatchNormalization"
    if bn.attrs.get("training_mode", 0) or len(bn.outputs) > 1:
        return bn, "BatchNormalization in training mode"
    values = [const_value(t) for t in bn.inputs[1:5]]
    w = const_value(conv.inputs[1])
    b = const_value(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
    if w is None or any(v is None for v in values) or (len(conv.inputs) > 2 and conv.inputs[2].name and b is None):
        return bn, f"{conv.name} weights or the BatchNormalization's parameters are computed at run time"
    channels = w.shape[0]
    if any(v.size != channels for v in values):
        return bn, "BatchNormalization parameters are not one per Conv output channel"
    gamma, beta, mean, var = (v.reshape(-1).astype(np.float64) for v in values)
    return bn, (conv, {"w": w, "b": b.reshape(-1) if b is not None else np.zeros(channels), "gamma": gamma,
                       "beta": beta, "mean": mean, "var": var, "eps": float(bn.attrs.get("epsilon", 1e-5))})


def _spreads(ctx: PassContext, sites: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per channel, the measured ``max|y - mean|`` of each Conv output over the feeds (one run for all sites)."""
    model = onnx.ModelProto()
    model.CopyFrom(ctx.model)
    have = {o.name for o in model.graph.output}
    for name, _ in sites:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    runs = run_model(model, ctx.feeds, [name for name, _ in sites])
    out: dict[str, np.ndarray] = {}
    for name, mean in sites:
        spread = np.zeros(mean.size)
        for run in runs:
            y = np.asarray(run[name], np.float64)
            d = np.abs(y - mean.reshape((1, -1) + (1,) * (y.ndim - 2)))
            spread = np.maximum(spread, d.max(axis=tuple(i for i in range(y.ndim) if i != 1)))
        out[name] = spread
    return out
