"""A residual stream with "massive activations" feeding a GroupNorm.

``input[1,C,H,W] -> /conv_in/Conv -> h`` (a few channels carry a bias near 5.5e4, as in large diffusion and
restoration nets) ``-> /block/conv1/Conv`` (reinforces those channels, also just under 65504) ``-> /block/Add``
``h + conv1(h)`` (up to about 1.2e5: the first tensor over FP16's 65504) ``-> GroupNorm`` as PyTorch exports it
(``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add``) ``-> /conv_out/Conv -> output`` (moderate).

Every tensor before the Add fits in FP16; only the sum does not. ONNX Runtime CPU runs an FP16-converted copy in
FP32 internally (see the notes) and sees nothing wrong, while an FP16 engine overflows at the Add and the
normalisation turns that into NaN.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = ["build_residual_groupnorm"]

logger = logging.getLogger(__name__)

_MASSIVE_BIAS = 5.5e4  # per massive channel, in conv_in; conv1 maps it to ~0.95x itself
_GROUPS = 8


def build_residual_groupnorm(*, height: int = 64, width: int = 64, channels: int = 32, seed: int = 0,
                             opset: int = 17) -> onnx.ModelProto:
    """Input ``input`` [1,C,H,W], output ``output`` [1,C,H,W]; GroupNorm with 8 groups."""
    if channels % _GROUPS:
        raise ValueError(f"channels must be a multiple of {_GROUPS}, got {channels}")
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    c = channels
    massive = [0, c // 2 + 1]  # two channels, in different groups

    def kaiming(shape: tuple[int, ...]) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return rng.uniform(-1, 1, shape) / np.sqrt(fan_in)

    w_in = kaiming((c, c, 3, 3))
    b_in = rng.uniform(-0.1, 0.1, c)
    b_in[massive] = _MASSIVE_BIAS * np.array([1.0, -0.9])
    h = b.conv("/conv_in", "input", w_in.astype(np.float32), b_in.astype(np.float32), prefix="conv_in", pad=1)

    w1 = kaiming((c, c, 3, 3)) * 0.5
    w1[:, massive] = 0.0  # the massive channels do not leak into the others ...
    for ch in massive:  # ... but reinforce themselves (centre tap)
        w1[ch, :] = 0.0
        w1[ch, ch, 1, 1] = 0.95
    x = b.conv("/block/conv1", h, w1.astype(np.float32), rng.uniform(-0.1, 0.1, c).astype(np.float32),
               prefix="block.conv1", pad=1)
    y = b.op("/block", "Add", [h, x])

    scope = "/norm"
    shape = b.op(scope, "Shape", [y])
    grouped = b.op(scope, "Reshape", [y, b.ints(scope, [0, _GROUPS, -1])])
    normed = b.op(scope, "InstanceNormalization",
                  [grouped, b.const(scope, np.ones(_GROUPS, np.float32)),
                   b.const(scope, np.zeros(_GROUPS, np.float32))], epsilon=1e-5)
    z = b.op(scope, "Reshape", [normed, shape])
    gamma = (1.0 + rng.uniform(-0.2, 0.2, (c, 1, 1))).astype(np.float32)
    z = b.op(scope, "Mul", [z, b.const(scope, gamma, name="norm.weight")])
    z = b.op(scope, "Add", [z, b.const(scope, rng.uniform(-0.1, 0.1, (c, 1, 1)), name="norm.bias")])

    b.conv("/conv_out", z, kaiming((c, c, 3, 3)).astype(np.float32), np.zeros(c, np.float32), prefix="conv_out",
           pad=1, out_name="output")
    dims = [1, c, height, width]
    logger.debug("residual groupnorm: %s, massive channels %s", dims, massive)
    return b.model(graph_name="residual_groupnorm", inputs=[("input", dims)], outputs=[("output", dims)],
                   doc="residual Add over 65504 feeding GroupNorm (Reshape/InstanceNormalization/Reshape)")
