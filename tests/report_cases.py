"""Test models and their fixes, built once per test session for the report tests (test_report_*.py,
test_diff.py): the fixes of the NAFNet demo take tens of seconds, and four test files read them."""

from __future__ import annotations

from functools import lru_cache

from onnx_fp16_rewrite.fix import FixResult, fix_model
from onnx_fp16_rewrite.models import DEMO_MODELS, gpt2_attention, sd_vae_decoder, t5_encoder
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.passes import ProtectFp32
from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

# Every test model: the CLI's demos and the three range models.
BUILDERS = {
    **{name: (build, demo_inputs) for name, build in DEMO_MODELS.items()},
    "t5": (t5_encoder.build_t5_encoder, t5_encoder.demo_inputs),
    "gpt2": (gpt2_attention.build_gpt2_attention, gpt2_attention.demo_inputs),
    "vae": (sd_vae_decoder.build_sd_vae_decoder, sd_vae_decoder.demo_inputs),
}
NAMES = list(BUILDERS)


@lru_cache(maxsize=None)
def case(name: str):
    build, inputs = BUILDERS[name]
    model = build()
    return model, [inputs(model)]


@lru_cache(maxsize=None)
def fixed(name: str, how: str, emit: str = "fp32") -> FixResult:
    """``how``: "pass" (protect-fp32: CumSums on every model, the sca blocks on NAFNet), "auto"
    (the automatic fix with its rewrites) or "pin" (the automatic fix, pinning only)."""
    model, feeds = case(name)
    if how == "pass":
        passes = [ProtectFp32(match="sca")] if name == "nafnet" else [ProtectFp32()]
        return fix_model(model, passes, feeds, emit=emit)
    rewrites = auto_rewrites() if how == "auto" else ()
    return fix_model(model, [], feeds, emit=emit, auto=True, auto_rewrites=rewrites)
