"""split-cumsum: a CumSum along a long axis becomes a blocked scan, or a short one a triangular MatMul.

``scan_form="blocked"`` (default): pad the axis to a multiple of ``block_size`` and view it as blocks;
``y = P + O`` with ``P`` the prefix sums inside each block (values at most ``block_size * max|x|``)
and ``O`` the carried offsets, an exclusive scan over the block totals (the part that grows). The
two parts are separate tensors, so the growing part can be treated on its own: pinned to FP32
(``pin_offsets``), rescaled, or cancelled before it is stored (box-filter does that for window
sums). Accuracy gain without any pinning: an FP16 running sum (TensorRT <= 10.7 builds CumSum as a
loop whose accumulator has the tensor's type; ``check --strict-cumsum``) stalls once the sum's
ulp exceeds the increments (at 2048 for +0.5 steps); in blocks it only ever adds ``block_size``
values, and the offsets add ``L / block_size`` block totals.
Every scan it emits runs over axis 1 of a rank-3 view, so a model with CumSums on several axes ends
up with CumSums on one axis only (TensorRT 10.8-10.11 treat several CumSums "as if... the same
axis", NVIDIA/TensorRT#4551); ``reverse`` is done by flipping (Slice with step -1) because
TensorRT's ICumulativeLayer ignores it (#4513). Dynamic lengths are padded with shape arithmetic.

``scan_form="matmul"``: ``y = x @ U`` with ``U`` an ``L x L`` triangular ones matrix (strict for ``exclusive``,
lower for ``reverse``): FP16 matrix units accumulate in FP32 and there is no CumSum left at all.
It costs ``2 L`` FLOPs per element, so it is for short static axes (``max_matmul_length``).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.analysis.flops import tensor_shapes
from onnx_fp16_rewrite.pipeline.graph_edit import Emitter, carry_pins, cumsum_attrs
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                onnx.TensorProto.DOUBLE: np.float64}
_INT64_MIN = np.iinfo(np.int64).min


class SplitCumSum(Pass):
    name = "split-cumsum"
    summary = "CumSum as a blocked scan (in-block sums + carried block offsets) or, short axes, a triangular MatMul"

    def __init__(self, *, scan_form: Literal["blocked", "matmul"] = "blocked", block_size: int = 64,
                 min_length: int = 256, max_matmul_length: int = 1024, pin_offsets: bool = False) -> None:
        """``blocked`` rewrites CumSums whose axis is at least ``min_length`` long (or dynamic), in
        blocks of ``block_size``; ``matmul`` rewrites those with a static axis of at most
        ``max_matmul_length``. ``pin_offsets`` pins the offsets' scan and the final Add to FP32."""
        if scan_form not in ("blocked", "matmul"):
            raise BadInputError(f"split-cumsum: scan_form must be blocked or matmul, got {scan_form!r}")
        if block_size < 2 or min_length < 1 or max_matmul_length < 1:
            raise BadInputError("split-cumsum: block_size must be >= 2, min_length and max_matmul_length >= 1")
        self.scan_form = scan_form
        self.block_size = int(block_size)
        self.min_length = int(min_length)
        self.max_matmul_length = int(max_matmul_length)
        self.pin_offsets = bool(pin_offsets)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        shapes, types = tensor_shapes(ctx.model)
        for node in [n for n in graph.nodes if n.op == "CumSum"]:
            x, y = node.inputs[0], node.outputs[0]
            axis, exclusive, reverse = cumsum_attrs(node)
            shape = shapes.get(x.name)
            dtype = _FLOAT_TYPES.get(types.get(x.name, 0))
            reason = None
            if axis is None:
                reason = "axis computed at run time (fold constants first)"
            elif shape is None:
                reason = "rank unknown"
            elif dtype is None:
                reason = "not a float CumSum (integer prefix sums are exact already)"
            elif not -len(shape) <= axis < len(shape):
                reason = f"axis {axis} out of range for rank {len(shape)}"
            elif self.scan_form == "blocked" and graph.opset < 13:
                reason = f"opset {graph.opset} < 13 (the blocked scan needs ReduceSum with axes as an input)"
            if reason is None:
                a = axis % len(shape)
                reason = self._check(shape, a)
            if reason is not None:
                result.skipped.append(Site(node.name, node.op, reason))
                continue
            attrs = f"axis {axis}{f' (= {a})' if axis < 0 else ''}, length {shape[a] or 'dynamic'}, " \
                    f"exclusive={exclusive}, reverse={reverse}"
            node.outputs.clear()  # the new nodes produce y; cleanup drops the old CumSum
            e = Emitter(graph, node.name + "/split")
            if self.scan_form == "matmul":
                _matmul(e, x, y, shape, a, exclusive, reverse, dtype)
                detail = f"{attrs}: MatMul with a {shape[a]}x{shape[a]} triangular ones matrix"
            else:
                pinned = _blocked(e, x, y, shape, a, exclusive, reverse, self.block_size, dtype)
                detail = f"{attrs}: blocked scan, blocks of {self.block_size}" + \
                         (" (reverse by flipping)" if reverse else "")
                if self.pin_offsets:
                    for n in pinned:
                        ctx.plan.pin(n.name, f"carried block offsets of {node.name} (split-cumsum pin_offsets)")
                    detail += "; offsets pinned to FP32"
            if carry_pins(ctx.plan, [node.name], e.nodes):
                detail += "; the CumSum was pinned to FP32: its replacement is too"
            logger.debug("split-cumsum %s: %s", node.name, detail)
            result.modified = True
            result.rewritten.append(Site(node.name, node.op, detail))
        return result

    def _check(self, shape: tuple, a: int) -> str | None:
        length, inner = shape[a], shape[a + 1:]
        if self.scan_form == "matmul":
            if length is None:
                return "dynamic length: the matmul form needs a static axis (use scan_form=blocked)"
            if length > self.max_matmul_length:
                return (f"axis length {length} > max_matmul_length {self.max_matmul_length}: "
                        f"a {length}x{length} MatMul costs {2 * length} FLOPs per element")
            if a < len(shape) - 1 and any(d is None for d in inner):
                return "dims after the axis are dynamic"
            return None
        if length is not None and length < self.min_length:
            return (f"short axis ({length} < min_length {self.min_length}): nothing to split "
                    "(scan_form=matmul handles short axes)")
        if length is not None and length <= self.block_size:
            return f"axis length {length} fits in one block of {self.block_size}"
        if any(d is None for d in inner):
            return "dims after the axis are dynamic: the rank-3 block view needs them static"
        return None


