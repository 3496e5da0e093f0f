"""Cut-out judges inside the candidate's diagnosis run: judge_cutouts' scores, fix --auto's answers."""

import math

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.analysis import auto_fix as auto_fix_module
from onnx_fp16_rewrite.analysis import cutout_judge
from onnx_fp16_rewrite.analysis.auto_fix import auto_fix
from onnx_fp16_rewrite.analysis.cutout_judge import judge_with_l1
from onnx_fp16_rewrite.analysis.embedded_judges import EmbeddedJudges
from onnx_fp16_rewrite.emulation.error_attribution import error_run
from onnx_fp16_rewrite.models import build_cumsum_chain, build_integral_box_filter, build_nafnet
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.passes.rescale_accumulation import RescaleAccumulation
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager


def _two_chains():
    """A chain the judge passes (a long prefix sum, then / n) beside one it refuses (an integral
    image's 3x3 box sums cancel ~1e4-sized FP16 values), as one model."""
    good = onnx.compose.add_prefix(build_cumsum_chain(length=4096, scale=64.0), "good/")
    bad = onnx.compose.add_prefix(build_integral_box_filter(size=256, channels=4, window=3), "bad/")
    good.ir_version = bad.ir_version = max(good.ir_version, bad.ir_version)
    return onnx.compose.merge_models(good, bad, io_map=[])


def _feeds(model, n=1):
    return [demo_inputs(model, seed=s) for s in range(n)]


def _asked(model, feeds):
    """What rescale-accumulation asks its judge (the model, cut-outs, thresholds), and the
    candidate it rewrites when every site passes."""
    asked = []

    def trusting(m, cutouts, below):
        asked.append((m, cutouts, below))
        return {c.key: (math.nan, 0.0) for c in cutouts}, {k: (1.0, 0.0) for k in below}

    candidate, _ = PassManager([RescaleAccumulation()], feeds, judge=trusting).run(model)
    return (*asked[0], candidate)


@pytest.mark.parametrize("case", ["nafnet", "nafnet-2-samples", "two-chains"])
def test_embedded_scores_are_the_streamed_judges(case):
    """Embedded in the trusting candidate's diagnosis (fed from its FP32 twin), every cut-out
    scores what judge_cutouts gives on the original model (its own FP32 run): float32 row sums
    against float64 dot products, so equal to 1e-5 relative, inf where it is inf; the L1 sums
    of the underflow share to 1e-6."""
    model = _two_chains() if case == "two-chains" else build_nafnet()
    feeds = _feeds(model, 2 if case == "nafnet-2-samples" else 1)
    original, cutouts, below, candidate = _asked(model, feeds)
    assert len(cutouts) >= 2
    want_scores, want_l1 = judge_with_l1(original, cutouts, feeds, below)
    judges = EmbeddedJudges(original, cutouts, below)
    got_scores, got_l1 = error_run(candidate, feeds, judges=judges).judged
    assert set(got_scores) == set(want_scores) == set(got_l1) == set(below)
    for key, want in want_scores.items():
        for g, w in zip(got_scores[key], want):
            assert (g == w == math.inf) or math.isclose(g, w, rel_tol=1e-5, abs_tol=1e-12), (key, g, w)
        assert np.allclose(got_l1[key], want_l1[key], rtol=1e-6, atol=0), (key, got_l1[key], want_l1[key])
    worst = [after for _, after in want_scores.values()]
    if case == "two-chains":  # one chain passes the judge, one fails it: both kinds are compared
        assert min(worst) < 1e-3 and max(worst) > 1e-2
    else:
        assert any(before == math.inf for before, _ in want_scores.values()) and max(worst) < 1e-2


def _answer(report):
    return (report.passes_kept, report.fp32_nodes, sorted((s.tensor, s.fix, tuple(s.pinned_nodes)) for s in report.sites),
            [(r.name, r.status, [(s.node, s.detail) for s in r.rewritten], [(s.node, s.detail) for s in r.skipped])
             for r in report.rewrites_tried], [(o.name, o.rel_l2, o.nan, o.inf) for o in report.after.outputs])


@pytest.mark.parametrize("case", ["nafnet", "two-chains"])
def test_auto_fix_gives_the_answer_of_judging_apart(monkeypatch, case):
    """fix --auto with the judges inside the candidate's diagnosis gives what judging every cut-out
    in its own runs gives (the same kept rewrites, sites, pinned nodes, messages, verdict). On
    NAFNet every chain passes: no FP32 run for the judges and no diagnosis more. With one chain
    refused, the pass's second run rewrites less than the trusting one: its candidate gets a
    diagnosis of its own (one emulation run more than judging apart)."""
    model = _two_chains() if case == "two-chains" else build_nafnet()
    feeds = _feeds(model)
    rewrites = [RescaleAccumulation()]
    fetched = []
    real_fetcher = cutout_judge._Fetcher

    class CountingFetcher(real_fetcher):
        def __init__(self, *args):
            fetched.append(1)
            super().__init__(*args)

    monkeypatch.setattr(cutout_judge, "_Fetcher", CountingFetcher)
    _, inside = auto_fix(model, feeds, rewrites=rewrites)
    assert fetched == []  # no FP32 run of the judges' own
    assert inside.passes_kept == ["rescale-accumulation"]

    def refuse(*args):
        raise ValueError("judged apart")

    monkeypatch.setattr(auto_fix_module, "EmbeddedJudges", refuse, raising=False)
    monkeypatch.setattr("onnx_fp16_rewrite.analysis.embedded_judges.EmbeddedJudges", refuse)
    _, apart = auto_fix(model, feeds, rewrites=rewrites)
    assert fetched == [1]
    assert _answer(inside) == _answer(apart)
    skipped = [s for r in inside.rewrites_tried for s in r.skipped]
    if case == "two-chains":
        assert any("still wrong" in s.detail for s in skipped)
        assert inside.emulation_runs == apart.emulation_runs + 1
    else:
        assert skipped == [] and inside.emulation_runs == apart.emulation_runs
