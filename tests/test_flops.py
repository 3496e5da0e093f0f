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


# --- The static shortcut (shapes inferred for the feed's input shapes) against the traced path ---------------------

def _every_third_pinned(model: onnx.ModelProto) -> PrecisionPlan:
    from onnx_fp16_rewrite.pipeline.pass_manager import name_nodes

    named = onnx.ModelProto()
    named.CopyFrom(model)
    name_nodes(named)
    return PrecisionPlan({n.name: "test" for i, n in enumerate(named.graph.node) if i % 3 == 0})


def _assert_same_as_traced(model, feeds, plan=None) -> tuple[float, str]:
    """The default path's per-node FLOPs and FP16 fraction equal the always-traced path's exactly;
    returns the fraction and the traces one default count ran, in order: "p" one of just the
    tensors where inference stopped, "F" a full one ("" none)."""
    import onnx_fp16_rewrite.canonical.trace as trace

    calls: list[str] = []
    real = trace.trace_shapes

    def counting(m, f, *, only=None):
        calls.append("F" if only is None else "p")
        return real(m, f, only=only)

    trace.trace_shapes = counting
    try:
        flops = node_flops(model, feeds)
        first = "".join(calls)
        fraction = fp16_flop_fraction(model, plan, feeds)
    finally:
        trace.trace_shapes = real
    assert "".join(calls) == first * 2
    assert flops == node_flops(model, feeds, trace=True)
    assert fraction == fp16_flop_fraction(model, plan, feeds, trace=True)
    return fraction, first


def _builder(name: str):
    from onnx_fp16_rewrite.models import gpt2_attention, nafnet, sd_vae_decoder, t5_encoder

    return {"nafnet-demo": (nafnet.build_nafnet, nafnet.demo_inputs),
            "t5": (t5_encoder.build_t5_encoder, t5_encoder.demo_inputs),
            "vae": (sd_vae_decoder.build_sd_vae_decoder, sd_vae_decoder.demo_inputs),
            "gpt2-attention": (gpt2_attention.build_gpt2_attention, gpt2_attention.demo_inputs)}[name]


@pytest.mark.parametrize("name", ["nafnet-demo", "t5", "vae", "gpt2-attention"])
def test_static_models_are_not_traced_and_count_the_same(name):
    build, inputs = _builder(name)
    model = build()
    fraction, traces = _assert_same_as_traced(model, [inputs(model)], _every_third_pinned(model))
    assert traces == "" and 0.0 < fraction < 1.0


def test_emitted_mixed_model_with_fp16_inputs_counts_the_same():
    from onnx_fp16_rewrite.fix import fix_model

    model = build_nafnet(height=64, width=64, kernel=(48, 48))
    feeds = [{"input": np.random.default_rng(0).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)}]
    emitted = fix_model(model, [ProtectFp32(match="sca")], feeds, emit="mixed").model
    assert emitted.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    fraction, traces = _assert_same_as_traced(emitted, feeds)
    assert traces == "" and 0.85 < fraction < 0.95  # the pinned sca regions, as in the weak-plan test above


DYNAMIC = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,16] x) => (float[N,32] y, float[N,1] r) {
  one = Constant<value=int64[1] {1}>()
  m = MatMul(x, w)
  y = Relu(m)
  r = ReduceSum<keepdims=1>(y, one)
}"""


def _dynamic() -> onnx.ModelProto:
    model = parse_named(DYNAMIC)
    # A whole weight (a one-value Constant would be a tensor ORT refuses, and the trace would fail).
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((16, 32), np.float32), "w"))
    return model


def test_dynamic_dims_take_the_feeds_shapes_without_a_trace():
    model = _dynamic()
    feeds = [{"x": np.ones((5, 16), np.float32)}]
    fraction, traces = _assert_same_as_traced(model, feeds, PrecisionPlan({"matmul1": "test"}))
    assert traces == ""
    flops = node_flops(model, feeds)
    assert flops["matmul1"] == 2 * 5 * 32 * 16 and flops["relu2"] == 5 * 32 and flops["reducesum3"] == 5 * 32
    assert fraction == pytest.approx(1 - 2 * 5 * 32 * 16 / (2 * 5 * 32 * 16 + 2 * 5 * 32))
    # ONNX's "-1" dims (Paddle exports) are free dims to ORT: also fed, not traced.
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    assert _assert_same_as_traced(model, feeds)[1] == ""


def test_stale_value_info_and_output_shapes_are_not_believed():
    # Declared [2,8] where the run makes [3,8]: inference would keep the declared shape, ORT does not.
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8] x) => (float[2,8] y) <float[2,8] h> {
  h = Relu(x)
  y = Sigmoid(h)
}""")
    feeds = [{"x": np.ones((3, 8), np.float32)}]
    fraction, traces = _assert_same_as_traced(model, feeds, PrecisionPlan({"relu0": "test"}))
    assert traces == "" and node_flops(model, feeds) == {"relu0": 24.0, "sigmoid1": 24.0} and fraction == 0.5


