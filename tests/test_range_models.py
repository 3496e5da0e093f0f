"""T5 encoder, GPT-2 attention and SD-VAE decoder: valid exports that NaN in FP16, fixed exactly by the range passes.

For each model: it fails the FP16 emulation with nothing pinned (NaN counted); after the passes it has no NaN/Inf
and relative L2 <= 1e-2 with nothing pinned (100% of FLOPs in FP16), where protect-fp32 has to pin regions.
"""

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.models import gpt2_attention, sd_vae_decoder, t5_encoder
from onnx_fp16_rewrite.passes import ProtectFp32
from onnx_fp16_rewrite.passes.fuse_normalization import FuseNormalization
from onnx_fp16_rewrite.passes.prescale_attention import PrescaleAttention
from onnx_fp16_rewrite.passes.rescale_residual import RescaleResidual
from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.model_io import check_model
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

MODELS = {
    "t5": (t5_encoder.build_t5_encoder, t5_encoder.demo_inputs),
    "gpt2": (gpt2_attention.build_gpt2_attention, gpt2_attention.demo_inputs),
    "vae": (sd_vae_decoder.build_sd_vae_decoder, sd_vae_decoder.demo_inputs),
}
# Exact pipelines (power-of-two and scale moves only): FP32 outputs must be bit-identical.
EXACT = {
    "t5": lambda: [RescaleResidual()],  # it pre-scales the final RMSNorm's square itself (fuse-normalization's job before)
    "gpt2": lambda: [PrescaleAttention()],
    "vae": lambda: [RescaleResidual()],
}
# NaN in the original's FP16 emulation (2 feeds): T5 -- one per token whose stream overflowed (inf * 0 in the final
# RMSNorm); GPT-2 -- the BOS row (inf - inf in the softmax), 2 x 128; VAE -- every output pixel after the up block.
NAN_BEFORE = {"t5": 24, "gpt2": 256, "vae": 2 * 3 * 16 * 16}
# FP16 share of FLOPs when protect-fp32 pins the nodes where the overflows start (found by the FP16 check) and
# grows its region on measured ranges, as a user would from the check's report.
PROTECT_FRACTION = {"t5": 0.899, "gpt2": 0.970, "vae": 0.417}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, inputs = MODELS[request.param]
    model = build()
    feeds = [inputs(model, seed=s) for s in (0, 1)]
    return request.param, model, feeds


def test_builders_export_valid_deterministic_models(case):
    name, model, feeds = case
    check_model(model, name, strict_shapes=True)
    assert model.SerializeToString() == MODELS[name][0]().SerializeToString()
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == len(names) and all(n.startswith("/") for n in names)
    out = run_model(model, feeds)[0]
    assert all(np.isfinite(v).all() for v in out.values())


