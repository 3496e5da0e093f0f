"""Tests for onnx_fp16_rewrite.emit.mixed_precision: strongly typed FP16 models with FP32 islands."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_fp16_rewrite.emit.mixed_precision import to_mixed_precision
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

FP32, FP16 = TensorProto.FLOAT, TensorProto.FLOAT16
K = np.array([1.5, 2, 3, 4], np.float32)
H = 16  # spatial size of the integral-image model; box sums are (H-3) x (H-3)

# x -> Conv -> CumSum -> CumSum -> 4 Slices -> Sub/Sub/Add (3x3 box sum) -> Div -> MatMul -> y
INTEGRAL = f"""
<ir_version: 8, opset_import: ["" : 17]>
integral (float[1,2,{H},{H}] x) => (float[1,4,{H - 3},8] y) {{
    ax2 = Constant <value = int64 {{2}}> ()
    ax3 = Constant <value = int64 {{3}}> ()
    axes = Constant <value = int64[2] {{2, 3}}> ()
    s_hi = Constant <value = int64[2] {{3, 3}}> ()
    e_hi = Constant <value = int64[2] {{{H}, {H}}}> ()
    s_lo = Constant <value = int64[2] {{0, 0}}> ()
    e_lo = Constant <value = int64[2] {{{H - 3}, {H - 3}}}> ()
    s_b = Constant <value = int64[2] {{0, 3}}> ()
    e_b = Constant <value = int64[2] {{{H - 3}, {H}}}> ()
    s_c = Constant <value = int64[2] {{3, 0}}> ()
    e_c = Constant <value = int64[2] {{{H}, {H - 3}}}> ()
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    cs_h = CumSum (c, ax2)
    integral = CumSum (cs_h, ax3)
    A = Slice (integral, s_hi, e_hi, axes)
    B = Slice (integral, s_b, e_b, axes)
    C = Slice (integral, s_c, e_c, axes)
    D = Slice (integral, s_lo, e_lo, axes)
    AB = Sub (A, B)
    ABC = Sub (AB, C)
    box = Add (ABC, D)
    mean = Div (box, nine)
    y = MatMul (mean, m)
}}
"""
ISLAND_OPS = ("CumSum", "Slice", "Sub", "Add", "Div")
ISLAND_TENSORS = ("cs_h", "integral", "A", "B", "C", "D", "AB", "ABC", "box", "mean")


def _parse(text: str, **inits: np.ndarray) -> onnx.ModelProto:
    """Parse ONNX text, attach initializers, name every node ``<op>_<index>``."""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in inits.items())
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type.lower()}_{i}"
    onnx.checker.check_model(model, full_check=True)
    return model


def _integral_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    return _parse(
        INTEGRAL,
        w=rng.uniform(0, 1, (4, 2, 3, 3)).astype(np.float32),
        m=rng.uniform(-1, 1, (H - 3, 8)).astype(np.float32),
        nine=np.array(9, np.float32),
    )


def _island_plan(model: onnx.ModelProto) -> PrecisionPlan:
    return PrecisionPlan({n.name: "integral image" for n in model.graph.node if n.op_type in ISLAND_OPS})


def _types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor after strict inference."""
    g = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True).graph
    out = {t.name: t.data_type for t in g.initializer}
    out.update({v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)})
    return out


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _feed(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Feed ``x`` in whatever type the model's first input now declares."""
    inp = model.graph.input[0]
    return {inp.name: x.astype(np.float16 if inp.type.tensor_type.elem_type == FP16 else np.float32)}


def _casts(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Cast"]


def _x() -> np.ndarray:
    # U(0,100) makes the FP32 integral image reach ~1e5, past FP16's 65504.
    return np.random.default_rng(1).uniform(0, 100, (1, 2, H, H)).astype(np.float32)


def test_island_gets_one_cast_in_and_one_out_despite_fan_out():
    model = _integral_model()
    out, report = to_mixed_precision(model, _island_plan(model))
    casts = _casts(out)
    assert [(c.input[0], c.output[0]) for c in casts] == [
        ("c", "c/cast_to_fp32"),
        ("mean", "mean/cast_to_fp16"),
    ]
    assert report.casts_inserted == 2 and report.casts == ["c/cast_to_fp32", "mean/cast_to_fp16"]
    # The fan-out tensor feeds its four Slices directly: no cast sits on it.
    assert not [c for c in casts if c.input[0] == "integral"]
    slices = [n for n in out.graph.node if n.op_type == "Slice"]
    assert [s.input[0] for s in slices] == ["integral"] * 4
    assert report.fp32_node_count == 10 and report.fp16_node_count == 2
    assert report.forced_fp32_nodes == []


def test_island_tensors_are_float_and_the_rest_float16():
    model = _integral_model()
    out, report = to_mixed_precision(model, _island_plan(model))
    onnx.checker.check_model(out, full_check=True)
    types = _types(out)
    assert {t: types[t] for t in ISLAND_TENSORS} == {t: FP32 for t in ISLAND_TENSORS}
    assert {t: types[t] for t in ("x", "c", "y", "w", "m", "mean/cast_to_fp16")} == dict.fromkeys(
        ("x", "c", "y", "w", "m", "mean/cast_to_fp16"), FP16
    )
    assert types["nine"] == FP32  # only the FP32 Div reads it
    assert sorted(report.initializers_converted) == ["m", "w"]
    assert PrecisionPlan.from_model(out).fp32_nodes == _island_plan(model).fp32_nodes


@pytest.mark.parametrize("keep_io", [False, True])
def test_island_output_matches_fp32_and_stays_finite_in_strict_fp16(keep_io):
    model = _integral_model()
    out, _ = to_mixed_precision(model, _island_plan(model), keep_io_types=keep_io)
    x = _x()
    (ref,) = _run_ort(model, {"x": x})
    (got,) = _run_ort(out, _feed(out, x))
    assert got.dtype == (np.float32 if keep_io else np.float16)
    scale = np.abs(ref).max()
    assert np.abs(got.astype(np.float32) - ref).max() / scale < 1e-2
    # onnx.reference computes FP16 ops in float16 (ORT CPU would upcast them and hide overflow).
    (strict,) = ReferenceEvaluator(out).run(None, _feed(out, x))
    assert np.isfinite(strict).all()
    assert np.abs(strict.astype(np.float32) - ref).max() / scale < 1e-2


def test_without_the_island_strict_fp16_overflows():
    # The control for the test above: the same model converted entirely goes non-finite.
    model = _integral_model()
    out, report = to_mixed_precision(model, PrecisionPlan())
    with np.errstate(over="ignore", invalid="ignore"):
        (strict,) = ReferenceEvaluator(out).run(None, _feed(out, _x()))
    assert report.fp32_node_count == 0
    assert not np.isfinite(strict).all()


@pytest.mark.parametrize("keep_io, casts", [(False, 0), (True, 2)])
def test_no_plan_converts_everything_and_casts_only_at_io(keep_io, casts):
    model = _integral_model()
    out, report = to_mixed_precision(model, PrecisionPlan(), keep_io_types=keep_io)
    assert report.fp32_node_count == 0 and report.fp32_nodes == {}
    assert report.fp16_node_count == 12
    assert report.casts_inserted == casts
    if keep_io:
        assert [(c.input[0], c.output[0]) for c in _casts(out)] == [
            ("x", "x/cast_to_fp16"),
            ("y_fp16", "y"),
        ]
    types = _types(out)
    assert all(types[t] == FP16 for t in ISLAND_TENSORS)


@pytest.mark.parametrize("keep_io", [False, True])
def test_keep_io_types_changes_io_types_not_names(keep_io):
    model = _integral_model()
    out, report = to_mixed_precision(model, _island_plan(model), keep_io_types=keep_io)
    io_type = FP32 if keep_io else FP16
    assert [i.name for i in out.graph.input] == ["x"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert out.graph.input[0].type.tensor_type.elem_type == io_type
    assert out.graph.output[0].type.tensor_type.elem_type == io_type
    assert report.keep_io_types is keep_io and report.casts_inserted == (4 if keep_io else 2)


def test_input_model_is_not_mutated_and_node_names_stay_unique():
    model = _integral_model()
    before = model.SerializeToString()
    out, _ = to_mixed_precision(model, _island_plan(model), keep_io_types=True)
    assert model.SerializeToString() == before
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names))


def test_output_produced_in_an_island_keeps_its_name():
    model = _parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y, float[4] z) {
            y = Exp (x)
            z = Neg (y)
        }
        """
    )
    out, report = to_mixed_precision(model, PrecisionPlan({"exp_0": "range"}))
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert [(c.input[0], c.output[0]) for c in _casts(out)] == [
        ("x", "x/cast_to_fp32"),
        ("y_fp32", "y"),  # the graph output is the cast; Exp writes a renamed tensor
    ]
    neg = next(n for n in out.graph.node if n.op_type == "Neg")
    assert neg.input[0] == "y"  # the FP16 Neg shares the output's cast
    assert _types(out)["y_fp32"] == FP32 and _types(out)["y"] == FP16


def test_initializer_read_in_both_precisions_is_duplicated():
    model = _parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) {
            a = Mul (x, k)
            b = Add (a, k)
            y = Relu (b)
        }
        """,
        k=K,
    )
    out, report = to_mixed_precision(model, PrecisionPlan({"add_1": "test"}))
    inits = {t.name: t.data_type for t in out.graph.initializer}
    assert inits == {"k": FP32, "k_fp16": FP16}
    assert report.initializers_duplicated == ["k"]
    nodes = {n.op_type: list(n.input) for n in out.graph.node}
    assert nodes["Mul"] == ["x", "k_fp16"] and nodes["Add"] == ["a/cast_to_fp32", "k"]
    x = np.arange(4, dtype=np.float32)
    (got,) = _run_ort(out, {"x": x.astype(np.float16)})
    np.testing.assert_allclose(got, np.maximum(x * K + K, 0), rtol=1e-3)


