import numpy as np
import pytest

from onnx_fp16_rewrite.emulation.error_attribution import tensor_errors
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan


def test_errors_follow_numpy_fp16(window_model):
    x = np.random.default_rng(3).uniform(0, 1, (1, 4096)).astype(np.float32)
    errors, outputs = tensor_errors(window_model, [{"x": x}])
    by = {e.tensor: e for e in errors}
    c32 = np.cumsum(x, axis=1, dtype=np.float32)
    c16 = np.cumsum(x.astype(np.float16).astype(np.float32), axis=1, dtype=np.float32).astype(np.float16).astype(np.float32)
    expected = np.linalg.norm(c16 - c32) / np.linalg.norm(c32)
    assert by["c"].rel_error == pytest.approx(expected, rel=1e-3)
    assert by["c"].fp32_absmax == pytest.approx(float(c32.max()), rel=1e-6)
    # Window sums of ~16 from prefix sums of ~2000: FP16's spacing there (1 to 2) costs far more.
    assert by["d"].rel_error > 20 * by["c"].rel_error
    assert outputs[0]["y"].shape == (1, 4064)


def test_overflow_is_infinite_error_and_pinning_removes_it(window_model):
    x = np.full((1, 4096), 30.0, np.float32)
    errors, _ = tensor_errors(window_model, [{"x": x}])
    assert np.isinf({e.tensor: e for e in errors}["c"].rel_error)
    plan = PrecisionPlan({n: "t" for n in ("cumsum1", "slice7", "slice8", "sub9")})
    pinned, _ = tensor_errors(window_model, [{"x": x}], plan)
    assert all(np.isfinite(e.rel_error) for e in pinned)
