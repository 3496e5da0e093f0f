"""prescale-attention on torch exports: a scale computed from constants (``torch.full([], v.size(-1) ** 0.5)``),
a fill constant shared by two Where (dynamo), head size 32 (1/sqrt(32) is not a power of two)."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import meaning_exports as me
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.models.gpt2_attention import build_gpt2_attention, demo_inputs
from onnx_fp16_rewrite.passes.prescale_attention import PrescaleAttention
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

pytest.importorskip("torch")

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_computed_scale_is_folded_and_moved(dynamo):
    model, feeds = me.build("computed_scale_attention", dynamo=dynamo), me.feeds("computed_scale_attention")
    div = next(n for n in gs.import_onnx(model).nodes if n.op == "Div" and n.inputs[0].inputs
               and n.inputs[0].inputs[0].op == "MatMul")
    if not dynamo:  # TorchScript: ConstantOfShape + Pow(64, 0.5); dynamo folds it into an initializer itself
        assert div.inputs[1].inputs and div.inputs[1].inputs[0].op == "Add"
    reference = run_model(model, feeds)
    result = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=auto_rewrites())
    report = result.report
    assert report.auto.passes_kept == ["prescale-attention"]
    assert report.auto.fp32_nodes == 0 and report.fp16_flop_fraction >= 0.99
    assert report.fp16_after.passed and report.fp16_after.outputs[0].nan == 0
    record = next(r for r in report.auto.rewrites_tried if r.name == "prescale-attention")
    assert any("q by Div 8): exact (power of two)" in s.detail for s in record.rewritten)
    for r, g in zip(reference, run_model(result.model, feeds)):
        assert np.array_equal(r["y"], g["y"])
    pin_only = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=[]).report
    assert pin_only.auto.fp32_nodes >= 2


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_shared_fill_gets_one_uniquely_named_copy_per_where(dynamo):
    model, feeds = me.build("masked_attention", dynamo=dynamo), me.feeds("masked_attention")
    fixed, report = PassManager([PrescaleAttention()], feeds).run(model)
    assert report.passes[0].status == "kept"
    fills = [n.input[2] for n in fixed.graph.node if n.op_type == "Where"]
    assert len(fills) == 2 and len(set(fills)) == 2
    names = [n.name for n in fixed.graph.node]
    assert len(names) == len(set(names))
    produced = [o for n in fixed.graph.node for o in n.output] + [i.name for i in fixed.graph.initializer]
    assert len(produced) == len(set(produced))
    for r, g in zip(run_model(model, feeds), run_model(fixed, feeds)):
        assert np.array_equal(r["y"], g["y"])


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_control_fine_in_fp16_gets_no_rewrite_and_no_pin(dynamo):
    model, feeds = me.build("masked_attention", dynamo=dynamo), me.feeds("masked_attention")
    assert check_fp16(model, feeds).passed
    report = fix_model(model, [], feeds, emit="fp32", auto=True, auto_rewrites=auto_rewrites()).report
    assert report.auto.fp32_nodes == 0 and report.auto.passes_kept == [] and report.auto.rewrites_tried == []
    assert report.fp16_flop_fraction == 1.0


def test_head_size_32_moves_the_power_of_two_part_bit_exactly():
    model = build_gpt2_attention(hidden=128, heads=4)   # head size 32: 1/sqrt(32) = 2^-3 * 1.414
    feeds = [demo_inputs(model, seed=s) for s in (0, 1)]
    fixed, report = PassManager([PrescaleAttention()], feeds).run(model)
    record = report.passes[0]
    assert record.status == "kept"
    assert "q by 2^-3; Div 0.707107 stays after it" in record.rewritten[0].detail and record.rewritten[0].detail.endswith(": exact")
    for r, g in zip(run_model(model, feeds), run_model(fixed, feeds)):
        for name in r:
            assert np.array_equal(r[name], g[name])
    assert check_fp16(fixed, feeds).passed
    _, whole = PassManager([PrescaleAttention(full_move=True)], feeds).run(model)
    assert "rounding-level" in whole.passes[0].rewritten[0].detail