def _flip(e: Emitter, x: gs.Tensor, a: int, dtype: type, out: gs.Variable | None = None) -> gs.Tensor:
    return e.op("Slice", [x, e.ints([-1]), e.ints([_INT64_MIN]), e.ints([a]), e.ints([-1])], dtype=dtype, out=out)


def _matmul(e: Emitter, x: gs.Tensor, y: gs.Variable, shape: tuple, a: int, exclusive: int, reverse: int,
            dtype: type) -> None:
    n, rank = shape[a], len(shape)
    i, j = np.indices((n, n))
    # y[..., j] = sum_i x[..., i] * U[i, j]: forward sums i <= j, reverse i >= j; exclusive drops i == j.
    keep = (i >= j) if reverse else (i <= j)
    if exclusive:
        keep &= i != j
    tri = keep.astype(dtype)
    if a == rank - 1:
        e.op("MatMul", [x, e.const(tri, dtype)], out=y)
        return
    inner = int(np.prod(shape[a + 1:], dtype=np.int64))
    x3 = e.op("Reshape", [x, e.ints([-1, n, inner])], dtype=dtype)
    y3 = e.op("MatMul", [e.const(tri.T, dtype), x3], dtype=dtype)  # [n, n] @ [G, n, inner]
    e.op("Reshape", [y3, _shape_of(e, x, shape)], out=y)


def _shape_of(e: Emitter, x: gs.Tensor, shape: tuple) -> gs.Tensor:
    if all(d is not None for d in shape):
        return e.ints(list(shape))
    return e.op("Shape", [x], dtype=np.int64)


def _blocked(e: Emitter, x: gs.Tensor, y: gs.Variable, shape: tuple, a: int, exclusive: int, reverse: int,
             block: int, dtype: type) -> list[gs.Node]:
    """Emit the blocked scan producing ``y``; returns the nodes that carry the offsets."""
    rank, length = len(shape), shape[a]
    inner = int(np.prod(shape[a + 1:], dtype=np.int64))
    if reverse:
        x = _flip(e, x, a, dtype)
    if length is not None:
        nb = -(-length // block)
        pad = nb * block - length
        pad_t, nb_t = (e.ints([0] * (rank + a) + [pad] + [0] * (rank - a - 1)) if pad else None), e.ints([nb])
        length_t = e.ints([length])
        padded_shape = list(shape)
        padded_shape[a] = nb * block
    else:  # dynamic length: pad = (block - L % block) % block, nb = (L + pad) / block, at run time
        i64 = np.int64
        length_t = e.op("Slice", [e.op("Shape", [x], dtype=i64), e.ints([a]), e.ints([a + 1])], dtype=i64)
        b_t = e.ints([block])
        pad_v = e.op("Mod", [e.op("Sub", [b_t, e.op("Mod", [length_t, b_t], dtype=i64)], dtype=i64), b_t],
                     dtype=i64)
        pad_t = e.op("Concat", [e.ints([0] * (rank + a)), pad_v] +
                     ([e.ints([0] * (rank - a - 1))] if a < rank - 1 else []), {"axis": 0}, dtype=i64)
        nb_t = e.op("Div", [e.op("Add", [length_t, pad_v], dtype=i64), b_t], dtype=i64)
        pad = None
        padded_shape = None
    if pad_t is not None:
        x = e.op("Pad", [x, pad_t], {"mode": "constant"}, dtype=dtype)
    x3 = e.op("Reshape", [x, e.ints([-1, block, inner])], dtype=dtype)  # [outer * nb, block, inner]
    part = e.op("CumSum", [x3, e.ints(1)], {"exclusive": exclusive}, dtype=dtype)
    totals = e.op("ReduceSum", [x3, e.ints([1])], {"keepdims": 1}, dtype=dtype)  # [outer * nb, 1, inner]
    by_block = e.op("Reshape", [totals, e.op("Concat", [e.ints([-1]), nb_t, e.ints([inner])], {"axis": 0},
                                              dtype=np.int64)], dtype=dtype)  # [outer, nb, inner]
    offsets = e.op("CumSum", [by_block, e.ints(1)], {"exclusive": 1}, dtype=dtype)
    offset_scan = e.nodes[-1]
    offsets = e.op("Reshape", [offsets, e.ints([-1, 1, inner])], dtype=dtype)
    total = e.op("Add", [part, offsets], dtype=dtype)
    add = e.nodes[-1]
    full_shape = e.ints(padded_shape) if padded_shape is not None and None not in padded_shape \
        else e.op("Shape", [x], dtype=np.int64)
    last_needed = pad != 0 or reverse
    out = e.op("Reshape", [total, full_shape], dtype=dtype, out=None if last_needed else y)
    if pad != 0:  # None (dynamic) or > 0: crop the padding
        out = e.op("Slice", [out, e.ints([0]), length_t, e.ints([a])], dtype=dtype, out=None if reverse else y)
    if reverse:
        _flip(e, out, a, dtype, out=y)
    return [offset_scan, add]
