"""Statistics sites of the emulation graph: a tensor, the node that made it, and its reduction outputs.

``fp16_emulation`` adds the reductions while it rewrites the graph; ``fp16_report`` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import onnx
from onnx import helper

BODY_STATS = ("max", "min", "sum", "err", "ref", "fmax", "fmin")  # StatSite's order (control_flow's body sites)
# Ops whose output is their data input's values in the same flat order (a view): every statistic
# of it, a sampled one too (the same elements at the same flat positions), is its input's number.
SAME_FLAT_VALUES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


@dataclass
class StatSite:
    """A tensor the emulation takes statistics of, and the graph outputs that carry them."""

    tensor: str
    node: str
    op: str
    fp16: bool
    max_out: str | None  # None in a shadow graph without statistics (errors only)
    min_out: str | None
    sum_out: str | None
    # With an FP32 shadow: sum of squared FP16-vs-FP32 differences, and of squared FP32 values.
    err_out: str | None = None
    ref_out: str | None = None
    shadow_max_out: str | None = None
    shadow_min_out: str | None = None
    # Sampled error statistics (emulation.shadow_errors): the exact sum that shows non-finiteness.
    nonfinite_out: str | None = None
    # ``twin_profile``: the FP32 twin's range statistics (max, min, sum, sample; analysis.range_profile).
    profile_outs: tuple[str, ...] = ()

    def outputs(self) -> tuple[str, ...]:
        extra = (self.err_out, self.ref_out, self.shadow_max_out, self.shadow_min_out) if self.err_out else ()
        return tuple(n for n in (self.max_out, self.min_out, self.sum_out) + extra + (self.nonfinite_out,)
                     + self.profile_outs if n)


def sum_node(tensor: str, out: str) -> onnx.NodeProto:
    """The whole-tensor sum of ``tensor``: non-finite where some value is (inf and NaN
    propagate through sums); ``reductions.two_step`` spreads it over the threads."""
    return helper.make_node("ReduceSum", [tensor], [out], name=out, keepdims=0)


def site_stat_nodes(out: str, raw: str, node: onnx.NodeProto, fp16: bool, nodes: list[onnx.NodeProto],
                    nonfinite_only: bool = False) -> StatSite:
    """Three reductions of the FP32-computed value, no elementwise temporaries (they made the
    emulation 10x slower than a plain run): max and min give the absmax, and the sum is
    non-finite exactly when some value is (ORT's ReduceMax does not reliably propagate NaN).
    ``nonfinite_only``: one sum of the stored value (an FP16 overflow is inf there)."""
    p = f"{out}__stat"
    if nonfinite_only:
        nodes.append(sum_node(out, p + "_sum"))
        return StatSite(out, node.name, node.op_type, fp16, None, None, p + "_sum")
    nodes += [
        helper.make_node("ReduceMax", [raw], [p + "_max"], name=p + "_max", keepdims=0),
        helper.make_node("ReduceMin", [raw], [p + "_min"], name=p + "_min", keepdims=0),
        helper.make_node("ReduceSum", [raw], [p + "_sum"], name=p + "_sum", keepdims=0),
    ]
    return StatSite(out, node.name, node.op_type, fp16, p + "_max", p + "_min", p + "_sum")


def alias_site(node: onnx.NodeProto, out: str, sites_of: Mapping[str, StatSite], fp16: bool,
               sizes: Mapping[str, int], shadow_ranged: bool) -> StatSite | None:
    """``out``'s site as its data input's statistics, where ``node`` only reshapes that input
    (same precision, same known size: no rounding between them, the same sample positions);
    None where ``out`` needs statistics of its own. Saves a tensor's five to twelve nodes (ORT
    set-up time grows with them): a fifth of a VAE decoder's tensors are GroupNorm's Reshapes.
    ``shadow_ranged``: whether ``out`` would get its twin's max/min (the input's site must agree)."""
    if node.op_type not in SAME_FLAT_VALUES or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    src = sites_of.get(node.input[0])
    size = sizes.get(out)
    if src is None or src.fp16 != fp16 or size is None or size != sizes.get(node.input[0]):
        return None
    if (src.shadow_max_out is not None) != shadow_ranged:
        return None
    return replace(src, tensor=out, node=node.name, op=node.op_type)


__all__ = ["BODY_STATS", "SAME_FLAT_VALUES", "StatSite", "alias_site", "site_stat_nodes", "sum_node"]
