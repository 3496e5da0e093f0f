"""rescale-residual on torch exports (TorchScript and dynamo): scale propagation through Einsum products and ratios
(causal linear attention), into a Log (log-mel front end), through T5LayerNorm's no-op Cast into RMSNorms; each
with fix --auto --emit fp32: nothing pinned, >= 99 % of FLOPs in FP16, beside what pinning alone keeps."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import meaning_exports as me
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.passes.rescale_residual import RescaleResidual
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

pytest.importorskip("torch")

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def model_and_feeds(name, dynamo):
    if name == "t5":
        return me.build_t5(dynamo=dynamo), me.t5_feeds()
    return me.build(name, dynamo=dynamo), me.feeds(name)


def auto(model, feeds, rewrites):
    return fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=rewrites)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name, exact, pin_fraction", [
    ("linear_attention", True, 0.90),   # pinning alone: the k x v Einsum and its CumSum, 84 % of FLOPs in FP16
    ("log_mel", False, 0.01),           # pinning alone: everything from the STFT Conv to the Log, 0 %
    ("t5", True, 0.95),                 # pinning alone: the last FF's output projection and the stream, 91 %
])
def test_auto_keeps_everything_fp16_with_nothing_pinned(name, exact, pin_fraction, dynamo):
    model, feeds = model_and_feeds(name, dynamo)
    reference = run_model(model, feeds)
    before = check_fp16(model, feeds, reference)
    assert not before.passed
    result = auto(model, feeds, auto_rewrites())
    report = result.report
    assert report.auto.passes_kept == ["rescale-residual"]
    assert report.auto.fp32_nodes == 0 and report.fp16_flop_fraction >= 0.99
    assert report.fp16_after.passed
    assert report.fp16_after.outputs[0].nan == 0 and report.fp16_after.outputs[0].inf == 0
    assert report.fp16_after.outputs[0].rel_l2 < 5e-3
    # FP32 semantics: bit-exact where only powers of two moved; the Log correction is one rounding of p*k*ln2.
    got = run_model(result.model, feeds)
    for r, g in zip(reference, got):
        if exact:
            assert np.array_equal(r["y"], g["y"])
        else:
            np.testing.assert_allclose(g["y"], r["y"], rtol=1e-5, atol=1e-5)
    pin_only = auto(model, feeds, []).report
    assert pin_only.auto.fp32_nodes >= 2 and pin_only.fp16_flop_fraction < pin_fraction


def test_linear_attention_ratio_is_unscaled_and_the_elu_gets_a_mul():
    model, feeds = model_and_feeds("linear_attention", False)
    fixed, report = PassManager([RescaleResidual()], feeds).run(model)
    record = report.passes[0]
    assert record.status == "kept"
    detail = record.rewritten[0].detail
    # The overflowing numerator q.cumsum(k x v) is scaled through q: phi(q) = elu(.) + 1 gets the factor right
    # after its Elu (which cannot make a scaled value); q also reaches the denominator q.cumsum(k), so the Div
    # of the two equally scaled terms is unscaled: no norm, no output touched.
    assert "scaled 5 tensors by 2^-3" in detail and "Mul after /Elu_output_0" in detail
    assert "a ratio absorbs it" in detail
    ops = [n.op_type for n in fixed.graph.node]
    assert ops.count("Mul") == [n.op_type for n in model.graph.node].count("Mul") + 1


def test_log_mel_log_absorbs_the_power_spectrum_scale():
    """The STFT Conv output carries 2^-12, the power spectrum (re*re + im*im) and the mel MatMul 2^-24, the Clip
    bound 1e-10 is scaled with them, and the Log gets 2 * 12 * ln2 added back."""
    model, feeds = model_and_feeds("log_mel", False)
    fixed, report = PassManager([RescaleResidual()], feeds).run(model)
    detail = report.passes[0].rewritten[0].detail
    assert "2^-12 x powers [1, 2]" in detail and "(+2*12*ln2 after it)" in detail
    assert "rounding-level (Log correction)" in detail
    shift = next(n for n in fixed.graph.node if n.op_type == "Add" and "rescale_Add" in n.name)
    value = next(onnx.numpy_helper.to_array(i) for i in fixed.graph.initializer if i.name == shift.input[1])
    assert value == np.float32(24 * np.log(2.0))
    clip = next(n for n in fixed.graph.node if n.op_type == "Clip")
    low = next(onnx.numpy_helper.to_array(i) for i in fixed.graph.initializer if i.name == clip.input[1])
    assert low == np.float32(np.float32(1e-10) * 2.0**-24)


def test_t5_no_op_cast_is_identity_and_final_norm_square_is_prescaled():
    model, feeds = model_and_feeds("t5", False)
    assert any(n.op_type == "Cast" for n in model.graph.node)  # T5LayerNorm's .to(float32) survives TorchScript
    fixed, report = PassManager([RescaleResidual()], feeds).run(model)
    detail = report.passes[0].rewritten[0].detail
    assert "tensors by 2^-4 (absmax 1.94e+05 -> 1.212e+04)" in detail
    assert "rms norm /final/Pow squares values up to 1.212e+04: static pre-scale" in detail
    assert check_fp16(fixed, feeds).passed


def test_cast_to_float_on_float_is_identity():
    """Cast(to=FLOAT) between a scaled stream and a LayerNormalization passes the scale on."""
    x = gs.Variable("x", np.float32, [1, 8])
    w = gs.Constant("w", np.full((8, 8), 3e4, np.float32))
    h, c, y = gs.Variable("h", np.float32), gs.Variable("c", np.float32), gs.Variable("y", np.float32, [1, 8])
    nodes = [gs.Node("MatMul", "mm", inputs=[x, w], outputs=[h]),
             gs.Node("Cast", "cast", {"to": onnx.TensorProto.FLOAT}, [h], [c]),
             gs.Node("LayerNormalization", "ln", {"axis": -1}, [c, gs.Constant("g", np.ones(8, np.float32))], [y])]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17))
    feeds = [{"x": np.random.default_rng(0).uniform(0, 1, (1, 8)).astype(np.float32)}]
    fixed, report = PassManager([RescaleResidual()], feeds).run(model)
    assert report.passes[0].status == "kept", report.passes[0].skipped
    assert np.array_equal(run_model(model, feeds)[0]["y"], run_model(fixed, feeds)[0]["y"])
    assert check_fp16(fixed, feeds).passed and not check_fp16(model, feeds).passed


def test_a_ratio_of_differently_scaled_terms_is_refused():
    """num / den where only num overflows and den reads an unscalable tensor: the output would stay scaled."""
    x = gs.Variable("x", np.float32, [1, 8])
    w = gs.Constant("w", np.full((8, 8), 3e4, np.float32))
    num, den, y = gs.Variable("num", np.float32), gs.Variable("den", np.float32), gs.Variable("y", np.float32, [1, 8])
    nodes = [gs.Node("MatMul", "mm", inputs=[x, w], outputs=[num]),
             gs.Node("Sigmoid", "sig", inputs=[x], outputs=[den]),
             gs.Node("Div", "div", inputs=[num, den], outputs=[y])]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17))
    feeds = [{"x": np.random.default_rng(0).uniform(0, 1, (1, 8)).astype(np.float32)}]
    _, report = PassManager([RescaleResidual()], feeds).run(model)
    assert report.passes[0].status == "unchanged"
    assert "graph output" in report.passes[0].skipped[0].detail


def test_conv_relu_conv_is_balanced_by_a_power_of_two():
    """conv1's output passes 65504; the scale 2^-k on its weights goes through the Relu and the next Conv's
    weights absorb it (times 2^k), so nothing downstream changes: bit-exact in FP32."""
    rng = np.random.default_rng(0)
    x = gs.Variable("x", np.float32, [1, 4, 8, 8])
    w1 = gs.Constant("w1", (rng.standard_normal((8, 4, 3, 3)) * 2e4).astype(np.float32))
    w2 = gs.Constant("w2", (rng.standard_normal((4, 8, 3, 3)) * 1e-3).astype(np.float32))
    h, a, y = gs.Variable("h", np.float32), gs.Variable("a", np.float32), gs.Variable("y", np.float32, [1, 4, 8, 8])
    nodes = [gs.Node("Conv", "conv1", {"pads": [1, 1, 1, 1]}, [x, w1], [h]),
             gs.Node("Relu", "relu", inputs=[h], outputs=[a]),
             gs.Node("Conv", "conv2", {"pads": [1, 1, 1, 1]}, [a, w2], [y])]
    model = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=17))
    feeds = [{"x": rng.uniform(0, 1, (1, 4, 8, 8)).astype(np.float32)}]
    assert not check_fp16(model, feeds).passed
    fixed, report = PassManager([RescaleResidual()], feeds).run(model)
    assert report.passes[0].status == "kept", report.passes[0].skipped
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in fixed.graph.initializer}
    k = -int(np.log2(weights["w1"].flat[0] / w1.values.flat[0]))
    assert k >= 3 and np.array_equal(weights["w2"], w2.values * np.float32(2.0**k))
    assert np.array_equal(run_model(model, feeds)[0]["y"], run_model(fixed, feeds)[0]["y"])
    assert check_fp16(fixed, feeds).passed
