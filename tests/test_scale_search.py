"""rescale-residual's range check of the constants it scales (patterns.scale_search.choose_k)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_fp16_rewrite.patterns import scale_search
from onnx_fp16_rewrite.patterns.scale_search import _fp16_errors


def _whole_array(values: np.ndarray, scale: float) -> tuple[float, float, float]:
    """The definition: float64 magnitudes, one norm over the whole array (as choose_k took it before)."""
    def error(v):
        norm = float(np.linalg.norm(v))
        if norm == 0 or not np.isfinite(norm):
            return 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.linalg.norm(v.astype(np.float16).astype(np.float64) - v)) / norm

    v = np.abs(values.astype(np.float64)).reshape(-1)
    with np.errstate(invalid="ignore"):
        largest = float(v.max()) if v.size else 0.0
    return largest, error(v), error(v * scale)


rng = np.random.default_rng(0)
CASES = {
    # Weights of a linear layer, several chunks long, many below FP16's normal range.
    "weights": rng.normal(0, 0.02, (3, scale_search._CHUNK + 17)).astype(np.float32),
    "into-subnormals": rng.uniform(1e-5, 1e-4, 1000).astype(np.float32),
    "past-fp16-range": np.array([1.0, 7e4, -3.0, 65520.0], np.float32),
    "with-inf": np.array([1.0, np.inf, 2.0], np.float32),
    "with-nan": np.array([1.0, np.nan, 2.0], np.float32),
    "zeros": np.zeros(5, np.float32),
    "empty": np.zeros((0, 4), np.float32),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scale", [2.0**-3, 2.0**-12, 2.0**4])
def test_chunked_errors_are_the_whole_array_ones(name, scale):
    got, want = _fp16_errors(CASES[name], scale), _whole_array(CASES[name], scale)
    assert (math.isnan(got[0]) and math.isnan(want[0])) or got[0] == want[0]
    for g, w in zip(got[1:], want[1:]):
        # The sums of squares are taken chunk by chunk: the last bits may differ, nothing more.
        assert g == w or (math.isfinite(w) and abs(g - w) <= 1e-12 * w), (g, w)


def test_sinking_constants_are_told_from_scaled_ones():
    """What choose_k decides from them: ~1e-5 weights scaled by 2^-8 sink into FP16 subnormals (refused);
    the normal weights scaled by 2^-3 keep their FP16 rounding error (kept)."""
    _, before, after = _fp16_errors(CASES["into-subnormals"], 2.0**-8)
    assert after > max(2 * before, 1e-3) and before < 1e-3
    _, before, after = _fp16_errors(CASES["weights"], 2.0**-3)
    assert after <= max(2 * before, 1e-3) and before > 0
