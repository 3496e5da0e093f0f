"""A guided filter (He et al., "Guided Image Filtering") whose box filters are integral images.

Each ``f_mean`` is written the way exported guided filters compute it: zero-pad by ``r+1`` before
and ``r`` after, CumSum over W, CumSum over H, the four-corner difference ``A - B - C + D`` (same
size as the input, windows clipped at the border), and a divide by the per-pixel window counts
``N`` (a constant, as constant folding leaves ``box(ones)`` for a static shape). Then::

    mean_I = f(I), mean_p = f(p), corr_I = f(I*I), corr_Ip = f(I*p)
    a = (corr_Ip - mean_I * mean_p) / (corr_I - mean_I^2 + eps),  b = mean_p - a * mean_I
    q = f(a) * I + f(b)

With U(0, 1) inputs the integral images reach about ``S^2 / 2`` (the largest sums mean 0.5
values): at 224x224 that is ~2.5e4, *inside* FP16's 65504, so FP16 fails there on precision alone
(sums of ~2.5e4 kept to 16, cancelled down to a 17x17 window of ~145); at 1024x1024 it is ~5.2e5
and overflows. Nodes are named like the PyTorch exporter's (``/box_mean_I/CumSum``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = ["build_guided_filter", "guided_filter_reference", "window_counts"]

logger = logging.getLogger(__name__)


def window_counts(size: int, radius: int) -> np.ndarray:
    """[1, 1, size, size]: how many pixels of the image each (2r+1)^2 window covers."""
    i = np.arange(size)
    per_axis = (np.minimum(i + radius, size - 1) - np.maximum(i - radius, 0) + 1).astype(np.float64)
    return np.outer(per_axis, per_axis)[None, None].astype(np.float32)


def _box_mean(b: GraphBuilder, scope: str, x: str, radius: int, counts: str) -> str:
    k = 2 * radius + 1
    pads = b.ints(scope, [0, 0, radius + 1, radius + 1, 0, 0, radius, radius])
    s = b.op(scope, "Pad", [x, pads, b.const(scope, np.float32(0.0))], mode="constant")
    s = b.op(scope, "CumSum", [s, b.ints(scope, 3)])
    s = b.op(scope, "CumSum", [s, b.ints(scope, 2)])
    axes, steps, big = b.ints(scope, [2, 3]), b.ints(scope, [1, 1]), np.iinfo(np.int64).max

    def corner(start: tuple[int, int], end: tuple[int, int]) -> str:
        return b.op(scope, "Slice", [s, b.ints(scope, list(start)), b.ints(scope, list(end)), axes, steps])

    a_ = corner((k, k), (big, big))
    b_ = corner((0, k), (-k, big))
    c_ = corner((k, 0), (big, -k))
    d_ = corner((0, 0), (-k, -k))
    box = b.op(scope, "Add", [b.op(scope, "Sub", [b.op(scope, "Sub", [a_, b_]), c_]), d_])
    return b.op(scope, "Div", [box, counts])


def build_guided_filter(*, size: int = 224, radius: int = 8, eps: float = 1e-2, channels: int = 3,
                        opset: int = 17) -> onnx.ModelProto:
    """Inputs ``guide`` [1, 1, S, S] and ``src`` [1, C, S, S]; output ``output`` [1, C, S, S].
    Six box filters (mean_I, mean_p, corr_I, corr_Ip, mean_a, mean_b), window ``2*radius+1``."""
    if not 0 < 2 * radius + 1 <= size:
        raise ValueError(f"window 2*radius+1 must be in (0, size]: radius={radius}, size={size}")
    b = GraphBuilder(opset)
    counts = b.const("/N", window_counts(size, radius), name="N")
    i, p = "guide", "src"
    mean_i = _box_mean(b, "/box_mean_I", i, radius, counts)
    mean_p = _box_mean(b, "/box_mean_p", p, radius, counts)
    corr_i = _box_mean(b, "/box_corr_I", b.op("/corr_I", "Mul", [i, i]), radius, counts)
    corr_ip = _box_mean(b, "/box_corr_Ip", b.op("/corr_Ip", "Mul", [i, p]), radius, counts)
    var_i = b.op("/var_I", "Sub", [corr_i, b.op("/var_I", "Mul", [mean_i, mean_i])])
    cov_ip = b.op("/cov_Ip", "Sub", [corr_ip, b.op("/cov_Ip", "Mul", [mean_i, mean_p])])
    a = b.op("/a", "Div", [cov_ip, b.op("/a", "Add", [var_i, b.const("/a", np.float32(eps))])])
    bb = b.op("/b", "Sub", [mean_p, b.op("/b", "Mul", [a, mean_i])])
    mean_a = _box_mean(b, "/box_mean_a", a, radius, counts)
    mean_b = _box_mean(b, "/box_mean_b", bb, radius, counts)
    b.op("/q", "Add", [b.op("/q", "Mul", [mean_a, i]), mean_b], out_names=["output"])
    logger.debug("guided filter: %dx%d, radius %d, eps %g, %d channels", size, size, radius, eps, channels)
    return b.model(graph_name="guided_filter",
                   inputs=[("guide", [1, 1, size, size]), ("src", [1, channels, size, size])],
                   outputs=[("output", [1, channels, size, size])],
                   doc=f"guided filter, {2 * radius + 1}x{2 * radius + 1} integral-image box filters, eps {eps:g}")


def guided_filter_reference(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """The same filter in float64 numpy with direct window sums (for checking the graph)."""
    def box_mean(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        size = x.shape[-1]
        k = 2 * radius + 1
        padded = np.pad(x, [(0, 0), (0, 0), (radius, radius), (radius, radius)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))
        return windows.sum(axis=(-2, -1)) / window_counts(size, radius).astype(np.float64)

    g, p = np.asarray(guide, np.float64), np.asarray(src, np.float64)
    mean_i, mean_p = box_mean(g), box_mean(p)
    a = (box_mean(g * p) - mean_i * mean_p) / (box_mean(g * g) - mean_i**2 + eps)
    b = mean_p - a * mean_i
    return box_mean(a) * g + box_mean(b)
