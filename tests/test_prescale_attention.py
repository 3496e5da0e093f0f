"""prescale-attention: the scale moves before q.kT (exact for head size 64), softmax and mask fills FP16-safe."""

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.models.gpt2_attention import build_gpt2_attention, demo_inputs
from onnx_fp16_rewrite.passes.prescale_attention import PrescaleAttention
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from tests.conftest import parse_named


def feeds(model, seeds=(0, 1)):
    return [demo_inputs(model, seed=s) for s in seeds]


def random_and_adversarial(model):
    """Ordinary N(0,1) states (no massive tokens), larger massive activations, an all-zero sequence."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(3)
    return [{"hidden_states": rng.standard_normal(dims).astype(np.float32)},
            demo_inputs(model, seed=5, massive=4000.0),
            {"hidden_states": np.zeros(dims, np.float32)}]


def run_pass(model, pass_, data):
    fixed, report = PassManager([pass_], data).run(model)
    return fixed, report.passes[0]


def test_gpt2_fused_softmax_is_fixed_bit_exactly():
    model = build_gpt2_attention()
    data = feeds(model)
    before = check_fp16(model, data)
    assert before.outputs[0].nan == 256  # the BOS row (2 feeds x 128): inf - inf in the softmax
    fixed, record = run_pass(model, PrescaleAttention(), data)
    assert record.status == "kept"
    details = {s.node: s.detail for s in record.rewritten}
    assert "(q by Div 8): exact (power of two)" in details["/h.0/attn/MatMul"]
    assert "-3.403e+38 -> -32768" in details["/h.0/attn/Add"]  # logits absmax ~1.4e4: F > 2.9e4, F + 1.4e4 < 65504
    assert any("not followed by a scalar Div" in s.detail for s in record.skipped)  # probs @ v
    for a, b in zip(run_model(model, data + random_and_adversarial(model)),
                    run_model(fixed, data + random_and_adversarial(model))):
        assert np.array_equal(a["output"], b["output"])
    after = check_fp16(fixed, data)
    assert after.passed and after.outputs[0].nan == 0 and after.outputs[0].rel_l2 < 1e-3
    ops = [n.op_type for n in fixed.graph.node]
    assert ops.count("Div") == 1 and ops.index("Div") < ops.index("MatMul", ops.index("Transpose"))


def test_decomposed_softmax_becomes_softmax():
    model = build_gpt2_attention(softmax="decomposed")
    data = feeds(model)
    assert check_fp16(model, data).outputs[0].nan > 0
    fixed, record = run_pass(model, PrescaleAttention(), data)
    assert record.status == "kept"  # the fusion is rounding-level: within rtol 1e-5
    assert any("-> Softmax (axis -1)" in s.detail for s in record.rewritten)
    ops = [n.op_type for n in fixed.graph.node]
    assert "Softmax" in ops and "Exp" not in ops and "ReduceSum" not in ops
    assert check_fp16(fixed, data).passed


def test_max_subtract_mode_keeps_the_decomposition():
    model = build_gpt2_attention(softmax="decomposed")
    data = feeds(model)
    fixed, record = run_pass(model, PrescaleAttention(softmax="max-subtract"), data)
    assert record.status == "kept"
    ops = [n.op_type for n in fixed.graph.node]
    assert "Exp" in ops and "ReduceMax" in ops and "Softmax" not in ops
    assert check_fp16(fixed, data).passed
    # Running again finds the softmax already max-subtracted.
    _, again = run_pass(fixed, PrescaleAttention(softmax="max-subtract"), data)
    assert any("already subtracts the row maximum" in s.detail for s in again.skipped)


def test_split_qk_is_rounding_level():
    model = build_gpt2_attention()
    data = feeds(model)
    fixed, record = run_pass(model, PrescaleAttention(split_qk=True), data)
    assert record.status == "kept"
    assert "(q and kT each by 0.353553): rounding-level" in record.rewritten[0].detail
    assert check_fp16(fixed, data).passed


WHERE_MASK = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,8,8] s, bool[1,1,8,8] keep) => (float[1,2,8,8] y) {
  fill = Constant<value=float {-3.4028234663852886e+38}>()
  m = Where(keep, s, fill)
  y = Softmax<axis=-1>(m)
}"""


