"""A Reshape-like node's statistics are its input's (stat_sites.alias_site): no reductions of its
own in the emulation graph, and the very numbers a graph measuring it gives, sampled ones too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation import stat_sites
from onnx_fp16_rewrite.emulation.error_attribution import error_run
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation


def _model(rows: int) -> onnx.ModelProto:
    """MatMul -> Reshape -> Tanh -> Flatten; ``rows`` x 512 (sampled errors past 128 rows)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((512, 512)) * 40).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([rows, 16, 32], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["r"], name="reshape"),
             helper.make_node("Tanh", ["r"], ["t"], name="tanh"),
             helper.make_node("Flatten", ["t"], ["y"], name="flatten", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 512])], [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(rows: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(1).standard_normal((rows, 512)).astype(np.float32)}]


def _without_aliases(monkeypatch):
    monkeypatch.setattr("onnx_fp16_rewrite.emulation.fp16_emulation.alias_site", lambda *a, **k: None)


@pytest.mark.parametrize("rows", [64, 512])  # exact error statistics, sampled ones
@pytest.mark.parametrize("profile", [False, True])
def test_reshape_takes_its_inputs_numbers(rows, profile, monkeypatch):
    model, feeds = _model(rows), _feeds(rows)
    emu = build_emulation(model, None, fp32_shadow=True, with_stats=False, twin_profile=profile)
    by = {s.tensor: s for s in emu.sites}
    assert by["r"].outputs() == by["h"].outputs() and by["r"].node == "reshape" and by["r"].op == "Reshape"
    assert by["t"].outputs() != by["h"].outputs()  # Tanh: its own statistics
    assert not any(n.name.startswith("r__") for n in emu.model.graph.node)
    aliased = error_run(model, feeds, twin_profile=profile)
    _without_aliases(monkeypatch)
    alone = build_emulation(model, None, fp32_shadow=True, with_stats=False, twin_profile=profile)
    assert len(alone.model.graph.node) > len(emu.model.graph.node)
    measured = error_run(model, feeds, twin_profile=profile)
    assert [(e.tensor, e.op, e.rel_error, e.nonfinite, e.sampled) for e in aliased.errors] == \
        [(e.tensor, e.op, e.rel_error, e.nonfinite, e.sampled) for e in measured.errors]
    assert {e.tensor for e in aliased.errors} == {"h", "r", "t", "y"}
    assert np.array_equal(aliased.outputs[0]["y"], measured.outputs[0]["y"])
    if profile:
        a, m = aliased.profile.profile([]).ranges, measured.profile.profile([]).ranges
        assert {k: (v.absmax, v.p999) for k, v in a.items()} == {k: (v.absmax, v.p999) for k, v in m.items()}


def test_no_alias_across_a_precision_edge_or_where_raw_values_are_measured():
    model = _model(64)
    # The MatMul pinned to FP32 and the Reshape FP16: the Reshape reads a rounded copy.
    plan = PrecisionPlan()
    plan.pin("mm", "test")
    emu = build_emulation(model, plan, fp32_shadow=True, with_stats=False)
    by = {s.tensor: s for s in emu.sites}
    assert by["r"].outputs() != by["h"].outputs()
    # check_fp16's statistics read the value before rounding (an overflow's absmax): not the input's.
    emu = build_emulation(model, None, with_stats=True)
    by = {s.tensor: s for s in emu.sites}
    assert by["r"].outputs() != by["h"].outputs()
    # A screen (one sum of the stored value) may alias.
    emu = build_emulation(model, None, with_stats=True, nonfinite_only=True)
    by = {s.tensor: s for s in emu.sites}
    assert by["r"].outputs() == by["h"].outputs()
    assert stat_sites.SAME_FLAT_VALUES >= {"Reshape", "Flatten"}

