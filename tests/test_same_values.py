"""Value numbering (emulation.same_values) and the mixed-model verification it spares ``fix --emit mixed``."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite import fix as fix_module
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16, emu_feed
from onnx_fp16_rewrite.emulation.same_values import ValueNumbers
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.ort_runner import make_session, run_model
from onnx_fp16_rewrite.models import DEMO_MODELS, demo_inputs
from onnx_fp16_rewrite.models.t5_encoder import build_t5_encoder, demo_inputs as t5_inputs
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from tests.site_models import upstream_site_model

NOTE = "not run again"


def test_feed_rounding_is_the_cast_pair_bit_for_bit():
    """The proof equates rounding a feed in numpy (emu_feed) with the graph's Cast pair (ORT)."""
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, -65520.0, 7e4, 1e38, np.inf, -np.inf, np.nan,
                        2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 3 * 2.0**-26, 6.1e-5, 5.96e-8, 1e-10], np.float32)
    x = np.concatenate([special, (rng.standard_normal(200_000) * 10.0 ** rng.uniform(-9, 6, 200_000))
                        .astype(np.float32)])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16), helper.make_node("Cast", ["h"], ["y"], to=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (by_ort,) = make_session(model).run(None, {"x": x})
    by_numpy = emu_feed({"x": x}, {"x"})["x"]
    assert np.array_equal(np.isnan(by_ort), np.isnan(by_numpy)) and np.isnan(by_numpy).sum() == 1
    finite = ~np.isnan(by_numpy)
    assert np.array_equal(by_ort[finite].view(np.uint32), by_numpy[finite].view(np.uint32))


def _graph(nodes, weights, out="y"):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv(w="w", x="x", out="y", strides=(1, 1)):
    return helper.make_node("Conv", [x, w], [out], pads=[1, 1, 1, 1], strides=list(strides))


def _round(src, dst):
    return [helper.make_node("Cast", [src], [dst + "_h"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", [dst + "_h"], [dst], to=TensorProto.FLOAT)]


def test_numbers_see_through_what_changes_no_value_and_nothing_else():
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3)).astype(np.float32)
    numbers = ValueNumbers()

    def out_number(model, rounded=()):
        return numbers.number(model, set(rounded))["y"]

    base = out_number(_graph([*_round("x", "r"), _conv(x="r")], {"w": w}))
    # Identity, a Cast to FLOAT of a FLOAT tensor, a second rounding, another weight name: the same value.
    same = out_number(_graph([*_round("x", "r0"), helper.make_node("Identity", ["r0"], ["i"]),
                              helper.make_node("Cast", ["i"], ["c"], to=TensorProto.FLOAT), *_round("c", "r"),
                              _conv(w="other", x="r")], {"other": w.copy()}))
    # The feed rounded by emu_feed is the Cast pair's rounding.
    fed = out_number(_graph([_conv(x="x")], {"w": w}), rounded={"x"})
    assert same == base == fed
    changed = w.copy()
    changed[0, 0, 0, 0] = np.nextafter(changed[0, 0, 0, 0], np.float32(np.inf))
    assert out_number(_graph([*_round("x", "r"), _conv(x="r")], {"w": changed})) != base
    assert out_number(_graph([*_round("x", "r"), _conv(x="r", strides=(2, 2))], {"w": w})) != base
    assert out_number(_graph([_conv(x="x")], {"w": w})) != base  # not rounded
    assert numbers.number(_graph([helper.make_node("Dropout", ["x"], ["y"])], {}), set()) is None


def _reference(model, feeds):
    return run_model(model, feeds)


def _fields(report):
    data = dataclasses.asdict(report)
    del data["seconds"], data["notes"]
    return data


def _overflow_at_input_model() -> onnx.ModelProto:
    """x (up to 100) * 1000 overflows FP16 in the node that reads the graph input: the fixer pins
    it, so it reads x in FP32 in the weak emulation and x's FP16 copy in the mixed model (unless
    its inputs stay FP32)."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["a"], name="mul_big"),
             helper.make_node("Mul", ["a", "small"], ["b"], name="mul_small"),
             helper.make_node("Relu", ["b"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])],
                              [numpy_helper.from_array(np.array(1000.0, np.float32), "big"),
                               numpy_helper.from_array(np.array(1e-3, np.float32), "small")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


CASES = {
    # No FP32 node left: the verdict is the last diagnosis'.
    "nafnet": (lambda: DEMO_MODELS["nafnet"](), lambda m: [demo_inputs(m)], {}, True),
    # Pinned regions: the verdict is a screen's, the mixed model's Casts to FP16 its rounded edges.
    "t5": (build_t5_encoder, lambda m: [t5_inputs(m, seed=0), t5_inputs(m, seed=1)], {}, True),
    "pinned-input": (_overflow_at_input_model,
                     lambda m: [{"x": np.random.default_rng(0).uniform(0, 100, (4, 256)).astype(np.float32)}], {},
                     False),
    "pinned-input-fp32-io": (_overflow_at_input_model,
                             lambda m: [{"x": np.random.default_rng(0).uniform(0, 100, (4, 256)).astype(np.float32)}],
                             {"keep_io_types": True}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_verification_without_a_run_is_the_run(monkeypatch, case):
    build, inputs, options, proved = CASES[case]
    model = build()
    feeds = inputs(model)
    result = fix_model(model, [], feeds, auto=True, emit="mixed", **options)
    after = result.report.fp16_after
    assert (NOTE in " ".join(after.notes)) == proved
    # The same fix with the mixed model's verification run, as before.
    monkeypatch.setattr(fix_module, "_proved_mixed_verdict", lambda *a, **k: None)
    ran = fix_model(model, [], feeds, auto=True, emit="mixed", **options)
    assert NOTE not in " ".join(ran.report.fp16_after.notes)
    assert _fields(after) == _fields(ran.report.fp16_after)
    assert onnx.printer.to_text(result.model.graph) == onnx.printer.to_text(ran.model.graph)
    # And a check of the emitted model from scratch (its FP32 reference: a plain run of the original).
    fresh = check_fp16(result.model, feeds, _reference(model, feeds), rel_l2_tolerance=1e-2, max_findings=1000,
                       screen=True)
    assert _fields(after) == _fields(fresh)
    assert after.passed and after.mode == "strong"
    if case == "t5":
        assert result.report.auto.verdict_run == "screen" and result.report.mixed.casts_inserted > 0
        assert result.report.auto.after.edges_finite is True
    if case.startswith("pinned-input"):
        assert "mul_big" in result.report.mixed.fp32_nodes
    if case == "nafnet":
        assert result.report.auto.verdict_run == "diagnosis" and result.report.auto.fp32_nodes == 0


def test_an_fp32_island_value_that_fp16_cannot_hold_refuses_the_proof():
    """A pinned node's output of -1e5 read by an FP16 Relu: the weak run is clean (its FP16 copy is -inf,
    Relu makes it 0) but the mixed model stores that copy (its Cast to FP16) as a tensor of its own, which
    its check lists as failing. The screen's sum of the rounded edge says so, and the proof is refused."""
    from onnx_fp16_rewrite.emit.mixed_precision import to_mixed_precision
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
    from onnx_fp16_rewrite.emulation.same_values import reused_verdict

    nodes = [helper.make_node("Mul", ["x", "big"], ["a"], name="mul_big"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
                              [numpy_helper.from_array(np.array(-1000.0, np.float32), "big")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": np.linspace(0.5, 100, 64, dtype=np.float32)}]
    plan = PrecisionPlan()
    plan.pin("mul_big", "test")
    reference = _reference(model, feeds)
    weak = check_fp16(model, feeds, reference, plan=plan, screen=True, exact_findings=False)
    assert weak.passed and weak.failing_tensors == 0 and weak.edges_finite is False
    mixed, _ = to_mixed_precision(model, plan, keep_io_types=True)
    assert reused_verdict(model, mixed, plan, feeds, weak, verdict_run="screen") is None
    strong = check_fp16(mixed, feeds, reference, plan=plan, screen=True)
    assert strong.passed and strong.failing_tensors == 1
    # With the island's output in range the same proof holds, and gives the strong check's report.
    small = onnx.ModelProto()
    small.CopyFrom(model)
    small.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(-10.0, np.float32), "big"))
    reference = _reference(small, feeds)
    weak = check_fp16(small, feeds, reference, plan=plan, screen=True, exact_findings=False)
    assert weak.edges_finite is True
    mixed, _ = to_mixed_precision(small, plan, keep_io_types=True)
    proved = reused_verdict(small, mixed, plan, feeds, weak, verdict_run="screen")
    assert proved is not None
    assert _fields(proved) == _fields(check_fp16(mixed, feeds, reference, plan=plan, screen=True))


class _NudgeBranch(Pass):
    """Scales the branch's constant by 1 + 2^-20: valid in FP32 (1e-6 relative), but not the same bits."""

    name = "nudge-branch"
    summary = "test pass"

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.name == "branch")
        node.inputs[1].values = np.array(3.0 * (1 + 2.0**-20), np.float32)
        return PassResult(True, rewritten=[Site("branch", "Mul", "nudged")])


@pytest.mark.parametrize("emit", ["fp32", "mixed"])
def test_after_a_pass_the_verification_compares_with_the_original_outputs(emit):
    """With --pass before --auto the search compares with the passed model's FP32 outputs; the
    reported verification must compare with the original's, so it is run, not taken from the search."""
    model = upstream_site_model()
    feeds = [{"x": np.random.default_rng(0).uniform(0.5, 2.0, (4, 8)).astype(np.float32)}]
    result = fix_model(model, [_NudgeBranch()], feeds, auto=True, emit=emit, auto_rewrites=())
    assert result.report.passes.passes[0].status == "kept" and not result.report.auto.first_given
    assert result.report.auto.fp32_nodes > 0
    after = result.report.fp16_after
    assert NOTE not in " ".join(after.notes)
    fresh = check_fp16(result.model, feeds, _reference(model, feeds), rel_l2_tolerance=1e-2, max_findings=1000,
                       screen=True)
    assert _fields(after) == _fields(fresh)
    # The search's own verdict compared with the nudged outputs: z differs from the original's.
    z_search = next(o for o in result.report.auto.after.outputs if o.name == "z")
    assert z_search.rel_l2 != next(o for o in after.outputs if o.name == "z").rel_l2
