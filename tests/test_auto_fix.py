"""fix --auto on every failure pattern, with no hand-given pattern."""

import numpy as np
import pytest

from onnx_fp16_rewrite.models import DEMO_MODELS, failure_patterns
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.analysis.auto_fix import auto_fix
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

PATTERNS = {
    # name: (builder, kind of the first site, op of the first site)
    "integral-1024": (lambda: failure_patterns.build_integral_mean(size=1024), "overflow", "CumSum"),
    "integral-224": (lambda: failure_patterns.build_integral_mean(size=224), "cancellation", "Sub"),
    "rmsnorm-pow": (failure_patterns.build_rmsnorm_pow, "overflow", "Pow"),
    "attention-logits": (failure_patterns.build_attention_logits, "overflow", "MatMul"),
    "causal-linear-attention": (failure_patterns.build_causal_linear_attention, "overflow", "MatMul"),
    "residual-groupnorm": (lambda: (m := DEMO_MODELS["residual-groupnorm"](), [demo_inputs(m)]), "overflow", "Add"),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_auto_fixes_each_pattern(name):
    build, kind, op = PATTERNS[name]
    model, feeds = build()
    before = check_fp16(model, feeds)
    assert not before.passed  # the all-FP16 model fails
    fixed, report = auto_fix(model, feeds)
    assert report.passed
    first = report.sites[0]
    assert (first.kind, first.op, first.fix) == (kind, op, "fp32-region")
    after = check_fp16(fixed, feeds)  # the plan stored in the model
    out = after.outputs[0]
    assert out.nan == 0 and out.inf == 0 and out.rel_l2 <= 1e-2
    # Minimal: a strict subset of the graph stays FP32.
    assert 0 < report.fp32_nodes < len(model.graph.node)
    assert report.profiling_runs == len(feeds)  # one FP32 profiling run per sample
    assert report.emulation_runs <= 8


def test_integral_224_is_precision_only():
    model, feeds = failure_patterns.build_integral_mean(size=224)
    before = check_fp16(model, feeds)
    # Nothing overflows (integral < 65504) yet FP16's spacing costs 3.7% of the window means.
    assert before.failing_tensors == 0 and before.outputs[0].inf == 0
    assert before.outputs[0].rel_l2 > 1e-2


def test_masked_log_and_finfo_min_are_not_sites():
    model, feeds = failure_patterns.build_masked_sentinels()
    fixed, report = auto_fix(model, feeds)
    assert report.passed and report.sites == [] and report.fp32_nodes == 0


def test_nafnet_auto_beats_pinning_sca():
    model = DEMO_MODELS["nafnet"]()
    feeds = [demo_inputs(model)]
    result = fix_model(model, [], feeds, auto=True, auto_rewrites=())  # pinning only (the default tries the rewrites)
    rep = result.report
    assert rep.exit_code == 0
    out = rep.fp16_after.outputs[0]
    assert out.nan == 0 and out.inf == 0 and out.rel_l2 <= 1e-2
    sca_nodes = [n.name for n in model.graph.node if "sca" in n.name]
    pinned = PrecisionPlan.from_model(result.model).fp32_nodes
    assert len(pinned) < len(sca_nodes)  # 20 < 26
    assert [s.op for s in rep.auto.sites] == ["CumSum", "CumSum"]
    assert all("/sca/" in s.node and s.back_in_range.endswith("Div_output_0") for s in rep.auto.sites)
    assert rep.auto.profiling_runs == 1 and rep.auto.emulation_runs <= 6
    assert np.isfinite(out.max_abs_error)


def test_box_filter_pins_no_more_than_autocast():
    """ModelOpt AutoCast with calibration pins 9 of these 12 nodes (shared notes); so do we, and
    the W-direction CumSum (in range at 570) is pinned only because its FP16 rounding is what
    the box sum cancels down to."""
    model = DEMO_MODELS["box-filter"]()
    fixed, report = auto_fix(model, [demo_inputs(model)])
    assert report.passed and report.fp32_nodes == 9
    assert [(s.kind, s.op) for s in report.sites] == [("overflow", "CumSum"), ("cancellation", "Add")]
    pinned = PrecisionPlan.from_model(fixed).fp32_nodes
    assert "/box/CumSum" in pinned and "/box/Div" not in pinned and "/head/Conv" not in pinned


REWRITE_MODELS = {
    # module: (builder, the rewrite --auto must choose for the first site, FP16 FLOP fraction at least)
    "gpt2_attention": ("build_gpt2_attention", "prescale-attention", 1.0),
    "sd_vae_decoder": ("build_sd_vae_decoder", "rescale-residual", 1.0),
    "t5_encoder": ("build_t5_encoder", "rescale-residual", 0.99),
}


@pytest.mark.parametrize("name", REWRITE_MODELS)
def test_auto_prefers_rewrites_over_pinning(name):
    import importlib

    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

    module = importlib.import_module(f"onnx_fp16_rewrite.models.{name}")
    builder, expected, min_fraction = REWRITE_MODELS[name]
    model = getattr(module, builder)()
    feeds = [module.demo_inputs(model)]
    rep = fix_model(model, [], feeds, auto=True, auto_rewrites=auto_rewrites()).report
    assert rep.fp16_before.outputs[0].nan > 0
    assert rep.exit_code == 0
    out = rep.fp16_after.outputs[0]
    assert out.nan == 0 and out.inf == 0 and out.rel_l2 <= 1e-2
    assert rep.auto.sites[0].fix == f"pass:{expected}" and expected in rep.auto.passes_kept
    # Every kept rewrite held its FP32 validation (rtol 1e-5 / atol 1e-5).
    kept = [r for r in rep.auto.rewrites_tried if r.status == "kept"]
    assert kept and all(r.validation.ok for r in kept)
    assert rep.fp16_flop_fraction >= min_fraction
