"""A NAFNet-style restoration model in its TLC ("Local") test-time form, as the PyTorch exporter writes it.

megvii NAFNet replaces each block's global ``AdaptiveAvgPool2d(1)`` in ``sca`` by ``AvgPool2d`` over a large
local window (``kernel = base_size * train_size / ...``, e.g. 384x384). Its exact (non-fast) path computes the
average from an integral image::

    s = x.cumsum(-1).cumsum(-2)                       # grows to H*W*mean(x): far past 65504 at 512x512
    s = pad(s, (1, 0, 1, 0))
    k1, k2 = min(h, kernel[0]), min(w, kernel[1])
    s1, s2, s3, s4 = s[:, :, :-k1, :-k2], s[:, :, :-k1, k2:], s[:, :, k1:, :-k2], s[:, :, k1:, k2:]
    out = (s4 + s1 - s2 - s3) / (k1 * k2)             # box sum ~ k1*k2*mean(x), also > 65504
    out = pad(out, ((w-_w)//2, (w-_w+1)//2, (h-_h)//2, (h-_h+1)//2), mode="replicate")

So in FP16 the first overflow is the second CumSum of the first block's ``sca``; everything before it is small.
The weights are random (seeded) but shaped like a trained model's: the depthwise conv has a positive bias, so
SimpleGate's output (what ``sca`` integrates) has a positive mean of about 0.6-0.8, and the ending conv is a small
correction on top of the global input residual, so the output looks like the input.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = ["build_nafnet", "demo_inputs"]

logger = logging.getLogger(__name__)

_EPS = 1e-6
_FLOAT_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                       onnx.TensorProto.DOUBLE: np.float64}


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, gain: float = 1.0) -> np.ndarray:
    """PyTorch's default Conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times ``gain``."""
    bound = gain / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _layer_norm_2d(b: GraphBuilder, scope: str, x: str, rng: np.random.Generator, c: int, prefix: str) -> str:
    """NAFNet's LayerNorm2d (normalise over channels), decomposed exactly as torch.onnx exports it."""
    mu = b.reduce_mean(scope, x, [1])
    d = b.op(scope, "Sub", [x, mu])
    sq = b.op(scope, "Pow", [d, b.const(scope, np.float32(2.0))])
    var = b.reduce_mean(scope, sq, [1])
    var = b.op(scope, "Add", [var, b.const(scope, np.float32(_EPS))])
    std = b.op(scope, "Sqrt", [var])
    y = b.op(scope, "Div", [d, std])
    weight = (1.0 + rng.uniform(-0.2, 0.2, (1, c, 1, 1))).astype(np.float32)
    bias = rng.uniform(-0.1, 0.1, (1, c, 1, 1)).astype(np.float32)
    y = b.op(scope, "Mul", [y, b.const(scope, weight, name=f"{prefix}.weight")])
    return b.op(scope, "Add", [y, b.const(scope, bias, name=f"{prefix}.bias")])


def _simple_gate(b: GraphBuilder, scope: str, x: str, c: int) -> str:
    """``x1, x2 = x.chunk(2, dim=1); return x1 * x2``."""
    x1, x2 = b.op_multi(scope, "Split", [x, b.ints(scope, [c, c])], n_out=2, axis=1)
    return b.op(scope, "Mul", [x1, x2])


def _local_avg_pool(b: GraphBuilder, scope: str, x: str, k1: int, k2: int) -> str:
    """NAFNet's ``AvgPool2d`` (non-fast path, auto_pad) over a ``k1 x k2`` window; output has x's H and W.

    Only ``k1`` and ``k2`` enter the graph: the slices use negative ends and the replicate pads are
    ``(k-1)//2, k//2`` (since ``h - _h = k1 - 1``), so the same graph serves any ``H >= k1, W >= k2``.
    """
    s = b.op(scope, "CumSum", [x, b.ints(scope, -1)])
    s = b.op(scope, "CumSum", [s, b.ints(scope, -2)])
    # F.pad(s, (1, 0, 1, 0)): one zero row on top, one zero column on the left.
    s = b.op(scope, "Pad", [s, b.ints(scope, [0, 0, 1, 1, 0, 0, 0, 0]), b.const(scope, np.float32(0.0))],
             mode="constant")
    big = np.iinfo(np.int64).max
    axes, steps = b.ints(scope, [2, 3]), b.ints(scope, [1, 1])

    def window(start: tuple[int, int], end: tuple[int, int]) -> str:
        return b.op(scope, "Slice", [s, b.ints(scope, list(start)), b.ints(scope, list(end)), axes, steps])

    s1 = window((0, 0), (-k1, -k2))
    s2 = window((0, k2), (-k1, big))
    s3 = window((k1, 0), (big, -k2))
    s4 = window((k1, k2), (big, big))
    out = b.op(scope, "Add", [s4, s1])
    out = b.op(scope, "Sub", [out, s2])
    out = b.op(scope, "Sub", [out, s3])
    out = b.op(scope, "Div", [out, b.const(scope, np.float32(k1 * k2))])
    # pad2d = ((w-_w)//2, (w-_w+1)//2, (h-_h)//2, (h-_h+1)//2) with h-_h = k1-1, w-_w = k2-1, mode replicate.
    top, bottom, left, right = (k1 - 1) // 2, k1 // 2, (k2 - 1) // 2, k2 // 2
    return b.op(scope, "Pad", [out, b.ints(scope, [0, 0, top, left, 0, 0, bottom, right])], mode="edge")