def test_passthrough_input_and_initializer_output_with_keep_io():
    model = _parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] x2, float[2] k, float[2] y) {
            x2 = Identity (x)
            y = Add (x, k)
        }
        """,
        k=np.array([1, 2], np.float32),
    )
    out, report = to_mixed_precision(model, PrecisionPlan(), keep_io_types=True)
    assert [o.name for o in out.graph.output] == ["x2", "k", "y"]
    assert {t.name: t.data_type for t in out.graph.initializer} == {"k": FP32, "k_fp16": FP16}
    assert report.casts == ["x/cast_to_fp16", "x2/cast_to_fp32", "y/cast_to_fp32"]
    x2, k, y = _run_ort(out, {"x": np.array([0.5, 1], np.float32)})
    assert x2.dtype == k.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(y, [1.5, 3])


def test_resize_scales_stay_float():
    model = _parse(
        """
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[1,1,4,4] x) => (float[1,1,8,8] y) {
            r = Relu (x)
            y = Resize <mode = "nearest"> (r, , scales)
        }
        """,
        scales=np.array([1, 1, 2, 2], np.float32),
    )
    out, report = to_mixed_precision(model, PrecisionPlan())
    types = _types(out)
    assert types["scales"] == FP32 and types["r"] == FP16 and types["y"] == FP16
    assert report.initializers_converted == [] and report.casts_inserted == 0
    x = np.random.default_rng(2).uniform(-1, 1, (1, 1, 4, 4)).astype(np.float32)
    (got,) = _run_ort(out, {"x": x.astype(np.float16)})
    (ref,) = _run_ort(model, {"x": x})
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=1e-3, atol=1e-3)


def test_equal_and_where_get_consistent_input_types():
    model = _parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[6] x) => (float[6] y, bool[6] eq) {
            a = Relu (x)
            b = Neg (x)
            eq = Equal (a, b)
            y = Where (eq, a, b)
        }
        """
    )
    out, report = to_mixed_precision(model, PrecisionPlan({"relu_0": "test"}))
    nodes = {n.op_type: list(n.input) for n in out.graph.node}
    types = _types(out)
    # Equal has no float output: it follows its first input (FP32 a) and b is cast up once;
    # Where writes a float, so it runs FP16 and a is cast down once.
    assert nodes["Equal"] == ["a", "b/cast_to_fp32"]
    assert nodes["Where"] == ["eq", "a/cast_to_fp16", "b"]
    assert types[nodes["Equal"][0]] == types[nodes["Equal"][1]] == FP32
    assert types[nodes["Where"][1]] == types[nodes["Where"][2]] == FP16
    assert report.fp32_nodes["equal_2"].startswith("converter: follows")
    x = np.array([0, 1, -1, 2, -2, 0], np.float32)
    y, eq = _run_ort(out, {"x": x.astype(np.float16)})
    np.testing.assert_array_equal(eq, np.maximum(x, 0) == -x)
    np.testing.assert_array_equal(y, np.where(eq, np.maximum(x, 0), -x))


