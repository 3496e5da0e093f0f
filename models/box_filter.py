"""The integral-image box filter from the mixed-precision notes ("Test model and part (a)").

``x[1,C,S,S] -> Conv3x3 (positive weights) -> CumSum(H) -> CumSum(W) = integral -> 4 Slices -> Sub, Sub, Add
(valid window box sum) -> Div(window^2) -> Conv1x1 to 8 channels -> y``.

The integral image grows to ``S*S*mean``: with U(0,1) inputs at 256x256 its absmax is about 1.4e5, over FP16's
65504, while the box sum and the output stay small. Tensors carry the notes' names (``cs_h``, ``integral``,
``A``, ``B``, ``Cc``, ``D``, ``AB``, ``ABC``, ``box``, ``avg``) so numbers can be compared with them directly.
The notes fed U(0,1)*4 to weights summing to about 1.1; here the weights are 4x larger and the demo input is
U(0,1), which gives the same magnitudes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = ["build_integral_box_filter"]

logger = logging.getLogger(__name__)

# Per output channel the 3x3 weights are U(0, 1) * _WEIGHT_SCALE, i.e. they sum to about 144 * 0.055 / 2 = 4.
_WEIGHT_SCALE = 0.055


def build_integral_box_filter(*, size: int = 256, channels: int = 16, window: int = 3, seed: int = 0,
                              opset: int = 17) -> onnx.ModelProto:
    """Input ``x`` [1, channels, size, size], output ``y`` [1, 8, size-window, size-window]."""
    if not 0 < window < size:
        raise ValueError(f"window must be in (0, size): got window={window}, size={size}")
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    c, w = channels, window
    weight = (rng.uniform(0.0, 1.0, (c, c, 3, 3)) * _WEIGHT_SCALE).astype(np.float32)
    h = b.conv("/conv", "x", weight, np.zeros(c, np.float32), prefix="conv", pad=1)
    scope = "/box"
    h = b.op(scope, "CumSum", [h, b.ints(scope, 2)], out_names=["cs_h"])
    integral = b.op(scope, "CumSum", [h, b.ints(scope, 3)], out_names=["integral"])
    big = np.iinfo(np.int64).max
    axes, steps = b.ints(scope, [2, 3]), b.ints(scope, [1, 1])

    def window_slice(start: tuple[int, int], end: tuple[int, int], name: str) -> str:
        ins = [integral, b.ints(scope, list(start)), b.ints(scope, list(end)), axes, steps]
        return b.op(scope, "Slice", ins, out_names=[name])

    a = window_slice((w, w), (big, big), "A")
    b_ = window_slice((0, w), (-w, big), "B")
    cc = window_slice((w, 0), (big, -w), "Cc")
    d = window_slice((0, 0), (-w, -w), "D")
    ab = b.op(scope, "Sub", [a, b_], out_names=["AB"])
    abc = b.op(scope, "Sub", [ab, cc], out_names=["ABC"])
    box = b.op(scope, "Add", [abc, d], out_names=["box"])
    avg = b.op(scope, "Div", [box, b.const(scope, np.float32(w * w))], out_names=["avg"])
    out_weight = rng.uniform(-1, 1, (8, c, 1, 1)) / np.sqrt(c)
    b.conv("/head", avg, out_weight.astype(np.float32), np.zeros(8, np.float32), prefix="head", out_name="y")
    out = size - w
    logger.debug("box filter: size %d, %d channels, window %d", size, c, w)
    return b.model(graph_name="integral_box_filter", inputs=[("x", [1, c, size, size])],
                   outputs=[("y", [1, 8, out, out])], doc=f"{w}x{w} box filter via an integral image")
