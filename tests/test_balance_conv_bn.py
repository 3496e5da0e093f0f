"""balance-conv-bn: a BatchNormalization's mean moved into the Conv bias, its gain split by per-channel 2^e."""

import numpy as np
import onnx
import pytest

import meaning_exports as me
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.passes.balance_conv_bn import BalanceConvBn
from onnx_fp16_rewrite.pipeline.float64_reference import run_float64
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

pytest.importorskip("torch")

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def weights(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_nearly_constant_channels_run_fp16_with_nothing_pinned(dynamo):
    model, feeds = me.build("conv_bn", dynamo=dynamo), me.feeds("conv_bn")
    assert [n.op_type for n in model.graph.node] == ["Conv", "BatchNormalization", "Relu", "Conv"]
    reference = run_model(model, feeds)
    before = check_fp16(model, feeds, reference)
    assert not before.passed and before.outputs[0].rel_l2 > 0.05  # the FP16-stored Conv output loses y - mean
    result = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=auto_rewrites())
    report = result.report
    assert report.auto.passes_kept == ["balance-conv-bn"]
    assert report.auto.fp32_nodes == 0 and report.fp16_flop_fraction >= 0.99
    assert report.fp16_after.passed and report.fp16_after.outputs[0].nan == 0
    assert report.fp16_after.outputs[0].rel_l2 < 2e-3
    # FP32: the original rounds W*x + b (near 4) before subtracting the mean, and the BN amplifies that rounding
    # 160x: it is 5e-5 off float64 itself. The rewrite differs from it by as much, and is closer to float64.
    for feed, r, g in zip(feeds, reference, run_model(result.model, feeds)):
        exact = run_float64(model, feed)["y"]
        assert np.abs(g["y"] - exact).max() <= np.abs(r["y"] - exact).max()
        assert np.abs(g["y"] - r["y"]).max() < 1e-4
    pin_only = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=[]).report
    # Pinning alone needs the smallest region that holds: the Conv and its BN, 57 % of FLOPs left in FP16.
    assert pin_only.auto.fp32_nodes == 2 and pin_only.fp16_flop_fraction < 0.6


def test_parameters_after_the_rewrite():
    model, feeds = me.build("conv_bn"), me.feeds("conv_bn")
    fixed, report = PassManager([BalanceConvBn()], feeds).run(model)
    record = report.passes[0]
    assert record.status == "kept"
    assert "worst channel 2: |mean| 4 vs spread" in record.rewritten[0].detail
    bn_old = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn_new = next(n for n in fixed.graph.node if n.op_type == "BatchNormalization")
    conv_old = next(n for n in model.graph.node if n.op_type == "Conv")
    conv_new = next(n for n in fixed.graph.node if n.op_type == "Conv")
    old, new = weights(model), weights(fixed)
    assert not np.any(new[bn_new.input[3]])                               # mean moved out
    e = np.log2(new[conv_new.input[2]] / (old[conv_old.input[2]] - old[bn_old.input[3]]))
    assert np.allclose(e, np.round(e), atol=1e-4)                         # per-channel powers of two ...
    e = np.round(e)
    assert e.max() >= 7                                                    # ... large where the BN amplified
    np.testing.assert_array_equal(new[conv_new.input[1]], old[conv_old.input[1]] * (2.0**e)[:, None, None, None])
    np.testing.assert_array_equal(new[bn_new.input[1]], (old[bn_old.input[1]] / 2.0**e).astype(np.float32))
    np.testing.assert_array_equal(new[bn_new.input[4]], old[bn_old.input[4]])


def test_bn_without_cancellation_is_left_alone():
    """A control: the same network with ordinary channels (the exporters' default statistics) is not touched."""
    model, feeds = me.build("conv_bn"), me.feeds("conv_bn")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    for init in model.graph.initializer:
        if init.name == bn.input[3]:
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(8, np.float32), init.name))
    fixed, report = PassManager([BalanceConvBn()], feeds).run(model)
    assert report.passes[0].status == "unchanged"
    assert "no channel cancels" in report.passes[0].skipped[0].detail


def test_bad_options():
    with pytest.raises(BadInputError):
        BalanceConvBn(target_absmax=0)
    with pytest.raises(BadInputError):
        BalanceConvBn(min_cancel=0.5)
