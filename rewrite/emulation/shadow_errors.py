"""Per-tensor FP16-vs-FP32 error statistics beside the emulation's FP32 shadow.

Exact statistics (the sum of squared differences over the whole tensor, and of squared FP32
values) cost five passes over every tensor: on NAFNet 512x512 more than the emulation and its
shadow together. A large tensor's relative L2 error is instead estimated from a systematic
sample of about ``SAMPLE`` elements, read in the graph (a strided Slice of a free Reshape; only
scalars leave it): the flat tensor as rows of ``BLOCK`` contiguous elements, every k-th row, k
the smallest prime giving at most ``SAMPLE`` elements (an odd stride visits every column of
power-of-two-sized layouts). Rows, not single elements: a sampled element a cache line made the
Slices 12 % of NAFNet's diagnosis run (0.3 s); a row of 16 reads one line for 16 elements. A size
that rows do not divide takes every k-th element instead.
Non-finiteness stays exact: one ReduceSum of the whole emulated tensor (NaN and inf propagate
through sums). Tensors up to ``SAMPLE`` elements, or of unknown size, keep the exact statistics.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fp16_rewrite.emulation.fp16_graph_edits import SHADOW, error_nodes
from onnx_fp16_rewrite.emulation.reductions import two_step
from onnx_fp16_rewrite.emulation.new_initializers import find

# Elements in a sampled error statistic (tensors up to this size are measured exactly).
SAMPLE = 1 << 16
BLOCK = 16  # contiguous elements a sampled row (64 bytes of FP32: one cache line)
_FLAT = "__err_flat"
_ROWS = "__err_rows"
_AXIS0 = "__err_axis0"
_END = "__err_end"


def shadow_statistics(site, rank: int | None, size: int | None, opset: int, new_inits: list[onnx.TensorProto], *,
                      errors: bool = True, profile: bool = False, ranged: bool = True) -> list[onnx.NodeProto]:
    """The statistics of ``site``'s tensor and its FP32 twin (``site`` gets their output names):
    the error statistics (``errors``; the twin's max/min with ``ranged`` unless ``profile``
    measures the twin's whole range profile, analysis.range_profile). Reductions in two steps."""
    from onnx_fp16_rewrite.analysis.range_profile import stat_initializers, stat_nodes

    out, twin = site.tensor, site.tensor + SHADOW
    nodes: list[onnx.NodeProto] = []
    if errors:
        errs, site.nonfinite_out = shadow_error_nodes(out, size, opset, ranged and not profile, new_inits)
        nodes += errs
        site.err_out, site.ref_out = out + "__err", out + "__ref"
        if ranged and not profile:
            site.shadow_max_out, site.shadow_min_out = out + "__fmax", out + "__fmin"
    if profile:
        if find(new_inits, "__prof_frac") is None:
            new_inits += stat_initializers(np.random.default_rng(0), opset >= 10)
        site.profile_outs = stat_nodes(twin, nodes, opset >= 10, size, new_inits)
    return two_step(nodes, {twin: rank, out: rank, out + "__e_diff": rank}, opset, new_inits, size)


def shadow_error_nodes(tensor: str, size: int | None, opset: int, ranged: bool,
                       new_inits: list[onnx.TensorProto]) -> tuple[list[onnx.NodeProto], str | None]:
    """Error statistics of ``tensor`` against its twin (outputs ``<t>__err``, ``<t>__ref``, with
    ``ranged`` the twin's ``<t>__fmax``/``<t>__fmin``); returns the nodes and the name of the
    exact non-finiteness sum (None where the error statistics are exact, which shows it)."""
    exact = error_nodes(tensor)
    if not ranged:
        exact = [n for n in exact if n.output[0] not in (tensor + "__fmax", tensor + "__fmin")]
    if size is None or size <= SAMPLE or opset < 10:
        return exact, None
    block = BLOCK if size % BLOCK == 0 else 1
    # In elements, or in rows of ``block``: either way a sample of about size / stride elements.
    stride = _prime_at_least(-(-size // SAMPLE))
    _constants(new_inits)
    p = tensor + "__s"
    # One constant pair per stride, shared: a constant per tensor made NAFNetLocal's diagnosis graph
    # carry 3.6K initializers that ORT parses and places one by one.
    step, start = f"__err_step_{stride}", f"__err_start_{stride}"
    if find(new_inits, step) is None:
        new_inits += [numpy_helper.from_array(np.array([stride], np.int64), step),
                      numpy_helper.from_array(np.array([stride // 2], np.int64), start)]
    nodes = [n for n in exact if n.op_type in ("ReduceMax", "ReduceMin")]
    for src, tag in ((tensor, "emu"), (tensor + SHADOW, "ref")):
        nodes += [
            helper.make_node("Reshape", [src, _ROWS if block > 1 else _FLAT], [f"{p}_{tag}_flat"],
                             name=f"{p}_{tag}_flat"),
            helper.make_node("Slice", [f"{p}_{tag}_flat", start, _END, _AXIS0, step], [f"{p}_{tag}"],
                             name=f"{p}_{tag}"),
        ]
    nodes += [
        helper.make_node("Sub", [f"{p}_emu", f"{p}_ref"], [p + "_diff"], name=p + "_diff"),
        helper.make_node("ReduceSumSquare", [p + "_diff"], [tensor + "__err"], name=p + "_sse", keepdims=0),
        helper.make_node("ReduceSumSquare", [f"{p}_ref"], [tensor + "__ref"], name=p + "_ssq", keepdims=0),
        helper.make_node("ReduceSum", [tensor], [tensor + "__nf"], name=p + "_nf", keepdims=0),
    ]
    return nodes, tensor + "__nf"


def _constants(new_inits: list[onnx.TensorProto]) -> None:
    if find(new_inits, _FLAT) is not None:
        return
    new_inits += [numpy_helper.from_array(np.array([-1], np.int64), _FLAT),
                  numpy_helper.from_array(np.array([-1, BLOCK], np.int64), _ROWS),
                  numpy_helper.from_array(np.array([0], np.int64), _AXIS0),
                  numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), _END)]


def _prime_at_least(n: int) -> int:
    n = max(n, 3)  # not 2: a power-of-two stride aliases with power-of-two widths
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n


__all__ = ["SAMPLE", "shadow_error_nodes", "shadow_statistics"]
