"""Whole-tensor reductions in two steps, so ORT spreads them over its threads.

ORT reduces a tensor to a scalar on one thread; reduced over its last axis first (one value per
row, rows spread over the intra-op threads) and then to a scalar, the same statistic costs a
sixth on 16 cores (benchmarks/auto_fix_cost.py; a 16x512x512 tensor: 1.9 ms -> 0.3 ms). Max and
min are exact in any order, so their results are bitwise the same; a sum's rounding order
changes (it is read for non-finiteness, and relative errors move by ~1e-7).

A tensor known to be small (under ``ONE_STEP_BELOW`` elements) is reduced in one step: the second
node costs more to build (~15 us in ORT's session set-up, as much again in Python) than it saves in
a run (measured on 2 threads: 3 us at 128K elements, 16 us at 512K, 43 us at 1M).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx_fp16_rewrite.emulation.new_initializers import find

# The op that reduces the partial results of the first step.
_SECOND = {"ReduceMax": "ReduceMax", "ReduceMin": "ReduceMin", "ReduceSum": "ReduceSum",
           "ReduceSumSquare": "ReduceSum"}
# From which opset each op takes ``axes`` as an input instead of an attribute.
_AXES_INPUT = {"ReduceMax": 18, "ReduceMin": 18, "ReduceSum": 13, "ReduceSumSquare": 18}
LAST_AXIS = "__reduce_last_axis"
ONE_STEP_BELOW = 1 << 18


def two_step(nodes: list[onnx.NodeProto], ranks: Mapping[str, int], opset: int,
             new_inits: list[onnx.TensorProto], size: int | None = None) -> list[onnx.NodeProto]:
    """``nodes`` with each whole-tensor reduction (no axes, keepdims=0) of an input of known rank
    >= 2 split into a last-axis reduction and a reduction of its result; ``size``: the element
    count of the tensors reduced (all of one shape), when known (small ones stay in one step)."""
    if size is not None and size < ONE_STEP_BELOW:
        return list(nodes)
    out: list[onnx.NodeProto] = []
    for node in nodes:
        rank = ranks.get(node.input[0]) if node.input else None
        if node.op_type not in _SECOND or len(node.input) != 1 or rank is None or rank < 2 or _has_axes(node):
            out.append(node)
            continue
        axis = -1 if opset >= 11 else rank - 1
        partial = node.output[0] + "__rows"
        first = helper.make_node(node.op_type, [node.input[0]], [partial], name=node.name + "__rows", keepdims=0)
        if opset >= _AXES_INPUT[node.op_type]:
            if find(new_inits, LAST_AXIS) is None:
                new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), LAST_AXIS))
            first.input.append(LAST_AXIS)
        else:
            first.attribute.append(helper.make_attribute("axes", [axis]))
        second = helper.make_node(_SECOND[node.op_type], [partial], list(node.output), name=node.name, keepdims=0)
        out += [first, second]
    return out


def _has_axes(node: onnx.NodeProto) -> bool:
    return any(a.name == "axes" for a in node.attribute)


__all__ = ["ONE_STEP_BELOW", "two_step"]
