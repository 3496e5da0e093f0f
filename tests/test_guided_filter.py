"""The guided-filter model: a correct guided filter, and the FP32 ranges the issue relies on."""

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.models.guided_filter import build_guided_filter, guided_filter_reference, window_counts
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX
from onnx_fp16_rewrite.analysis.range_profile import profile_absmax
from onnx_fp16_rewrite.io.ort_runner import run_model


def test_window_counts_clip_at_the_border():
    n = window_counts(10, 2)[0, 0]
    assert n[0, 0] == 9 and n[5, 5] == 25 and n[0, 5] == 15 and n[9, 9] == 9


def test_graph_matches_a_direct_guided_filter():
    model = build_guided_filter(size=40, radius=3, eps=1e-2, channels=2)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    feed = demo_inputs(model, seed=3)
    got = run_model(model, [feed])[0]["output"]
    want = guided_filter_reference(feed["guide"], feed["src"], 3, 1e-2)
    assert got.shape == (1, 2, 40, 40)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    cumsums = [n for n in model.graph.node if n.op_type == "CumSum"]
    assert len(cumsums) == 12 and cumsums[0].name == "/box_mean_I/CumSum"


@pytest.mark.parametrize("size, overflows", [(224, False), (1024, True)])
def test_integral_images_fit_fp16_at_224_and_overflow_at_1024(size, overflows):
    model = build_guided_filter(size=size)
    absmax = profile_absmax(model, [demo_inputs(model)])
    integral = max(v for k, v in absmax.items() if "CumSum_1" in k)
    # U(0,1) inputs: the largest integral is the sum of a mean-0.5 image, about size^2 / 2.
    assert integral == pytest.approx(size * size / 2, rel=0.02)
    assert (integral > FP16_MAX) == overflows
    window_sums = max(v for k, v in absmax.items() if k.endswith("Add_output_0") and "box" in k)
    assert window_sums < 17 * 17  # the box sums themselves are small: cancellation is the problem


def test_bad_radius_is_rejected():
    with pytest.raises(ValueError, match="radius"):
        build_guided_filter(size=8, radius=4)