def test_where_fill_is_replaced_exactly():
    model = parse_named(WHERE_MASK)
    rng = np.random.default_rng(0)
    keep = np.tril(np.ones((8, 8), bool)).reshape(1, 1, 8, 8)
    data = [{"s": rng.uniform(-300, 300, (1, 2, 8, 8)).astype(np.float32), "keep": keep}]
    fixed, record = run_pass(model, PrescaleAttention(), data)
    assert record.status == "kept"
    assert "-> -1024" in record.rewritten[0].detail  # 2 * 300 + 128 -> 1024
    adversarial = [{"s": np.full((1, 2, 8, 8), v, np.float32), "keep": keep} for v in (0.0, 300.0, -300.0)]
    for a, b in zip(run_model(model, data + adversarial), run_model(fixed, data + adversarial)):
        assert np.array_equal(a["y"], b["y"])


def test_fill_that_does_not_reach_a_softmax_is_left_alone():
    model = parse_named(WHERE_MASK.replace("Softmax<axis=-1>(m)", "Relu(m)"))
    keep = np.tril(np.ones((8, 8), bool)).reshape(1, 1, 8, 8)
    data = [{"s": np.ones((1, 2, 8, 8), np.float32), "keep": keep}]
    _, record = run_pass(model, PrescaleAttention(), data)
    assert record.status == "unchanged"
    assert "does not flow straight into a softmax" in record.skipped[0].detail


def test_scale_that_grows_the_product_is_skipped_and_bad_options_fail():
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,8,4] q, float[1,2,4,8] k) => (float[1,2,8,8] y) {
  s = MatMul(q, k)
  c = Constant<value=float {0.5}>()
  y = Div(s, c)
}""")
    rng = np.random.default_rng(0)
    data = [{"q": rng.standard_normal((1, 2, 8, 4)).astype(np.float32),
             "k": rng.standard_normal((1, 2, 4, 8)).astype(np.float32)}]
    _, record = run_pass(model, PrescaleAttention(), data)
    assert record.status == "unchanged" and "does not shrink the product" in record.skipped[0].detail
    with pytest.raises(BadInputError, match="softmax"):
        PrescaleAttention(softmax="exp")


def test_nodes_option_limits_the_sites():
    model = build_gpt2_attention()
    data = feeds(model, seeds=(0,))
    fixed, record = run_pass(model, PrescaleAttention(nodes=["/h.0/attn/Add"]), data)
    assert [s.node for s in record.rewritten] == ["/h.0/attn/Add"]
    assert sum(n.op_type == "Div" for n in fixed.graph.node) == 1
    assert isinstance(fixed, onnx.ModelProto)


def test_mul_scale_with_the_constant_first():
    """diffusers-style ``scale * (q @ kT)``: Mul(constant, scores); 1/8 moves onto q exactly."""
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,8,64] q, float[1,2,64,8] k) => (float[1,2,8,8] y) {
  s = MatMul(q, k)
  c = Constant<value=float {0.125}>()
  t = Mul(c, s)
  y = Softmax<axis=-1>(t)
}""")
    rng = np.random.default_rng(4)
    data = [{"q": rng.standard_normal((1, 2, 8, 64)).astype(np.float32) * 80,
             "k": rng.standard_normal((1, 2, 64, 8)).astype(np.float32) * 80}]
    assert check_fp16(model, data).outputs[0].nan > 0  # raw logits ~5e4 x N(0,1)
    fixed, record = run_pass(model, PrescaleAttention(), data)
    assert "(q by Mul 0.125): exact (power of two)" in record.rewritten[0].detail
    assert np.array_equal(run_model(model, data)[0]["y"], run_model(fixed, data)[0]["y"])
    assert check_fp16(fixed, data).outputs[0].nan == 0
