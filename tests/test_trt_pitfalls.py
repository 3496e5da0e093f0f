"""TensorRT pitfall warnings, found from the ONNX graph alone (no TensorRT involved)."""

import onnx
import pytest
from conftest import parse_named
from onnx import TensorProto, helper

from onnx_fp16_rewrite.models import DEMO_MODELS
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.tensorrt.trt_pitfalls import Pitfall, find_pitfalls


def _codes(pitfalls):
    return [p.code for p in pitfalls]


def _model(body: str, *, inputs: str = "float[2,8] x", outputs: str = "float[2,8] y, float[2,8] z") -> onnx.ModelProto:
    return parse_named(f"""<ir_version: 8, opset_import: ["" : 17]>
g ({inputs}) => ({outputs}) {{
{body}
}}""")


TWO_AXES = """
  a0 = Constant<value=int64 {0}>()
  a1 = Constant<value=int64 {-1}>()
  y = CumSum(x, a0)
  z = CumSum(x, a1)"""


def test_cumsums_on_different_axes_warn_from_10_8():
    model = _model(TWO_AXES)
    (pitfall,) = find_pitfalls(model)
    assert pitfall.code == "cumsum-axes" and pitfall.nodes == ("cumsum2", "cumsum3")
    assert pitfall.message.startswith("TensorRT >= 10.8: 2 CumSum nodes on 2 different axes")
    assert "NVIDIA/TensorRT#4551" in pitfall.message and "onnx/onnx-tensorrt#1034" in pitfall.message
    assert find_pitfalls(model, trt_version=(10, 7)) == []
    assert _codes(find_pitfalls(model, trt_version=(10, 8))) == ["cumsum-axes"]
    assert _codes(find_pitfalls(model, trt_version=(11, 1))) == ["cumsum-axes"]  # no fixed version known


def test_same_axis_written_two_ways_is_one_axis():
    # -1 and 1 are the same axis of a rank-2 tensor (the rank comes from shape inference).
    model = _model(TWO_AXES.replace("{0}", "{1}"))
    assert find_pitfalls(model) == []


def test_reverse_cumsum_warns_for_every_version():
    model = _model("""
  a = Constant<value=int64 {1}>()
  y = CumSum<reverse=1>(x, a)
  z = CumSum(x, a)""")
    (pitfall,) = find_pitfalls(model)
    assert pitfall.code == "cumsum-reverse" and pitfall.nodes == ("cumsum1",)
    assert "NVIDIA/TensorRT#4513" in pitfall.message and pitfall.versions == "TensorRT (all versions)"
    assert _codes(find_pitfalls(model, trt_version=(10, 0))) == ["cumsum-reverse"]


def test_computed_axis_warns_before_10_8_only():
    model = _model("""
  a = Constant<value=int64 {1}>()
  y = CumSum(x, a)
  s = Shape(x)
  r = Size(s)
  one = Constant<value=int64 {1}>()
  b = Sub(r, one)
  z = CumSum(x, b)""")
    (pitfall,) = find_pitfalls(model)
    assert pitfall.code == "cumsum-axis-not-constant" and pitfall.nodes == ("cumsum6",)
    assert "must be an initializer" in pitfall.text and "--fold-constants" in pitfall.text
    assert "NVIDIA/TensorRT#3425" in pitfall.message and pitfall.versions == "TensorRT < 10.8"
    assert find_pitfalls(model, trt_version=(10, 8)) == []


def test_initializer_and_constant_node_axes_are_fine():
    model = _model("""
  a = Constant<value=int64 {1}>()
  y = CumSum(x, a)
  z = CumSum(x, ax)""", inputs="float[2,8] x, int64 ax")
    init = helper.make_tensor("ax", TensorProto.INT64, [], [1])
    model.graph.initializer.append(init)
    assert find_pitfalls(model) == []


def test_pinned_cumsum_under_weak_typing_warns_before_10_8():
    model = _model(TWO_AXES.replace("{0}", "{1}"))
    plan = PrecisionPlan({"cumsum2": "overflow", "cumsum3": "overflow"})
    (pitfall,) = find_pitfalls(model, plan)
    assert pitfall.code == "cumsum-pinned-weak" and pitfall.nodes == ("cumsum2", "cumsum3")
    assert "unnamed loops" in pitfall.text and pitfall.versions == "TensorRT < 10.8"
    assert find_pitfalls(model, plan, trt_version=(10, 8)) == []
    # The plan stored in the model is the default.
    plan.store_in(model)
    assert _codes(find_pitfalls(model)) == ["cumsum-pinned-weak"]


def test_weak_typing_pitfalls_do_not_concern_fp16_models():
    model = _model(TWO_AXES.replace("{0}", "{1}"), inputs="float16[2,8] x", outputs="float16[2,8] y, float16[2,8] z")
    model.graph.node[2].name = "a,b"
    plan = PrecisionPlan({"a,b": "r", "cumsum3": "r"})
    assert find_pitfalls(model, plan) == []


@pytest.mark.parametrize(("name", "reason"), [("/sca/Concat_a,b", "','"), ("/sca/it's", "quote"), ("/sca/*", "wildcard")])
def test_names_trtexec_cannot_carry_warn_until_11(name, reason):
    model = _model("""
  y = Relu(x)
  z = Neg(y)""")
    model.graph.node[0].name = name
    plan = PrecisionPlan({name: "r", "neg1": "r"})
    (pitfall,) = find_pitfalls(model, plan)
    assert pitfall.code == "layer-name" and pitfall.nodes == (name,)
    assert reason in pitfall.text and "--layerPrecisions" in pitfall.text and pitfall.versions == "TensorRT < 11.0"
    assert _codes(find_pitfalls(model, plan, trt_version=(10, 13))) == ["layer-name"]
    assert find_pitfalls(model, plan, trt_version=(11, 0)) == []


def test_names_with_slash_and_colon_are_fine():
    model = _model("""
  y = Relu(x)
  z = Neg(y)""")
    model.graph.node[0].name = "/blk:0/sca/Relu"
    assert find_pitfalls(model, PrecisionPlan({"/blk:0/sca/Relu": "r"})) == []


def test_nafnet_demo_has_exactly_the_multi_axis_pitfall():
    (pitfall,) = find_pitfalls(DEMO_MODELS["nafnet"]())
    assert pitfall.code == "cumsum-axes" and len(pitfall.nodes) == 4
    assert all(n.endswith(("/CumSum", "/CumSum_1")) and "/sca/" in n for n in pitfall.nodes)
    assert "(axis 3)" in pitfall.text and "(axis 2)" in pitfall.text


def test_pitfall_version_window():
    p = Pitfall("x", "t", (), (), since=(10, 8), until=(11, 0))
    assert [p.affects(v) for v in [(10, 7), (10, 8), (10, 13), (11, 0)]] == [False, True, True, False]
    assert p.versions == "TensorRT 10.8 to < 11.0" and p.message == "TensorRT 10.8 to < 11.0: t"


def test_check_prints_pitfalls_and_reports_them(tmp_path, capsys):
    """Shown by the emulation backend too: no TensorRT needed to learn about them."""
    import json

    from onnx_fp16_rewrite.cli import main

    assert main(["check", "--demo", "nafnet", "--report", str(tmp_path / "r.json")]) == 4
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: TensorRT >= 10.8: 4 CumSum nodes")
    (reported,) = json.loads((tmp_path / "r.json").read_text())["details"]["trt_pitfalls"]
    assert reported["code"] == "cumsum-axes" and reported["since"] == [10, 8] and reported["until"] is None
