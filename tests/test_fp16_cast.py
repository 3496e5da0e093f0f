"""ORT's Cast converts FP32 to FP16 with the very bits numpy's astype gives (io.fp16_cast)."""

import numpy as np
import pytest

from onnx_fp16_rewrite.io import fp16_cast


def _edge_values() -> np.ndarray:
    """Ties between FP16 neighbours, FP16 subnormals and below, the range's edge, infinities, zeros."""
    rng = np.random.default_rng(0)
    h = rng.integers(0, 0x7C00, 20000, dtype=np.uint16).view(np.float16).astype(np.float32)  # finite FP16 values
    up = np.nextafter(h, np.float32(np.inf))
    with np.errstate(over="ignore"):  # exact midpoints (FP32 holds them): round to even
        half_gap = np.abs(np.spacing(h.astype(np.float16))).astype(np.float64) / 2
        ties = (h.astype(np.float64) + half_gap).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 7e4, -65520.0, 2.0**-24, 2.0**-25,
                        2.0**-25 * 1.0000001, 2.0**-26, 6.1e-5, 1e-45, -1e-45], np.float32)
    wide = (rng.standard_normal(40000) * np.exp(rng.uniform(-20, 12, 40000))).astype(np.float32)
    values = np.concatenate([h, -h, up, ties, -ties, special, wide])
    return np.concatenate([values] * (1 + fp16_cast.MIN_ELEMENTS // values.size))


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("kind", ["to_fp16", "round_fp16"])
def test_ort_cast_gives_numpys_bits(kind, clamp):
    values = _edge_values()
    assert values.size >= fp16_cast.MIN_ELEMENTS  # the ORT path
    # clamp: the ORT graph's Clip node gives numpy's np.clip (infinities and 7e4 to the edge, -0.0 kept).
    src = np.clip(values, -65504.0, 65504.0) if clamp else values
    with np.errstate(over="ignore"):
        want = src.astype(np.float16)
    if kind == "round_fp16":
        want = want.astype(np.float32)
    got = getattr(fp16_cast, kind)(values.reshape(-1, 2), clamp=clamp)
    assert got.dtype == want.dtype and got.shape == (values.size // 2, 2)
    assert np.array_equal(got.reshape(-1).view(np.uint16 if kind == "to_fp16" else np.uint32),
                          want.view(np.uint16 if kind == "to_fp16" else np.uint32))


def test_nan_and_small_arrays_take_numpy():
    values = _edge_values()
    values[7] = np.float32(np.nan)
    assert not fp16_cast._fast(values) and not fp16_cast._fast(values[:100].copy() * 0)
    assert np.isnan(fp16_cast.round_fp16(values)[7])


def test_clamp_on_the_numpy_path():
    values = _edge_values()[:1000].copy()
    values[7] = np.float32(np.nan)
    got = fp16_cast.round_fp16(values, clamp=True)
    assert np.isnan(got[7]) and np.abs(got[np.isfinite(got)]).max() <= 65504.0
    assert np.isfinite(got).sum() == values.size - 1  # infinities clamped to the edge, NaN kept