def _naf_block(b: GraphBuilder, scope: str, prefix: str, inp: str, c: int, k1: int, k2: int,
               rng: np.random.Generator) -> str:
    """One NAFBlock (DW expand 2, FFN expand 2) with the local ``sca``."""
    x = _layer_norm_2d(b, f"{scope}/norm1", inp, rng, c, f"{prefix}.norm1")
    x = b.conv(f"{scope}/conv1", x, _uniform(rng, (2 * c, c, 1, 1), c), _uniform(rng, (2 * c,), c, 0.1),
               prefix=f"{prefix}.conv1")
    # Depthwise 3x3 with a positive bias: both SimpleGate halves sit around +0.85, so their product (the
    # tensor sca integrates) has a positive mean, as in trained restoration nets.
    dw_bias = rng.uniform(0.7, 1.0, (2 * c,)).astype(np.float32)
    x = b.conv(f"{scope}/conv2", x, _uniform(rng, (2 * c, 1, 3, 3), 9, 0.5), dw_bias, prefix=f"{prefix}.conv2",
               pad=1, group=2 * c)
    x = _simple_gate(b, f"{scope}/sg", x, c)
    att = _local_avg_pool(b, f"{scope}/sca/sca.0", x, k1, k2)
    att = b.conv(f"{scope}/sca/sca.1", att, _uniform(rng, (c, c, 1, 1), c), _uniform(rng, (c,), c),
                 prefix=f"{prefix}.sca.1")
    x = b.op(scope, "Mul", [x, att])
    x = b.conv(f"{scope}/conv3", x, _uniform(rng, (c, c, 1, 1), c), _uniform(rng, (c,), c, 0.1),
               prefix=f"{prefix}.conv3")
    beta = rng.uniform(0.05, 0.3, (1, c, 1, 1)).astype(np.float32)
    y = b.op(scope, "Add", [inp, b.op(scope, "Mul", [x, b.const(scope, beta, name=f"{prefix}.beta")])])

    x = _layer_norm_2d(b, f"{scope}/norm2", y, rng, c, f"{prefix}.norm2")
    x = b.conv(f"{scope}/conv4", x, _uniform(rng, (2 * c, c, 1, 1), c), _uniform(rng, (2 * c,), c),
               prefix=f"{prefix}.conv4")
    x = _simple_gate(b, f"{scope}/sg_1", x, c)
    x = b.conv(f"{scope}/conv5", x, _uniform(rng, (c, c, 1, 1), c), _uniform(rng, (c,), c, 0.1),
               prefix=f"{prefix}.conv5")
    gamma = rng.uniform(0.05, 0.3, (1, c, 1, 1)).astype(np.float32)
    return b.op(scope, "Add", [y, b.op(scope, "Mul", [x, b.const(scope, gamma, name=f"{prefix}.gamma")])])


def build_nafnet(*, height: int = 512, width: int = 512, channels: int = 16, blocks: int = 2,
                 kernel: tuple[int, int] = (384, 384), dynamic: bool = False, seed: int = 0,
                 opset: int = 17) -> onnx.ModelProto:
    """NAFNet-Local: ``intro`` Conv3x3 3->C, ``blocks`` NAFBlocks (``/encoders.0/encoders.0.{i}/...``),
    ``ending`` Conv3x3 C->3, plus the global input residual. Input ``input`` and output ``output`` [1,3,H,W].

    With ``dynamic=True`` H and W are the symbolic dims ``height``/``width``; the graph then uses
    ``k = kernel`` (not ``min(h, kernel)``) and is valid for inputs with ``H >= kernel[0]`` and ``W >= kernel[1]``.
    Every node in a block's ``sca`` (and no other node) has ``sca`` in its name.
    """
    if opset < 13:
        raise ValueError(f"opset {opset} is not supported (need >= 13: Split takes its sizes as an input)")
    if blocks < 1 or channels < 1:
        raise ValueError("blocks and channels must be >= 1")
    if dynamic:
        k1, k2 = kernel
        dims: list[int | str] = [1, 3, "height", "width"]
    else:
        k1, k2 = min(height, kernel[0]), min(width, kernel[1])
        dims = [1, 3, height, width]
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    c = channels
    x = b.conv("/intro", "input", _uniform(rng, (c, 3, 3, 3), 27), _uniform(rng, (c,), 27), prefix="intro",
               pad=1)
    for i in range(blocks):
        x = _naf_block(b, f"/encoders.0/encoders.0.{i}", f"encoders.0.{i}", x, c, k1, k2, rng)
    x = b.conv("/ending", x, _uniform(rng, (3, c, 3, 3), 9 * c, 0.3), _uniform(rng, (3,), 9 * c, 0.1),
               prefix="ending", pad=1)
    b.op("", "Add", [x, "input"], out_names=["output"])
    logger.debug("nafnet: %d blocks, width %d, window %dx%d, dynamic=%s", blocks, c, k1, k2, dynamic)
    return b.model(graph_name="nafnet_local", inputs=[("input", dims)], outputs=[("output", dims)],
                   doc=f"NAFNet-Local style, {blocks} blocks, width {c}, local avg-pool window {k1}x{k2}")


def demo_inputs(model: onnx.ModelProto, *, seed: int = 0) -> dict[str, np.ndarray]:
    """U(0,1) feeds for every graph input that is not an initializer; all dims must be static ints."""
    rng = np.random.default_rng(seed)
    init_names = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in init_names:
            continue
        tensor_type = value.type.tensor_type
        dtype = _FLOAT_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise ValueError(f"input {value.name!r}: only float inputs are supported")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if any(d is None for d in dims):
            raise ValueError(f"input {value.name!r} has symbolic dims {dims}; build the model with static shapes")
        feeds[value.name] = rng.uniform(0.0, 1.0, dims).astype(dtype)
    return feeds