def test_a_data_dependent_shape_is_traced():
    # Range's length is a fed value: inference cannot know it, the trace can (k = 6 -> 6 elements).
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (int64 k, float[4] x) => (float[K] y, float[4] z) {
  zero = Constant<value=int64 {0}>()
  step = Constant<value=int64 {1}>()
  r = Range(zero, k, step)
  f = Cast<to=1>(r)
  y = Relu(f)
  z = Sigmoid(x)
}""")
    feeds = [{"k": np.array(6, np.int64), "x": np.ones(4, np.float32)}]
    fraction, traces = _assert_same_as_traced(model, feeds, PrecisionPlan({"relu4": "test"}))
    assert traces == "p"  # Range's output alone (on Range), then inference runs on
    assert node_flops(model, feeds)["relu4"] == 6.0 and fraction == pytest.approx(10 / 16)  # Cast 6, Relu 6, Sigmoid 4
    assert node_flops(model, feeds, trace=False)["relu4"] == 0.0  # unknown without the run


def test_inference_stopping_past_the_seed_rounds_is_traced_in_full():
    # Each NonZero's count is known only once its input's length is: inference learns one more per traced round
    # (Range, then each NonZero); past the rounds, the whole graph is traced. k = 4: lengths 4, 1x3, 2x3, 2x2.
    # The MatMul makes the chain a small part of the model, so the rounds are worth trying.
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (int64 k, float[64,64] x) => (float[A,B] y, float[64,64] m) {
  m = MatMul(x, x)
  zero = Constant<value=int64 {0}>()
  step = Constant<value=int64 {1}>()
  r = Range(zero, k, step)
  n1 = NonZero(r)
  n2 = NonZero(n1)
  n3 = NonZero(n2)
  f = Cast<to=1>(n3)
  y = Relu(f)
}""")
    feeds = [{"k": np.array(4, np.int64), "x": np.ones((64, 64), np.float32)}]
    fraction, traces = _assert_same_as_traced(model, feeds, PrecisionPlan({"matmul0": "test"}))
    assert traces == "pppF" and fraction == pytest.approx(8 / (2 * 64**3 + 8))  # Cast and Relu: 4 each
    flops = node_flops(model, feeds)
    assert [flops[n] for n in ("range3", "nonzero4", "nonzero5", "nonzero6", "relu8")] == [4, 3, 6, 4, 4]


def test_a_feed_ort_refuses_keeps_todays_fallback():
    # An input the model lacks: ORT refuses the feed, so both paths keep shape inference's (symbolic) counts.
    model = _dynamic()
    feeds = [{"x": np.ones((5, 16), np.float32), "extra": np.ones(2, np.float32)}]
    assert _assert_same_as_traced(model, feeds)[1] == "F"  # tried, refused
    assert node_flops(model, feeds)["relu2"] == 0.0


@pytest.mark.parametrize("name,size", [("t5", {"d_model": 128}), ("vae", {}), ("gpt2-attention", {})])
def test_shapes_without_feeds_are_inference_on_the_whole_model(name, size):
    # Float weights from 64 KiB up reach shape inference as dims only: the same shapes as with their values.
    from onnx_fp16_rewrite.analysis.flops import _inference_skeleton, tensor_shapes

    model = _builder(name)[0](**size)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in _inference_skeleton(model).graph.initializer)
    whole = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    expected = {vi.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
                for vi in (*whole.input, *whole.output, *whole.value_info)}
    shapes, _ = tensor_shapes(model)
    assert {k: shapes[k] for k in expected} == expected


def test_large_integer_tensors_keep_their_values_for_inference():
    from onnx_fp16_rewrite.analysis.flops import _inference_skeleton

    model = _dynamic()
    table = np.arange(20000, dtype=np.int64)  # 160 KB: an index table, not a weight
    model.graph.initializer.append(onnx.numpy_helper.from_array(table, "table"))
    kept = {t.name: t for t in _inference_skeleton(model).graph.initializer}
    assert kept["w"].data_location != onnx.TensorProto.EXTERNAL  # 2 KB of floats: small, kept
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(kept["table"]), table)


# Exports as the libraries write them: some static (inferred), some with shape arithmetic inference cannot follow
# or dynamic dims (traced); the emitted (canonical, FP16-input) models of two of them.
CORPUS = [("t5-encoder", "torchscript"), ("t5-encoder", "dynamo"), ("vae-decoder", "torchscript"),
          ("guided-filter", "torchscript"), ("bert", "torchscript"), ("vit", "torchscript"),
          ("gpt2-eager-dynamic", "dynamo"), ("paddle-bn-detector", "dynamo")]


@pytest.fixture(scope="module")
def cache_root(request) -> str:
    import os

    return os.environ.get("ONNX_FP16_REWRITE_CACHE") or str(request.config.cache.mkdir("onnx-fp16-rewrite"))


@pytest.mark.corpus
@pytest.mark.parametrize("name,exporter", [pytest.param(n, e, id=f"{n}-{e}") for n, e in CORPUS])
def test_corpus_exports_count_the_same(name, exporter, cache_root):
    pytest.importorskip("torch")
    from onnx_fp16_rewrite.models import exported

    model = exported.build(name, exporter, cache_root=cache_root)
    fraction, _ = _assert_same_as_traced(model, exported.feeds(name, model), _every_third_pinned(model))
    assert 0.0 < fraction < 1.0


@pytest.mark.corpus
@pytest.mark.parametrize("name,exporter,traces", [("t5-encoder", "torchscript", ""), ("gpt2-eager-dynamic", "dynamo", "p")])
def test_corpus_emitted_mixed_models_count_the_same(name, exporter, traces, cache_root):
    pytest.importorskip("torch")
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.models import exported

    model = exported.build(name, exporter, cache_root=cache_root)
    feeds = exported.feeds(name, model)
    emitted = fix_model(model, [], feeds, emit="mixed").model
    # Static after canonicalisation: inferred; the dynamic dims restored on the emitted model: their Ranges traced.
    assert _assert_same_as_traced(emitted, feeds)[1] == traces