def test_constants_casts_and_clamping(caplog):
    model = _parse(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3] x, int64[3] n) => (float[3] y, float[2] z) {
            c = Constant <value = float[3] {0.5, 100000.0, -1.0}> ()
            big = Constant <value_float = 0.5> ()
            a = Mul (x, c)
            b = Add (x, c)
            nf = Cast <to = 1> (n)
            s = Add (a, nf)
            shape = Constant <value = int64[1] {2}> ()
            z = ConstantOfShape <value = float[1] {70000.0}> (shape)
            t = Mul (s, big)
            y = Add (t, b)
        }
        """
    )
    with caplog.at_level(logging.WARNING, logger="onnx_fp16_rewrite.emit.mixed_precision"):
        out, report = to_mixed_precision(model, PrecisionPlan({"add_3": "test"}))
    nodes = {n.name: n for n in out.graph.node}
    cast = nodes["cast_4"]
    assert helper.get_attribute_value(cast.attribute[0]) == FP16  # Cast(to=FLOAT) in FP16 code
    assert numpy_helper.to_array(nodes["c_fp16"].attribute[0].t).dtype == np.float16
    assert numpy_helper.to_array(nodes["constant_0"].attribute[0].t).dtype == np.float32
    assert report.initializers_duplicated == ["c"]
    assert numpy_helper.to_array(nodes["constant_1"].attribute[0].t).dtype == np.float16
    cos = numpy_helper.to_array(nodes["constantofshape_7"].attribute[0].t)
    assert cos.dtype == np.float16 and cos[0] == 65504
    assert report.initializers_clamped == {"c": 1, "z": 1}
    assert "'c'" in caplog.text and "'z'" in caplog.text
    assert _types(out)["z"] == FP16
    y, z = _run_ort(out, {"x": np.ones(3, np.float16), "n": np.arange(3, dtype=np.int64)})
    # Element 1 overflows FP16 by construction (100000 * 1 + ...); the others are exact.
    np.testing.assert_array_equal(y[[0, 2]], np.array([0.25 + 1.5, 0.5 + 0.0], np.float16))
    np.testing.assert_array_equal(z, np.array([65504, 65504], np.float16))


def test_unconvertible_nodes_stay_fp32_with_reasons():
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    then_g = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["t_out"], name="then_neg")], "then", [],
        [helper.make_tensor_value_info("t_out", FP32, [4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["e_out"], name="else_id")], "else", [],
        [helper.make_tensor_value_info("e_out", FP32, [4])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("RandomNormalLike", ["h"], ["noise"], name="noise", seed=1.0),
        helper.make_node("MyOp", ["h"], ["custom"], name="custom", domain="my.domain"),
        helper.make_node("Range", ["r0", "r1", "r2"], ["rng"], name="range"),
        helper.make_node("Sum", ["branch", "noise", "h"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FP32, [4]), cond],
        [helper.make_tensor_value_info("y", FP32, [4]), helper.make_tensor_value_info("rng", FP32, [4]),
         helper.make_tensor_value_info("custom", FP32, [4])],
        [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("r0", 0), ("r1", 4), ("r2", 1))],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)]
    )
    out, report = to_mixed_precision(model, PrecisionPlan())
    reasons = report.fp32_nodes
    assert set(report.forced_fp32_nodes) == {"if", "noise", "custom", "range"}
    assert "bodies are converted" in reasons["if"] and "dtype" in reasons["noise"]
    assert "custom domain" in reasons["custom"] and "Range-11 has no float16" in reasons["range"]
    assert report.fp16_nodes == ["relu", "else_id", "then_neg", "sum"]  # body nodes converted too
    # One FP32 copy of h serves RandomNormalLike and the custom op; the FP16 branches read h as it is.
    by_name = {n.name: n for n in out.graph.node}
    then_in = by_name["if"].attribute[0].g.node[0].input[0]
    assert then_in == "h" and by_name["custom"].input[0] == "h/cast_to_fp32"
    assert sum(1 for c in _casts(out) if c.input[0] == "h") == 1
    types = _types(out)
    assert types["r0"] == FP32 and types["rng"] == FP16 and types["branch"] == FP32
    # Inference cannot type a custom op's output: its declared type is kept under the new name.
    assert by_name["custom"].output[0] == "custom_fp32"
    assert {v.name: v.type.tensor_type.elem_type for v in out.graph.value_info}["custom_fp32"] == FP32


def test_report_is_json_serializable():
    model = _integral_model()
    _, report = to_mixed_precision(model, _island_plan(model), keep_io_types=True)
    data = json.loads(json.dumps(dataclasses.asdict(report)))
    assert data["casts_inserted"] == 4 and data["fp32_node_count"] == 10
    assert data["keep_io_types"] is True
