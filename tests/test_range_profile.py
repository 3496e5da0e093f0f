import numpy as np
import pytest

from conftest import WINDOW, parse_named
from onnx_fp16_rewrite.models.failure_patterns import build_masked_sentinels
from onnx_fp16_rewrite.analysis.range_profile import FP16_MAX, FP16_MIN_NORMAL, profile_absmax, profile_ranges

MODEL = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4096] x) => (float[1,4096] y) {
  k = Constant<value=float {1e-6}>()
  tiny = Mul(x, k)
  ax = Constant<value=int64 {1}>()
  c = CumSum(x, ax)
  y = Add(c, tiny)
}""")


def test_statistics_match_numpy():
    x = np.random.default_rng(0).uniform(0, 40, (1, 4096)).astype(np.float32)
    prof = profile_ranges(MODEL, [{"x": x}])
    c = np.cumsum(x, axis=1, dtype=np.float32)
    r = prof.ranges["c"]
    assert (r.node, r.op) == ("cumsum3", "CumSum")
    assert r.absmax == pytest.approx(float(c.max()), rel=1e-6) and r.overflows_fp16
    assert r.p999 == pytest.approx(float(np.quantile(c, 0.999)), rel=2e-3)  # from a 16384-value sample
    tiny = np.abs(x * np.float32(1e-6))
    expected = np.count_nonzero((tiny < FP16_MIN_NORMAL) & (tiny > 0)) / tiny.size
    assert prof.ranges["tiny"].subnormal_fraction == pytest.approx(expected, abs=0.02)
    assert prof.runs == 1
    assert np.array_equal(prof.outputs[0]["y"], c + tiny)  # the FP32 reference rides along


def test_samples_aggregate():
    feeds = [{"x": np.full((1, 4096), v, np.float32)} for v in (1.0, 3.0)]
    prof = profile_ranges(MODEL, feeds)
    assert prof.ranges["c"].absmax == 3.0 * 4096
    assert prof.runs == 2 and len(prof.outputs) == 2


def test_only_reductions_and_samples_leave_the_graph():
    """Memory stays that of one inference: besides the graph outputs, a run returns scalars
    and fixed-size samples, never a whole intermediate tensor."""
    from onnx_fp16_rewrite.analysis import range_profile

    x = np.random.default_rng(1).uniform(0, 1, (1, 4096)).astype(np.float32)
    seen = []
    real = range_profile.make_session

    def spy(model):
        session = real(model)
        seen.extend(o.name for o in model.graph.output)
        return session

    range_profile.make_session = spy
    try:
        prof = profile_ranges(MODEL, [{"x": x}])
    finally:
        range_profile.make_session = real
    extra = [n for n in seen if n != "y"]
    assert all(n.endswith(("_max", "_min", "_sum", "_sample")) for n in extra)
    assert len(extra) == 4 * len(prof.ranges)


def test_masked_log_and_finfo_min_are_not_overflow():
    model, feeds = build_masked_sentinels()
    prof = profile_ranges(model, feeds)
    log = prof.ranges["/log/Log_output_0"]
    assert log.fp32_nonfinite and not log.overflows_fp16
    scores = prof.ranges["/attn/Add_output_0"]
    # 120 of 256 entries are finfo.min (the causal mask); absmax is that of the rest.
    assert scores.sentinels > 0 and scores.absmax < 10


def test_profile_absmax_matches_numpy():
    model = parse_named(WINDOW)
    x = np.random.default_rng(2).uniform(0, 40, (1, 4096)).astype(np.float32)
    ranges = profile_absmax(model, [{"x": x}])
    c = np.cumsum(x, axis=1, dtype=np.float32)
    assert ranges["c"] == pytest.approx(float(c.max()), rel=1e-6)
    assert ranges["c"] > FP16_MAX
    assert ranges["y"] == pytest.approx(float(np.abs((c[:, 32:] - c[:, :4064]) / 32).max()), rel=1e-4)


def _every_sample_kept(monkeypatch):
    """range_profile with each tensor's whole samples kept (no runs_expected): the reference."""
    from onnx_fp16_rewrite.analysis import range_profile

    real = range_profile.ProfileAccumulator

    class KeepAll(real):
        def __init__(self, tensors, body=None, *, runs_expected=None):
            super().__init__(tensors, body)

    monkeypatch.setattr(range_profile, "ProfileAccumulator", KeepAll)
    from onnx_fp16_rewrite.emulation import error_attribution
    monkeypatch.setattr(error_attribution, "ProfileAccumulator", KeepAll)


@pytest.mark.parametrize("samples", [1, 3])
def test_kept_top_values_give_the_profile_of_every_sample(monkeypatch, samples):
    """The accumulator keeps of each tensor's samples only the count, the subnormal count and the
    top 0.1% + 2: percentiles, subnormal shares and sentinel absmax equal those from every sample
    kept, bit for bit (NAFNet, T5, GPT-2 with finfo.min masks; one sample and three; the
    profiling runs and the first diagnosis' shadow)."""
    from onnx_fp16_rewrite.analysis.diagnosis import diagnose
    from onnx_fp16_rewrite.models import gpt2_attention, nafnet, t5_encoder

    cases = [(nafnet.build_nafnet(height=64, width=64, channels=8, blocks=2), nafnet.demo_inputs),
             (t5_encoder.build_t5_encoder(), t5_encoder.demo_inputs),
             (gpt2_attention.build_gpt2_attention(), gpt2_attention.demo_inputs)]
    for model, inputs in cases:
        feeds = [inputs(model, seed=i) for i in range(samples)]
        trimmed = [profile_ranges(model, feeds).ranges,
                   diagnose(model, feeds[:1], None, profile_feeds=feeds[1:]).profile.ranges]
        with monkeypatch.context() as m:
            _every_sample_kept(m)
            full = [profile_ranges(model, feeds).ranges,
                    diagnose(model, feeds[:1], None, profile_feeds=feeds[1:]).profile.ranges]
        for got, want in zip(trimmed, full):
            assert got.keys() == want.keys() and len(got) > 20
            assert [vars(r) for r in got.values()] == [vars(r) for r in want.values()]
    assert any(r.sentinels for r in got.values())  # GPT-2's masks: sentinel absmax from the kept values
