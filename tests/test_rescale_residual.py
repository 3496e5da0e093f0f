"""rescale-residual: bit-exact 2^-k rescaling of overflowing streams into normalizations, refusals with reasons."""

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.models.residual_norm import build_residual_groupnorm
from onnx_fp16_rewrite.models.small import GraphBuilder
from onnx_fp16_rewrite.passes.rescale_residual import RescaleResidual
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager


def run_pass(model, pass_, data):
    fixed, report = PassManager([pass_], data).run(model)
    return fixed, report.passes[0]


def assert_bit_exact(a, b, data):
    for ra, rb in zip(run_model(a, data), run_model(b, data)):
        for name in ra:
            assert np.array_equal(ra[name], rb[name]), name


def adversarial(shape, name="input"):
    rng = np.random.default_rng(11)
    return [{name: np.zeros(shape, np.float32)},
            {name: np.full(shape, 0.7, np.float32)},
            {name: (10.0 ** rng.uniform(-3, 3, shape)).astype(np.float32)},
            {name: rng.standard_normal(shape).astype(np.float32) * 50}]


def weights(model):
    return {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}


def test_residual_groupnorm_is_rescaled_bit_exactly():
    model = build_residual_groupnorm(height=32, width=32)
    data = [demo_inputs(model, seed=s) for s in (0, 1)]
    before = check_fp16(model, data)
    assert before.outputs[0].nan == 2 * 32 * 32 * 32  # every output pixel: the Add overflowed into the norm
    fixed, record = run_pass(model, RescaleResidual(), data)
    assert record.status == "kept"
    detail = record.rewritten[0].detail
    assert "scaled 4 tensors by 2^-3 (absmax 1.073e+05 -> 1.341e+04)" in detail and "exact in FP32" in detail
    assert "/conv_in/Conv" in detail and "/block/conv1/Conv" in detail and "InstanceNormalization" in detail
    old, new = weights(model), weights(fixed)
    assert np.array_equal(new["conv_in.weight"], old["conv_in.weight"] / 8)  # source: weight and bias
    assert np.array_equal(new["conv_in.bias"], old["conv_in.bias"] / 8)
    assert np.array_equal(new["block.conv1.weight"], old["block.conv1.weight"])  # pass-through: bias only
    assert np.array_equal(new["block.conv1.bias"], old["block.conv1.bias"] / 8)
    inorm = next(n for n in fixed.graph.node if n.op_type == "InstanceNormalization")
    assert inorm.attribute[0].f == np.float32(np.float32(1e-5) * np.float32(2.0**-6))
    assert_bit_exact(model, fixed, data + adversarial([1, 32, 32, 32]))
    after = check_fp16(fixed, data)
    assert after.passed and after.outputs[0].nan == 0 and after.outputs[0].rel_l2 < 2e-3


