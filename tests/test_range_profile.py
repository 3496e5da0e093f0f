import numpy as np
import pytest

from conftest import parse_named
from models.failure_patterns import build_masked_sentinels
from rewrite.range_profile import FP16_MIN_NORMAL, profile_ranges

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
    assert r.p999 == pytest.approx(float(np.quantile(c, 0.999)), rel=1e-3)
    tiny = np.abs(x * np.float32(1e-6))
    expected = np.count_nonzero((tiny < FP16_MIN_NORMAL) & (tiny > 0)) / tiny.size
    assert prof.ranges["tiny"].subnormal_fraction == pytest.approx(expected)
    assert prof.runs == 1 and prof.batches == 1
    assert np.array_equal(prof.outputs[0]["y"], c + tiny)  # the FP32 reference rides along


def test_samples_aggregate():
    feeds = [{"x": np.full((1, 4096), v, np.float32)} for v in (1.0, 3.0)]
    prof = profile_ranges(MODEL, feeds)
    assert prof.ranges["c"].absmax == 3.0 * 4096
    assert prof.runs == 2 and len(prof.outputs) == 2


def test_memory_budget_splits_into_batches_with_same_result():
    x = np.random.default_rng(1).uniform(0, 1, (1, 4096)).astype(np.float32)
    whole = profile_ranges(MODEL, [{"x": x}])
    # 4096 floats are 16 KiB: a 20 KiB budget fits one tensor per run.
    split = profile_ranges(MODEL, [{"x": x}], memory_budget_mb=20 / 1024)
    assert split.batches == 3 and split.runs == 3
    assert {k: v.absmax for k, v in split.ranges.items()} == {k: v.absmax for k, v in whole.ranges.items()}


def test_masked_log_and_finfo_min_are_not_overflow():
    model, feeds = build_masked_sentinels()
    prof = profile_ranges(model, feeds)
    log = prof.ranges["/log/Log_output_0"]
    assert log.fp32_nonfinite and not log.overflows_fp16
    scores = prof.ranges["/attn/Add_output_0"]
    assert scores.sentinels == 120 and scores.absmax < 10  # 16*15/2 masked entries, absmax of the rest
