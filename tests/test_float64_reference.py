"""The float64 reference: conversion of every FLOAT, engine choice, and why FP32 is not a reference."""

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.pipeline.float64_reference import run_float64, to_float64, toposorted
from onnx_fp16_rewrite.io.ort_runner import run_model

N, K = 1024, 32
M = N - K

# The NAFNet-local pattern: integral image, then a KxK box sum from four corners, then the mean.
INTEGRAL = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,1,{N},{N}] x) => (float[1,1,{N},{N}] s, float[1,1,{M},{M}] y) {{
  a3 = Constant<value=int64 {{3}}>()
  a2 = Constant<value=int64 {{2}}>()
  r = CumSum(x, a3)
  s = CumSum(r, a2)
  ax = Constant<value=int64[2] {{2, 3}}>()
  b00 = Constant<value=int64[2] {{0, 0}}>()
  eMM = Constant<value=int64[2] {{{M}, {M}}}>()
  bKK = Constant<value=int64[2] {{{K}, {K}}}>()
  eNN = Constant<value=int64[2] {{{N}, {N}}}>()
  b0K = Constant<value=int64[2] {{0, {K}}}>()
  eMN = Constant<value=int64[2] {{{M}, {N}}}>()
  bK0 = Constant<value=int64[2] {{{K}, 0}}>()
  eNM = Constant<value=int64[2] {{{N}, {M}}}>()
  s1 = Slice(s, b00, eMM, ax)
  s4 = Slice(s, bKK, eNN, ax)
  s2 = Slice(s, b0K, eMN, ax)
  s3 = Slice(s, bK0, eNM, ax)
  p = Add(s4, s1)
  q = Add(s2, s3)
  d = Sub(p, q)
  area = Constant<value_float={float(K * K)}>()
  y = Div(d, area)
}}"""


def _engine(caplog) -> str:
    engines = [r.float64_engine for r in caplog.records if hasattr(r, "float64_engine")]
    assert len(engines) == 1
    return engines[0]


def test_integral_image_float64_matches_numpy_while_fp32_is_noisy(caplog):
    model = onnx.parser.parse_model(INTEGRAL)
    x = np.random.default_rng(0).random((1, 1, N, N), dtype=np.float32)
    s64 = np.cumsum(np.cumsum(x.astype(np.float64), axis=3), axis=2)
    y64 = (s64[..., K:, K:] + s64[..., :M, :M] - s64[..., :M, K:] - s64[..., K:, :M]) / (K * K)

    with caplog.at_level(logging.INFO, logger="onnx_fp16_rewrite.pipeline.float64_reference"):
        out = run_float64(model, {"x": x})
    assert _engine(caplog) == "onnxruntime"  # CumSum, Slice, Add, Sub, Div all have double kernels
    assert out["s"].dtype == np.float64 and out["y"].dtype == np.float64
    np.testing.assert_allclose(out["s"], s64, rtol=1e-12, atol=0)
    np.testing.assert_allclose(out["y"], y64, rtol=1e-12, atol=0)

    fp32 = run_model(model, [{"x": x}])[0]
    s_rel = np.abs(fp32["s"].astype(np.float64) - s64) / s64
    y_rel = np.abs(fp32["y"].astype(np.float64) - y64) / np.abs(y64)
    # FP32's own noise (measured: 1.7e-6 on the integral image, 7e-4 on the 32x32 box mean).
    assert s_rel.max() > 1e-6
    assert y_rel.max() > 1e-4


CONV = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,9,9] x) => (float[1,3,9,9] y) {
  c = Conv<pads=[1,1,1,1]>(x, w, b)
  y = Mul(c, c)
}"""


def _conv_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model = onnx.parser.parse_model(CONV)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return model, w, b


def _conv3x3_f64(x, w, b):
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((1, w.shape[0], x.shape[2], x.shape[3]))
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, i:i + x.shape[2], j:j + x.shape[3]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return out + b.astype(np.float64)[None, :, None, None]


def test_conv_falls_back_to_the_reference_evaluator(caplog):
    model, w, b = _conv_model()
    x = np.random.default_rng(2).standard_normal((1, 2, 9, 9)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="onnx_fp16_rewrite.pipeline.float64_reference"):
        out = run_float64(model, {"x": x})
    assert _engine(caplog) == "reference"  # ORT CPU has no double Conv kernel (NOT_IMPLEMENTED)
    assert "NOT_IMPLEMENTED" in caplog.text
    expected = _conv3x3_f64(x, w, b) ** 2
    assert out["y"].dtype == np.float64
    np.testing.assert_allclose(out["y"], expected, rtol=1e-12, atol=1e-12)


def test_engine_onnxruntime_refuses_instead_of_falling_back():
    model, _, _ = _conv_model()
    with pytest.raises(BadInputError, match="float64"):
        run_float64(model, {"x": np.zeros((1, 2, 9, 9), np.float32)}, engine="onnxruntime")