def stream_model(*, silu_before_norm=False, output_stream=False, shared_weight=False, input_partner=False):
    """input -> conv_a (massive bias 5e4) -> [+ conv_b(conv_a) | + input] -> [SiLU] -> LayerNorm(C,H,W) -> y."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(17)
    w = (rng.uniform(-1, 1, (8, 8, 3, 3)) / 24).astype(np.float32)
    bias = np.zeros(8, np.float32)
    bias[2] = 7e4 if input_partner else 5e4
    h = b.conv("/a", "input", w, bias, prefix="a", pad=1)
    if input_partner:
        s = b.op("/res", "Add", ["input", h])
    else:
        w2 = w.copy()
        w2[2] = 0
        w2[2, 2, 1, 1] = 0.6
        s = b.op("/res", "Add", [h, b.conv("/b", h, w2, bias * 0.6, prefix="b", pad=1)])
    if silu_before_norm:
        s = b.op("/act", "Mul", [s, b.op("/act", "Sigmoid", [s])])
    outputs = [("y", [1, 8, 16, 16])]
    b.op("/norm", "LayerNormalization", [s, b.const("/norm", np.ones((8, 16, 16), np.float32), name="norm.weight")],
         out_names=["y"], axis=1, epsilon=1e-5)
    if shared_weight:  # a second conv reading the same weight on the input, outside the stream
        b.nodes.append(onnx.helper.make_node("Conv", ["input", "a.weight"], ["z"], name="/side/Conv", pads=[1] * 4))
        outputs.append(("z", [1, 8, 16, 16]))
    if output_stream:
        b.nodes.append(onnx.helper.make_node("Identity", [s], ["stream"], name="/out/Identity"))
        outputs.append(("stream", [1, 8, 16, 16]))
    return b.model(graph_name="stream", inputs=[("input", [1, 8, 16, 16])], outputs=outputs)


DATA = [{"input": np.random.default_rng(1).uniform(0, 1, (1, 8, 16, 16)).astype(np.float32)}]


def test_silu_before_the_norm_is_refused_with_a_reason():
    model = stream_model(silu_before_norm=True)
    fixed, record = run_pass(model, RescaleResidual(), DATA)
    assert record.status == "unchanged" and not record.rewritten
    reason = record.skipped[0].detail
    assert "Sigmoid /act/Sigmoid reads" in reason and "not scale invariant (SiLU/Sigmoid before the norm)" in reason
    # The SiLU's own output is also past 65504: its region meets the same Sigmoid.
    assert all("Sigmoid /act/Sigmoid reads" in s.detail or "refused region" in s.detail for s in record.skipped)


def test_stream_that_is_a_graph_output_is_refused():
    _, record = run_pass(stream_model(output_stream=True), RescaleResidual(), DATA)
    assert record.status == "unchanged"
    assert any("is a graph output" in s.detail for s in record.skipped)


def test_layer_norm_sink_and_shared_weight_copy():
    model = stream_model(shared_weight=True)
    fixed, record = run_pass(model, RescaleResidual(), DATA)
    assert record.status == "kept"
    names = weights(fixed)
    assert "a.weight" in names and "a.weight_x2^-3" in names  # the side conv keeps the original weight
    ln = next(n for n in fixed.graph.node if n.op_type == "LayerNormalization")
    assert {a.name: a.f for a in ln.attribute}["epsilon"] == np.float32(np.float32(1e-5) * np.float32(2.0**-6))
    assert_bit_exact(model, fixed, DATA + adversarial([1, 8, 16, 16]))
    assert check_fp16(fixed, DATA).passed


def test_graph_input_partner_gets_a_mul():
    model = stream_model(input_partner=True)
    fixed, record = run_pass(model, RescaleResidual(), DATA)
    assert record.status == "kept" and "input input" in record.rewritten[0].detail
    mul = next(n for n in fixed.graph.node if n.name == "/rescale/input/Mul")
    scale = next(i for i in fixed.graph.initializer if i.name == mul.input[1])
    assert onnx.numpy_helper.to_array(scale) == np.float32(2.0**-3)
    assert_bit_exact(model, fixed, DATA + adversarial([1, 8, 16, 16]))


def test_norm_output_partner_scales_its_affine_terms():
    """Post-norm style: the massive conv output is added to a LayerNorm output, which gets scaled through its
    gamma and beta; the sum feeds an InstanceNormalization."""
    rng = np.random.default_rng(2)
    b = GraphBuilder(17)
    w = (rng.uniform(-1, 1, (8, 8, 1, 1)) / 3).astype(np.float32)
    w[5] = 2e4  # channel 5 ~ 2e4 * sum of 8 inputs: up to ~1.4e5
    a = b.conv("/a", "input", w, np.zeros(8, np.float32), prefix="a")
    n = b.op("/ln", "LayerNormalization", ["input", b.const("/ln", np.full((8, 16, 16), 2.0, np.float32),
                                                             name="ln.weight"),
                                           b.const("/ln", np.full((8, 16, 16), 0.5, np.float32), name="ln.bias")],
             axis=1, epsilon=1e-5)
    s = b.op("/res", "Add", [a, n])
    b.op("/norm", "InstanceNormalization", [s, b.const("/norm", np.ones(8, np.float32)),
                                            b.const("/norm", np.zeros(8, np.float32))], out_names=["y"])
    model = b.model(graph_name="post_norm", inputs=[("input", [1, 8, 16, 16])], outputs=[("y", [1, 8, 16, 16])])
    fixed, record = run_pass(model, RescaleResidual(), DATA)
    assert record.status == "kept"
    new = weights(fixed)
    assert np.all(new["ln.weight"] == np.float32(2.0 * 2.0**-3)) and np.all(new["ln.bias"] == np.float32(2.0**-4))
    assert_bit_exact(model, fixed, DATA + adversarial([1, 8, 16, 16]))
    assert check_fp16(model, DATA).outputs[0].nan > 0 and check_fp16(fixed, DATA).passed


def test_nothing_to_do_and_bad_options():
    model = stream_model()
    _, record = run_pass(model, RescaleResidual(nodes=["/b/Conv"]), DATA)
    assert record.status == "unchanged" and "no tensor above" in record.skipped[0].detail
    with pytest.raises(BadInputError, match="target_absmax"):
        RescaleResidual(target_absmax=1e5)


def tiny_row_model():
    """T5's first RMSNorm in small: ``a = x @ w1`` (absmax ~40) is read by an RMSNorm and joins ``b = a + z @ w2``
    (~1e6, T5's FFN overflow), which a second RMSNorm reads. Row 3 of x is tiny (T5's tiny-embedding token)."""
    rng = np.random.default_rng(5)
    b = GraphBuilder(17)

    def rms(scope, x, out):
        var = b.reduce_mean(scope, b.op(scope, "Pow", [x, b.const(scope, np.float32(2.0))]), [-1])
        std = b.op(scope, "Sqrt", [b.op(scope, "Add", [var, b.const(scope, np.float32(1e-6))])])
        return b.op(scope, "Mul", [x, b.op(scope, "Div", [b.const(scope, np.float32(1.0)), std])], out_names=[out])

    a = b.op("/a", "MatMul", ["x", b.const("/a", rng.standard_normal((64, 64)).astype(np.float32) * 1.5,
                                           name="a.weight")])
    rms("/norm1", a, "y1")
    big = b.op("/big", "MatMul", ["z", b.const("/big", rng.standard_normal((64, 64)).astype(np.float32) * 5e4,
                                               name="big.weight")])
    rms("/norm2", b.op("/res", "Add", [a, big]), "y2")
    model = b.model(graph_name="tiny_row", inputs=[("x", [1, 16, 64]), ("z", [1, 16, 64])],
                    outputs=[("y1", [1, 16, 64]), ("y2", [1, 16, 64])])
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    x[0, 3] *= 4e-4  # a's row 3: rms ~5e-3, mean square 2.5e-5 >> eps; x 2^-6 its squares flush to 0 in FP16
    return model, [{"x": x, "z": rng.uniform(0, 1, (1, 16, 64)).astype(np.float32)}]


def test_norm_whose_scaled_eps_flushes_gets_its_small_end_restored(monkeypatch):
    """k=6 makes eps 1e-6 * 2^-12 (0 in FP16) and flushes row 3's squares: 1/sqrt(0) = inf in the norm's output
    (in T5 attention spreads it as NaN to every token). Its squared tensor is multiplied back by 2^6 (absmax
    0.6 -> 40 <= sqrt(16384)), eps by 2^12: bit-exact in FP32 and finite in FP16."""
    from onnx_fp16_rewrite.passes import rescale_residual

    model, data = tiny_row_model()
    fixed, record = run_pass(model, RescaleResidual(), data)
    assert record.status == "kept"
    detail = record.rewritten[0].detail
    assert "scaled 3 tensors by 2^-6" in detail
    assert "rms norm /norm1/Pow: eps x 2^-12 would flush to 0 in FP16, so its squared tensor x 2^6" in detail
    assert "rms norm /norm2/Pow squares values up to" in detail  # the large end: static pre-scale, as before
    mul = next(n for n in fixed.graph.node if n.name == "/norm1/restore/Mul")
    assert weights(fixed)[mul.input[1]] == np.float32(64.0)
    readers = {n.name for n in fixed.graph.node if mul.output[0] in n.input}
    assert readers == {"/norm1/Pow", "/norm1/Mul"}
    add = next(n for n in fixed.graph.node if n.name == "/norm1/Add")
    assert weights(fixed)[add.input[1]] == np.float32(1e-6)  # 1e-6 * 2^-12 * 2^12
    assert_bit_exact(model, fixed, data)
    after = check_fp16(fixed, data)
    assert after.passed, after.outputs
    y1 = next(o for o in after.outputs if o.name == "y1")
    assert y1.nan == 0 and y1.inf == 0 and y1.rel_l2 < 2e-3

    monkeypatch.setattr(rescale_residual, "_restore_small_end", lambda *args: "")
    unrestored, _ = run_pass(model, RescaleResidual(), data)
    y1 = next(o for o in check_fp16(unrestored, data).outputs if o.name == "y1")
    assert y1.nan + y1.inf > 0  # row 3 divided by an FP16 zero
