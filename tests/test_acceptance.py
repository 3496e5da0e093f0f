"""Issue-level acceptance checks that cut across modules (NAFNet demo, ORT's blind spot)."""

import numpy as np
import onnx

from onnx_fp16_rewrite.models import DEMO_MODELS
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.passes import ProtectFp32
from onnx_fp16_rewrite.fix import EXIT_ROLLED_BACK, fix_model
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.emit.mixed_precision import to_mixed_precision
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_base import Pass
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan


def test_onnxruntime_fp16_misses_the_residual_overflow_that_check_flags():
    model = DEMO_MODELS["residual-groupnorm"]()
    feed = demo_inputs(model)
    ref = run_model(model, [feed])[0]["output"]
    fp16_model, _ = to_mixed_precision(model, PrecisionPlan())  # everything FP16
    ort_out = run_model(fp16_model, [{"input": feed["input"].astype(np.float16)}])[0]["output"]
    # ORT's own FP16 run: no NaN, 4e-4 error -- it computed the FP16 chain in FP32.
    assert np.isfinite(ort_out).all()
    assert np.linalg.norm(ort_out - ref) / np.linalg.norm(ref) < 1e-2
    report = check_fp16(fp16_model, [feed], [{"output": ref}])
    assert not report.passed and report.outputs[0].nan == ref.size  # GroupNorm of inf: all NaN
    first = report.first_failures[0]
    assert (first.node, first.kind) == ("/block/Add", "overflow") and 65504 < first.absmax < 2e5


class BrokenPass(Pass):
    name = "broken"
    summary = "deliberately broken: deletes the first sca Conv's weights then raises"

    def run(self, graph, ctx):
        conv = next(n for n in graph.nodes if n.op == "Conv" and "sca" in n.name)
        conv.inputs.clear()
        raise ValueError("deliberate failure")


def test_broken_pass_rolled_back_output_still_valid_and_verified():
    model = DEMO_MODELS["nafnet"]()
    result = fix_model(model, [BrokenPass(), ProtectFp32(match="sca")], [demo_inputs(model)], emit="mixed")
    rep = result.report
    broken, protect = rep.passes.passes
    assert broken.status == "rolled-back" and "broken failed: ValueError: deliberate failure" in broken.error
    assert protect.status == "kept"
    assert rep.exit_code == EXIT_ROLLED_BACK
    onnx.checker.check_model(result.model, full_check=True)
    assert rep.fp16_after.passed and rep.fp16_after.outputs[0].rel_l2 <= 1e-2