CASTS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x, int64[1] n) => (float[4] y, float16[4] h, float[3] z) {
  c = Constant<value_float=2.5>()
  cs = Constant<value_floats=[1.0, 2.0, 3.0, 4.0]>()
  m = Mul(x, c)
  m2 = Add(m, cs)
  h = Cast<to=10>(m2)
  back = Cast<to=1>(h)
  y = Add(back, w16f)
  zeros = ConstantOfShape(n)
  three = Constant<value=int64[1] {3}>()
  zs = ConstantOfShape<value=float[1] {0.5}>(three)
  zf = Cast<to=1>(zeros)
  zsum = ReduceSum<keepdims=0>(zf)
  z = Add(zs, zsum)
}"""


def _casts_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(CASTS)
    w16 = numpy_helper.from_array(np.array([0.5, 0.25, 1.0, 2.0], np.float16), "w16")
    model.graph.initializer.append(w16)
    model.graph.node.insert(0, helper.make_node("Cast", ["w16"], ["w16f"], to=TensorProto.FLOAT))
    model.graph.value_info.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [4]))
    return model


def test_every_float_becomes_double_and_float16_stays():
    model = _casts_model()
    double = to_float64(model)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # original untouched
    nodes = {n.output[0]: n for n in double.graph.node}
    to = {out: helper.get_attribute_value(n.attribute[0]) for out, n in nodes.items() if n.op_type == "Cast"}
    assert to == {"w16f": TensorProto.DOUBLE, "h": TensorProto.FLOAT16, "back": TensorProto.DOUBLE,
                  "zf": TensorProto.DOUBLE}
    for out in ("c", "cs"):  # value_float(s) make FLOAT tensors, so they become a DOUBLE 'value'
        (attr,) = nodes[out].attribute
        assert attr.name == "value" and attr.t.data_type == TensorProto.DOUBLE
    assert numpy_helper.to_array(nodes["cs"].attribute[0].t).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert nodes["zeros"].attribute[0].t.data_type == TensorProto.DOUBLE  # default value added
    assert nodes["zs"].attribute[0].t.data_type == TensorProto.DOUBLE
    assert nodes["three"].attribute[0].t.data_type == TensorProto.INT64
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*double.graph.input, *double.graph.output, *double.graph.value_info)}
    assert types == {"x": TensorProto.DOUBLE, "n": TensorProto.INT64, "y": TensorProto.DOUBLE,
                     "h": TensorProto.FLOAT16, "z": TensorProto.DOUBLE, "m": TensorProto.DOUBLE}
    assert double.graph.initializer[0].data_type == TensorProto.FLOAT16


def test_cast_model_runs_in_double_with_int_feeds_untouched(caplog):
    x = np.array([1.0, -2.0, 3.0, 0.125], np.float32)
    with caplog.at_level(logging.INFO, logger="onnx_fp16_rewrite.pipeline.float64_reference"):
        out = run_float64(_casts_model(), {"x": x, "n": np.array([5], np.int64)})
    assert _engine(caplog) == "onnxruntime"
    h = (x.astype(np.float64) * 2.5 + [1, 2, 3, 4]).astype(np.float16)
    np.testing.assert_array_equal(out["h"], h.astype(np.float64))  # FP16 rounding kept, upcast exactly
    np.testing.assert_array_equal(out["y"], h.astype(np.float64) + np.array([0.5, 0.25, 1.0, 2.0]))
    np.testing.assert_array_equal(out["z"], [0.5, 0.5, 0.5])
    assert all(v.dtype == np.float64 for v in out.values())


def test_unsorted_graph_is_sorted_for_the_reference_evaluator(caplog):
    model, w, b = _conv_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # Mul before the Conv it reads
    assert toposorted(model) is not model
    assert [n.op_type for n in toposorted(model).graph.node] == ["Conv", "Mul"]
    x = np.random.default_rng(3).standard_normal((1, 2, 9, 9)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="onnx_fp16_rewrite.pipeline.float64_reference"):
        out = run_float64(model, {"x": x}, engine="reference")
    assert _engine(caplog) == "reference"
    np.testing.assert_allclose(out["y"], _conv3x3_f64(x, w, b) ** 2, rtol=1e-12, atol=1e-12)


def test_sorted_graph_is_returned_as_is_and_missing_values_are_reported():
    model, _, _ = _conv_model()
    assert toposorted(model) is model
    model.graph.node[1].input[1] = "nowhere"
    with pytest.raises(BadInputError, match="nowhere"):
        toposorted(model)


def test_subgraph_constants_are_converted():
    then_g = helper.make_graph([helper.make_node("Constant", [], ["t"], value_float=1.5)], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [])])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value_float=-1.0)], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    double = to_float64(model)
    branch = double.graph.node[0].attribute[0].g
    assert branch.node[0].attribute[0].t.data_type == TensorProto.DOUBLE
    assert branch.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    out = run_float64(model, {"c": np.array(True)})
    assert out["y"].dtype == np.float64 and float(out["y"]) == 1.5


def test_bad_engine_name():
    with pytest.raises(BadInputError):
        run_float64(onnx.parser.parse_model(CONV), {}, engine="gpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("opset", [9, 11, 14])
def test_reference_batch_norm_uses_running_statistics(opset):
    """onnx.reference's opset 9-13 BatchNormalization uses batch statistics when the node carries
    momentum (TorchScript exports do); a one-output BN is inference mode, as the spec says."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), n) for n in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5, momentum=0.9)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    x = rng.normal(size=(2, c, 3, 3)).astype(np.float32)
    got = run_float64(model, {"x": x}, engine="reference")["y"]
    s, b, mu, v = (numpy_helper.to_array(i).astype(np.float64).reshape(-1, 1, 1) for i in inits)
    np.testing.assert_allclose(got, s * (x - mu) / np.sqrt(v + 1e-5) + b, rtol=1e-12, atol=1e-12)
    ort = run_float64(model, {"x": x}, engine="onnxruntime")["y"]
    np.testing.assert_allclose(got, ort, rtol=1e-12, atol=1e-12)
