"""FLOP estimates: exact counts on small graphs, unknown shapes, and the FP16 share of a plan."""

import logging

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.models import build_nafnet
from onnx_fp16_rewrite.passes import ProtectFp32
from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction, node_flops, op_flops
from onnx_fp16_rewrite.emit.mixed_precision import to_mixed_precision
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from tests.conftest import parse_named

COUNTS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[2,3,5] a, float[5,7] b) => (float[1,6,8,8] c, float[2,3,7] m, float[1,4,6,6] p,
                                                     float[1,4,1,1] r, float[1,256] f, float[1,4,8,8] s,
                                                     float[2,3,7] e, float[3,7] gm) {
  w = Constant<value=float[6,2,3,3] {0}>()
  bias = Constant<value=float[6] {0}>()
  c = Conv<group=2, pads=[1,1,1,1]>(x, w, bias)
  m = MatMul(a, b)
  p = AveragePool<kernel_shape=[3,3]>(x)
  r = ReduceSum<keepdims=1>(x)
  f = Flatten(x)
  s = Sigmoid(x)
  e = Einsum<equation="bij,jk->bik">(a, b)
  a2 = Constant<value=float[3,5] {0}>()
  gm = Gemm(a2, b)
}"""


def test_counting_rules_on_small_ops():
    flops = node_flops(parse_named(COUNTS))
    # Conv: 2 * out (1*6*8*8) * (C_in/group = 2) * 3*3, plus one add per output for the bias.
    assert flops["conv2"] == 2 * 384 * 2 * 9 + 384
    assert flops["matmul3"] == 2 * (2 * 3 * 7) * 5
    assert flops["averagepool4"] == (4 * 6 * 6) * 9  # pooling: output elements times the kernel
    assert flops["reducesum5"] == 256  # reductions: input elements
    assert flops["flatten6"] == 0  # a view
    assert flops["sigmoid7"] == 256  # elementwise: output elements
    assert flops["einsum8"] == 2 * 2 * 3 * 5 * 7
    assert flops["gemm10"] == 2 * 3 * 7 * 5
    assert flops["constant0"] == 0  # Constant


def test_unknown_shapes_count_zero_and_are_logged_once(caplog):
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8] x, int64[2] shape) => (float[A,B] y, float[N,8] z) {
  y = Reshape(x, shape)
  z = Relu(x)
}""")
    with caplog.at_level(logging.INFO, logger="onnx_fp16_rewrite.analysis.flops"):
        flops = node_flops(model)
    assert flops == {"reshape0": 0.0, "relu1": 0.0}  # a view, and a symbolic dim
    assert "unknown shapes" in caplog.text and "relu1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnx_fp16_rewrite.analysis.flops"):
        fp16_flop_fraction(model, PrecisionPlan())
    assert [r.getMessage().count("unknown shapes") for r in caplog.records] == [1]  # one warning, not two
    # On the shapes of a run the symbolic dim is known: N=3 -> Relu counts 24 elements, no warning.
    feed = {"x": np.ones((3, 8), np.float32), "shape": np.array([4, 6], np.int64)}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnx_fp16_rewrite.analysis.flops"):
        assert node_flops(model, [feed]) == {"reshape0": 0.0, "relu1": 24.0}
        assert fp16_flop_fraction(model, PrecisionPlan(), [feed]) == 1.0
    assert "unknown shapes" not in caplog.text


def test_unnamed_nodes_get_the_pass_managers_names():
    model = parse_named(COUNTS)
    model.graph.node[3].name = ""
    assert "MatMul_3" in node_flops(model)


def test_op_flops_without_a_needed_shape_is_none():
    assert op_flops("MatMul", {}, [None, (5, 7)], [(2, 7)]) is None
    assert op_flops("Reshape", {}, [None], [None]) == 0.0


def test_fp16_fraction_weak_plan_and_mixed_model_agree():
    model = build_nafnet(height=64, width=64, kernel=(48, 48))
    assert fp16_flop_fraction(model, PrecisionPlan()) == 1.0
    feeds = [{"input": np.random.default_rng(0).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)}]
    pinned, _ = PassManager([ProtectFp32(match="sca")], feeds).run(model)
    plan = PrecisionPlan.from_model(pinned)
    weak = fp16_flop_fraction(pinned, plan)
    assert fp16_flop_fraction(pinned, None) == weak  # the plan stored in the model
    flops = node_flops(pinned)
    expected = 1 - sum(flops[n] for n in plan.fp32_nodes) / sum(flops.values())
    assert weak == pytest.approx(expected)
    assert 0.85 < weak < 0.95  # the sca regions (with their 1x1 convs) are ~11% of NAFNet's arithmetic
    mixed, _ = to_mixed_precision(pinned, plan)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in mixed.graph.initializer)
    # Same split, read from tensor types; the boundary Casts add a little arithmetic on each side.
    assert fp16_flop_fraction(mixed, PrecisionPlan()) == pytest.approx(weak, abs=0.01)


def test_nafnet_is_convolution_dominated():
    flops = node_flops(build_nafnet())
    per_pixel = sum(flops.values()) / (512 * 512)
    conv = sum(v for k, v in flops.items() if k.endswith("Conv")) / (512 * 512)
    assert 10_000 < per_pixel < 12_000 and conv / per_pixel > 0.8
