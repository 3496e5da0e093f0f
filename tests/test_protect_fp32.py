import numpy as np
import pytest

from onnx_fp16_rewrite.passes.protect_fp32 import ProtectFp32
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.model_io import load_model, save_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

FEEDS = [{"x": np.random.default_rng(1).uniform(20, 40, (1, 4096)).astype(np.float32)}]
REGION = {"cumsum1", "slice7", "slice8", "sub9", "div11"}


def run(model, pass_):
    fixed, report = PassManager([pass_], FEEDS).run(model)
    return fixed, report.passes[0]


def test_region_grows_until_values_fit(window_model):
    fixed, record = run(window_model, ProtectFp32())
    assert record.status == "kept"
    plan = PrecisionPlan.from_model(fixed)
    # Prefix sums (~1.2e5) and the window sums (~960) vs exit_absmax 2048: the Sub's output
    # (max ~1280) fits, so the region ends at the Sub; the Div reads a small tensor.
    assert set(plan.fp32_nodes) == {"cumsum1", "slice7", "slice8", "sub9"}
    assert "op type CumSum" in plan.fp32_nodes["cumsum1"]
    assert check_fp16(fixed, FEEDS).passed
    # Graph untouched: only the plan in the metadata changed.
    assert sorted(n.name for n in fixed.graph.node) == sorted(n.name for n in window_model.graph.node)


def test_low_exit_absmax_grows_further(window_model):
    fixed, _ = run(window_model, ProtectFp32(exit_absmax=500.0))
    assert set(PrecisionPlan.from_model(fixed).fp32_nodes) == REGION


def test_without_growth_pinning_the_cumsum_is_not_enough(window_model):
    fixed, record = run(window_model, ProtectFp32(grow=False))
    assert set(PrecisionPlan.from_model(fixed).fp32_nodes) == {"cumsum1"}
    report = check_fp16(fixed, FEEDS)
    assert not report.passed and report.outputs[0].inf > 0


def test_match_and_names(window_model):
    fixed, record = run(window_model, ProtectFp32(op_types=(), match="^slice", nodes=("sub9", "nope")))
    plan = PrecisionPlan.from_model(fixed)
    # The Slices read the CumSum output (large): the region grows back to its producer.
    assert {"slice7", "slice8", "sub9", "cumsum1"} <= set(plan.fp32_nodes)
    assert any(s.node == "nope" and "no node" in s.detail for s in record.skipped)


def test_pattern_matching_nothing_is_a_skip_not_a_change(window_model):
    fixed, record = run(window_model, ProtectFp32(op_types=(), match="sca"))
    assert record.status == "unchanged" and not record.rewritten
    assert any("matched no node" in s.detail for s in record.skipped)
    assert len(PrecisionPlan.from_model(fixed)) == 0


def test_plan_survives_save_and_load(window_model, tmp_path):
    fixed, _ = run(window_model, ProtectFp32())
    path = save_model(fixed, tmp_path / "fixed.onnx")
    again = load_model(path)
    assert PrecisionPlan.from_model(again).fp32_nodes == PrecisionPlan.from_model(fixed).fp32_nodes
    # Running the pass again composes: nothing new to pin.
    _, record = run(again, ProtectFp32())
    assert record.status == "unchanged"
    assert all(s.detail == "already FP32 in the plan" for s in record.skipped)


def test_bad_options_are_rejected():
    with pytest.raises(BadInputError, match="bad --match regex"):
        ProtectFp32(match="sca(")
    with pytest.raises(BadInputError, match="exit_absmax"):
        ProtectFp32(exit_absmax=1e6)
