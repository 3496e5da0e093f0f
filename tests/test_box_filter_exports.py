"""box-filter on torch exports: F.pad pads computed by TorchScript (ConstantOfShape/Concat/Reshape/Slice/Transpose/
Cast, folded) and window corners sliced one axis at a time with shared first Slices (both exporters)."""

import numpy as np
import pytest

import meaning_exports as me
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

pytest.importorskip("torch")


@pytest.mark.parametrize("dynamo", [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")])
def test_exported_box_filter_runs_fp16_with_nothing_pinned(dynamo):
    model, feeds = me.build("box_filter", dynamo=dynamo), me.feeds("box_filter")
    reference = run_model(model, feeds)
    assert not check_fp16(model, feeds, reference).passed         # 64x64 integral image of 0..255: 5.2e5
    result = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=auto_rewrites())
    report = result.report
    assert "box-filter" in report.auto.passes_kept
    record = next(r for r in report.auto.rewrites_tried if r.name == "box-filter")
    assert "2-D 8x8 window sum" in record.rewritten[0].detail
    assert report.auto.fp32_nodes == 0 and report.fp16_flop_fraction >= 0.99
    assert report.fp16_after.passed and report.fp16_after.outputs[0].nan == 0
    assert report.fp16_after.outputs[0].rel_l2 < 1e-3
    for r, g in zip(reference, run_model(result.model, feeds)):
        np.testing.assert_allclose(g["y"], r["y"], rtol=1e-5, atol=1e-3)  # the original's 5e5-sized sums: 1e-3
    pin_only = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=[]).report
    assert pin_only.auto.fp32_nodes >= 8 and pin_only.fp16_flop_fraction < 0.5