def adversarial(name, model):
    """Inputs beyond the calibration set: random, degenerate (constant / zero) and out-of-range."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(99)
    if name == "t5":  # one token repeated (the rare one, the tiny one), random ids
        return [{"input_ids": np.full(dims, v, np.int64)} for v in (63, 1, 0)] + \
               [{"input_ids": rng.integers(0, 64, dims).astype(np.int64)}]
    key = model.graph.input[0].name
    if name == "gpt2":
        return [{key: rng.standard_normal(dims).astype(np.float32)}, {key: np.zeros(dims, np.float32)},
                gpt2_attention.demo_inputs(model, seed=7, massive=6000.0)]
    return [{key: np.zeros(dims, np.float32)}, {key: np.full(dims, 3.0, np.float32)},
            {key: (rng.standard_normal(dims) * 4).astype(np.float32)}]


def overflow_origins(model, feeds):
    """Nodes whose output overflows FP16 while none of their inputs does: where the overflows start."""
    report = check_fp16(model, feeds, max_findings=10**6)
    over = {f.node for f in report.first_failures if f.kind == "overflow"}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node if n.name in over and not any(producer.get(i) in over for i in n.input)]


def test_exact_passes_fix_fp16_with_nothing_pinned(case):
    name, model, feeds = case
    reference = run_model(model, feeds)
    before = check_fp16(model, feeds, reference)
    assert not before.passed and before.outputs[0].nan == NAN_BEFORE[name]
    fixed, report = PassManager(EXACT[name](), feeds).run(model)
    assert [p.status for p in report.passes] == ["kept"] * len(report.passes)
    extra = adversarial(name, model)
    for a, b in zip(run_model(model, feeds + extra), run_model(fixed, feeds + extra)):
        assert np.array_equal(a[model.graph.output[0].name], b[model.graph.output[0].name])
    after = check_fp16(fixed, feeds, reference)
    assert after.outputs[0].nan == 0 and after.outputs[0].inf == 0
    assert after.passed and after.outputs[0].rel_l2 <= 1e-2
    assert after.fp32_nodes == 0 and fp16_flop_fraction(fixed) == 1.0
    protected, _ = PassManager([ProtectFp32(op_types=(), nodes=overflow_origins(model, feeds))], feeds).run(model)
    assert len(PrecisionPlan.from_model(protected)) > 0
    assert fp16_flop_fraction(protected) == pytest.approx(PROTECT_FRACTION[name], abs=5e-3)
    assert check_fp16(protected, feeds, reference).passed


def test_t5_fused_rms_norm_with_opset_23():
    model = t5_encoder.build_t5_encoder()
    feeds = [t5_encoder.demo_inputs(model, seed=s) for s in (0, 1)]
    fixed, report = PassManager([RescaleResidual(), FuseNormalization(opset=23)], feeds).run(model)
    assert [p.status for p in report.passes] == ["kept", "kept"]  # fusion: within rtol 1e-5
    ops = [n.op_type for n in fixed.graph.node]
    assert ops.count("RMSNormalization") == 5 and "Pow" in ops  # the GELU's Pow(x, 3) stays
    after = check_fp16(fixed, feeds, run_model(model, feeds))
    assert after.passed and after.outputs[0].nan == 0


def test_t5_refuses_rescale_after_dynamic_prescale():
    """The per-row pre-scale reads the stream through Abs/ReduceMax/Clip/Log: not scale invariant, so
    rescale-residual must run first (fuse-normalization then measures the rescaled ranges)."""
    model = t5_encoder.build_t5_encoder()
    feeds = [t5_encoder.demo_inputs(model)]
    _, report = PassManager([FuseNormalization(), RescaleResidual()], feeds).run(model)
    assert report.passes[1].status == "unchanged"
    # Through Abs/ReduceMax/Clip it reaches the row's Log, which would absorb it, but the pre-scale's eps * inv**2
    # would then sink into FP16 subnormals.
    assert any("/prescale" in s.detail and ("not scale invariant" in s.detail or "subnormals" in s.detail)
               for s in report.passes[1].skipped)


def test_gpt2_decomposed_layer_norm_and_softmax_at_opset_14():
    model = gpt2_attention.build_gpt2_attention(layer_norm="decomposed", softmax="decomposed", opset=14)
    feeds = [gpt2_attention.demo_inputs(model, seed=s) for s in (0, 1)]
    reference = run_model(model, feeds)
    assert not check_fp16(model, feeds, reference).passed  # ln_1's Pow overflows (and hides the logits')
    fixed, report = PassManager([FuseNormalization(), PrescaleAttention()], feeds).run(model)
    assert [p.status for p in report.passes] == ["kept", "kept"]
    assert "needs opset 17, the model has 14" in report.passes[0].rewritten[0].detail
    after = check_fp16(fixed, feeds, reference)
    assert after.passed and after.outputs[0].rel_l2 < 1e-3


def test_vae_fused_group_norm_and_upsample_option():
    model = sd_vae_decoder.build_sd_vae_decoder(upsample=False, latent_size=4)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 3, 4, 4]
    model = sd_vae_decoder.build_sd_vae_decoder()
    feeds = [sd_vae_decoder.demo_inputs(model)]
    fixed, report = PassManager([FuseNormalization(opset=21), RescaleResidual()], feeds).run(model)
    assert [p.status for p in report.passes] == ["kept", "kept"]
    assert sum(n.op_type == "GroupNormalization" for n in fixed.graph.node) == 10  # 4 resnets x 2, attention, norm_out
    assert fixed.opset_import[0].version == 21 and isinstance(fixed, onnx.ModelProto)
    assert check_fp16(fixed, feeds, run_model(model, feeds)).passed
