"""clamp-fp16: approximate by design -- rolled back at the default FP32 tolerance, finite in FP16 when accepted."""

import numpy as np
import pytest

from onnx_fp16_rewrite.models.small import GraphBuilder
from onnx_fp16_rewrite.passes.clamp_fp16 import ClampFp16
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.pipeline.validate import Tolerance


def t5_ffn_like():
    """x -> wo (one output dimension reaches ~6.6e4, transformers#5651) -> + x -> LayerNormalization -> y."""
    rng = np.random.default_rng(0)
    b = GraphBuilder(17)
    w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    w[:, 3] = 1040.0  # x ~ U(0.9, 1.1): 64 * 1040 ~ 6.66e4
    h = b.op("/wo", "MatMul", ["x", b.const("/wo", w, name="wo.weight")])
    s = b.op("/res", "Add", ["x", h])
    b.op("/norm", "LayerNormalization", [s, b.const("/norm", np.ones(64, np.float32), name="norm.weight")],
         out_names=["y"], axis=-1, epsilon=1e-6)
    return b.model(graph_name="ffn", inputs=[("x", [1, 8, 64])], outputs=[("y", [1, 8, 64])])


DATA = [{"x": np.random.default_rng(1).uniform(0.9, 1.1, (1, 8, 64)).astype(np.float32)}]


def test_clamp_is_approximate_and_rolled_back_at_the_default_tolerance():
    model = t5_ffn_like()
    assert check_fp16(model, DATA).outputs[0].nan == 8 * 64
    _, report = PassManager([ClampFp16()], DATA).run(model)
    record = report.passes[0]
    assert record.status == "rolled-back" and "failed FP32 validation" in record.error
    assert len(record.rewritten) == 2 and all(s.detail.startswith("approximate: clamped") for s in record.rewritten)
    assert ClampFp16.approximate


def test_accepted_clamp_gives_finite_fp16():
    model = t5_ffn_like()
    reference = run_model(model, DATA)
    fixed, report = PassManager([ClampFp16()], DATA, tolerance=Tolerance(rtol=0.1, atol=0.1)).run(model)
    assert report.passes[0].status == "kept"
    out = run_model(fixed, DATA)[0]["y"]
    assert 0 < np.abs(out - reference[0]["y"]).max() < 0.1  # FP32 moved: where |x| > 64504 it was clipped
    after = check_fp16(fixed, DATA, reference)  # judged against the *original* FP32 outputs
    assert after.outputs[0].nan == 0 and after.outputs[0].inf == 0
    assert after.outputs[0].rel_l2 < 1e-2


def test_nodes_margin_and_nothing_to_do():
    model = t5_ffn_like()
    fixed, report = PassManager([ClampFp16(nodes=["/wo/MatMul"], margin=0.0)], DATA,
                                tolerance=Tolerance(rtol=0.1, atol=0.1)).run(model)
    record = report.passes[0]
    assert [s.node for s in record.rewritten] == ["/wo/MatMul"] and "+-65504" in record.rewritten[0].detail
    _, again = PassManager([ClampFp16(margin=60000.0, nodes=["/norm/LayerNormalization"])], DATA).run(model)
    assert again.passes[0].status == "unchanged" and "no tensor above" in again.passes[0].skipped[0].detail
    with pytest.raises(BadInputError, match="margin"):
        ClampFp16(margin=-1.0)
