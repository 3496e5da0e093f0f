"""The fixer's first emulation run is also the range profile and the FP32 reference (issue 11),
and large tensors' FP16 errors come from a strided sample: answers as from separate runs."""

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.analysis.diagnosis import diagnose
from onnx_fp16_rewrite.analysis.range_profile import profile_ranges
from onnx_fp16_rewrite.emulation import shadow_errors
from onnx_fp16_rewrite.emulation.error_attribution import error_run
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.models import DEMO_MODELS
from onnx_fp16_rewrite.models.nafnet import build_nafnet, demo_inputs


@pytest.fixture(scope="module")
def nafnet():
    model = DEMO_MODELS["nafnet"]()  # its CumSums overflow FP16
    return model, [demo_inputs(model, seed=s) for s in (0, 1)]


def _ranges(profile):
    return {t: (r.node, r.op, r.absmax, r.p999, r.subnormal_fraction, r.fp32_nonfinite, r.sentinels)
            for t, r in profile.ranges.items()}


def test_first_diagnosis_profile_is_the_profiling_runs(nafnet):
    model, feeds = nafnet
    separate = profile_ranges(model, feeds)
    one = diagnose(model, feeds, None)
    # Same tensors, same statistics bit for bit (max/min exact, the same sample positions).
    assert _ranges(one.profile) == _ranges(separate)
    assert one.profile.runs == len(feeds)
    # The shadow's outputs are the FP32 reference: equal to a plain FP32 run, bit for bit.
    plain = run_model(model, feeds)
    for got, ref in zip(one.reference, plain):
        assert got.keys() == ref.keys()
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
    assert one.profile.outputs == one.reference


def test_profile_of_extra_samples_adds_to_the_first_runs(nafnet):
    model, feeds = nafnet
    feeds3 = feeds + [demo_inputs(model, seed=2)]
    one = diagnose(model, feeds3[:1], None, profile_feeds=feeds3[1:])
    assert _ranges(one.profile) == _ranges(profile_ranges(model, feeds3))
    assert len(one.profile.outputs) == 3 and len(one.reference) == 1


def test_first_diagnosis_sites_match_a_diagnosis_on_a_separate_profile(nafnet):
    model, feeds = nafnet
    one = diagnose(model, feeds, None)
    two = diagnose(model, feeds, profile_ranges(model, feeds))
    assert [(s.tensor, s.kind) for s in one.sites] == [(s.tensor, s.kind) for s in two.sites]
    assert len(one.sites) > 0  # the demo overflows (its CumSums)
    for a, b in zip(one.errors, two.errors):
        assert a.tensor == b.tensor and a.nonfinite == b.nonfinite
        assert a.rel_error == b.rel_error or math.isclose(a.rel_error, b.rel_error, rel_tol=1e-9)


def test_sampled_errors_estimate_the_exact_ones(monkeypatch):
    model = build_nafnet(height=128, width=128, channels=8, blocks=2)  # in range: finite errors everywhere
    feeds = [demo_inputs(model)]
    sampled = error_run(model, feeds[:1], shadow_ranges=())
    monkeypatch.setattr(shadow_errors, "SAMPLE", 1 << 40)
    exact = error_run(model, feeds[:1], shadow_ranges=())
    assert any(e.sampled for e in sampled.errors) and not any(e.sampled for e in exact.errors)
    compared = 0
    for s, e in zip(sampled.errors, exact.errors):
        assert s.tensor == e.tensor and s.nonfinite == e.nonfinite  # non-finiteness stays exact
        if s.sampled and math.isfinite(e.rel_error) and e.rel_error > 1e-4:
            assert s.rel_error == pytest.approx(e.rel_error, rel=0.1)
            compared += 1
    assert compared > 20


def test_a_single_inf_in_a_large_tensor_is_found():
    """The sample misses it; the exact non-finiteness sum does not."""
    n = 1 << 18
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"], name="mul"), helper.make_node("Relu", ["y"], ["z"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).uniform(0, 1, (1, n)).astype(np.float32)
    x[0, 12345] = 40000.0  # fits FP16; twice it does not
    run = error_run(model, [{"x": x}])
    by = {e.tensor: e for e in run.errors}
    assert by["y"].sampled and by["y"].nonfinite and math.isinf(by["y"].rel_error)
    assert check_fp16(model, [{"x": x}]).outputs[0].inf == 1


def test_check_without_reference_uses_the_twin(nafnet):
    model, feeds = nafnet
    own = check_fp16(model, feeds)
    given = check_fp16(model, feeds, run_model(model, feeds))
    assert own.passed == given.passed and own.failing_tensors == given.failing_tensors
    for a, b in zip(own.outputs, given.outputs):
        assert (a.nan, a.inf, a.max_abs_error, a.rel_l2, a.reference_absmax) == \
               (b.nan, b.inf, b.max_abs_error, b.rel_l2, b.reference_absmax)


def test_screened_check_reports_as_the_full_check(nafnet):
    model, feeds = nafnet
    ref = run_model(model, feeds)
    full = check_fp16(model, feeds, ref)  # overflows: the screen fails and the full statistics report
    screened = check_fp16(model, feeds, ref, screen=True)
    assert not full.passed and full.failing_tensors > 0
    assert (screened.passed, screened.failing_tensors, screened.first_failures) == \
           (full.passed, full.failing_tensors, full.first_failures)
    quick = check_fp16(model, feeds, ref, screen=True, exact_findings=False)
    assert not quick.passed and quick.failing_tensors > 0
    small = build_nafnet(height=64, width=64, channels=8, blocks=1)  # in range: the screen is the answer
    small_feeds = [demo_inputs(small)]
    small_ref = run_model(small, small_feeds)
    a, b = check_fp16(small, small_feeds, small_ref), check_fp16(small, small_feeds, small_ref, screen=True)
    assert a.passed and b.passed and a.failing_tensors == b.failing_tensors == 0
    assert [o.rel_l2 for o in a.outputs] == [o.rel_l2 for o in b.outputs]


def test_declared_value_changes_refresh_the_profile_as_signatures_do(nafnet):
    """rescale-accumulation names the tensors it scales (PassResult.values_changed); the
    candidate's diagnosis then re-measures only those (and new tensors), with the same profile
    and sites as when every tensor downstream of the rewrite is re-measured."""
    from onnx_fp16_rewrite.passes.rescale_accumulation import RescaleAccumulation
    from onnx_fp16_rewrite.pipeline.pass_manager import PassManager

    model, feeds = nafnet
    first = diagnose(model, feeds, None)
    manager = PassManager([RescaleAccumulation()], feeds, initial_absmax=first.profile.absmax(),
                          reference=first.reference)
    candidate, report = manager.run(model)
    changed = report.passes[0].values_changed
    assert report.passes[0].status == "kept" and changed
    assert len(changed) < len(candidate.graph.node) / 4  # the chains only, not everything downstream
    declared = diagnose(candidate, feeds, first.profile, refresh_profile=True, previous=first, changed=changed)
    signed = diagnose(candidate, feeds, first.profile, refresh_profile=True, previous=first)
    assert _ranges(declared.profile) == _ranges(signed.profile)
    assert [(s.tensor, s.kind) for s in declared.sites] == [(s.tensor, s.kind) for s in signed.sites]


@pytest.mark.parametrize("name", ["nafnet", "t5", "gpt2"])
def test_ops_exact_in_fp16_need_no_rounding(name, monkeypatch):
    """Leaving out the rounding Casts after value-moving ops (Reshape, Slice, Max, ...) changes
    no bit of the emulation: outputs, statistics and errors are identical without it."""
    from onnx_fp16_rewrite.emulation import fp16_emulation
    from onnx_fp16_rewrite.models import gpt2_attention, t5_encoder

    model = {"nafnet": DEMO_MODELS["nafnet"], "t5": t5_encoder.build_t5_encoder,
             "gpt2": gpt2_attention.build_gpt2_attention}[name]()
    mod = {"nafnet": None, "t5": t5_encoder, "gpt2": gpt2_attention}[name]
    feeds = [(mod.demo_inputs if mod else demo_inputs)(model)]
    ref = run_model(model, feeds)
    fast = check_fp16(model, feeds, ref)
    fast_errors = error_run(model, feeds, shadow_ranges=None)
    fast_nodes = len(fp16_emulation.build_emulation(model).model.graph.node)
    monkeypatch.setattr(fp16_emulation, "EXACT_IN_FP16", frozenset())
    assert fast_nodes < len(fp16_emulation.build_emulation(model).model.graph.node)  # Casts left out
    slow = check_fp16(model, feeds, ref)
    slow_errors = error_run(model, feeds, shadow_ranges=None)
    assert fast == slow or (fast.outputs == slow.outputs and fast.first_failures == slow.first_failures
                            and fast.failing_tensors == slow.failing_tensors)
    assert [(e.tensor, e.rel_error, e.nonfinite, e.fp32_absmax) for e in fast_errors.errors] == \
           [(e.tensor, e.rel_error, e.nonfinite, e.fp32_absmax) for e in slow_errors.errors]
    assert all(np.array_equal(a[k], b[k], equal_nan=True)
               for a, b in zip(fast_errors.outputs, slow_errors.outputs) for k in a)


def test_check_of_unnamed_nodes_uses_the_twin_too():
    """Unnamed nodes get unnamed twins (ONNX allows many; a twin each named '__fp32' did not)."""
    g = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("CumSum", ["y", "axis"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4096])],
        [numpy_helper.from_array(np.array(40.0, np.float32), "k"), numpy_helper.from_array(np.array(1), "axis")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": np.random.default_rng(1).uniform(0, 1, (1, 4096)).astype(np.float32)}]
    own, given = check_fp16(model, feeds), check_fp16(model, feeds, run_model(model, feeds))
    assert not own.passed and own.outputs[0].inf > 0  # the prefix sum of ~20s overflows FP16
    assert (own.outputs, own.failing_tensors, own.first_failures) == \
           (given.outputs, given.failing_tensors, given.first_failures)
