"""fuse-normalization: fusions within FP32 tolerance, pre-scaling bit-exact (eps included), FP16 safe after."""

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.passes.fuse_normalization import FuseNormalization
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from tests.conftest import parse_named

RNG = np.random.default_rng(7)
GAMMA = ", ".join(f"{v:.3f}" for v in RNG.uniform(0.5, 1.5, 64))
BETA = ", ".join(f"{v:.3f}" for v in RNG.uniform(-0.5, 0.5, 64))


def layer_norm(opset: int, axes: str = "[-1]") -> onnx.ModelProto:
    """LayerNorm over the last axis as torch.onnx writes it below opset 17 (Pow, Div, Mul, Add)."""
    return parse_named(f"""<ir_version: 8, opset_import: ["" : {opset}]>
g (float[2,16,64] x) => (float[2,16,64] y) {{
  m = ReduceMean<axes={axes}>(x)
  d = Sub(x, m)
  two = Constant<value=float {{2.0}}>()
  p = Pow(d, two)
  v = ReduceMean<axes={axes}>(p)
  e = Constant<value=float {{1e-5}}>()
  ve = Add(v, e)
  s = Sqrt(ve)
  n = Div(d, s)
  gamma = Constant<value=float[64] {{{GAMMA}}}>()
  gn = Mul(n, gamma)
  beta = Constant<value=float[64] {{{BETA}}}>()
  y = Add(gn, beta)
}}""")


def rms_norm(opset: int) -> onnx.ModelProto:
    """T5LayerNorm: Pow, ReduceMean, Add(eps), Sqrt, Div(1, .), Mul(x, .), Mul(weight, .)."""
    return parse_named(f"""<ir_version: 8, opset_import: ["" : {opset}]>
g (float[2,16,64] x) => (float[2,16,64] y) {{
  two = Constant<value=float {{2.0}}>()
  p = Pow(x, two)
  v = ReduceMean<axes=[-1]>(p)
  e = Constant<value=float {{1e-6}}>()
  ve = Add(v, e)
  s = Sqrt(ve)
  one = Constant<value=float {{1.0}}>()
  r = Div(one, s)
  h = Mul(x, r)
  w = Constant<value=float[64] {{{GAMMA}}}>()
  y = Mul(w, h)
}}""")


def feeds_with_outliers(*, tiny: bool = False) -> list[dict[str, np.ndarray]]:
    """Rows of very different size: a 3000 outlier row (squares overflow FP16), ordinary rows, maybe a tiny row."""
    x = (RNG.standard_normal((2, 16, 64)) * 30).astype(np.float32)
    x[0, 0, 3] = 3000.0
    if tiny:
        x[1, 5] *= 1e-4
    return [{"x": x}]


def adversarial() -> list[dict[str, np.ndarray]]:
    """Zero rows, constant rows (LayerNorm variance 0: eps is all there is), subnormal-adjacent and huge values,
    six decades of dynamic range in one row."""
    x = RNG.standard_normal((2, 16, 64)).astype(np.float32)
    x[0, 0] = 0.0
    x[0, 1] = 1234.5
    x[0, 2] *= 1e-3
    x[0, 3] = 10.0 ** RNG.uniform(-3, 3, 64) * np.sign(RNG.standard_normal(64))
    x[1, 0] = RNG.standard_normal(64) * 2e4
    x[1, 1, 0] = 6e4
    return [{"x": x}] + feeds_with_outliers(tiny=True) + [{"x": RNG.uniform(0, 1, (2, 16, 64)).astype(np.float32)}]


def run_pass(model, pass_, feeds):
    fixed, report = PassManager([pass_], feeds).run(model)
    return fixed, report.passes[0]


def assert_bit_exact(a, b, feeds):
    for ra, rb in zip(run_model(a, feeds), run_model(b, feeds)):
        for name in ra:
            assert np.array_equal(ra[name], rb[name]), name


def test_layer_norm_fuses_at_opset_17():
    model, feeds = layer_norm(17), feeds_with_outliers()
    before = check_fp16(model, feeds)
    assert not before.passed and before.outputs[0].rel_l2 > 0.05  # the 3000 row's Pow overflowed
    fixed, record = run_pass(model, FuseNormalization(), feeds)
    assert record.status == "kept"  # validated within rtol 1e-5 / atol 1e-5 by the manager
    assert [n.op_type for n in fixed.graph.node if n.op_type != "Constant"] == ["LayerNormalization"]
    after = check_fp16(fixed, feeds)
    assert after.passed and after.outputs[0].rel_l2 < 1e-3


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_layer_norm_below_17_is_prescaled_bit_exact(mode):
    model, feeds = layer_norm(14), feeds_with_outliers()
    fixed, record = run_pass(model, FuseNormalization(prescale=mode), feeds)
    assert record.status == "kept" and len(record.rewritten) == 1
    assert "needs opset 17" in record.rewritten[0].detail and "exact in FP32" in record.rewritten[0].detail
    assert_bit_exact(model, fixed, adversarial())
    after = check_fp16(fixed, feeds)
    assert after.passed and after.outputs[0].nan == 0 and after.outputs[0].rel_l2 < 2e-3


def test_static_prescale_scales_eps_by_the_square_and_it_matters():
    model, feeds = layer_norm(14), feeds_with_outliers()
    fixed, record = run_pass(model, FuseNormalization(prescale="static"), feeds)
    assert "by 2^-6" in record.rewritten[0].detail  # |x - mean| up to ~2980 -> <= 64
    eps = [i for i in fixed.graph.initializer if "x2^-12" in i.name]
    assert len(eps) == 1 and onnx.numpy_helper.to_array(eps[0]) == np.float32(1e-5) * np.float32(2.0**-12)
    # Undo the compensation: tiny and constant rows (where eps dominates) no longer match.
    broken = onnx.ModelProto()
    broken.CopyFrom(fixed)
    for init in broken.graph.initializer:
        if "x2^-12" in init.name:
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(1e-5, np.float32), init.name))
    x = adversarial()[0]
    assert not np.array_equal(run_model(broken, [x])[0]["y"], run_model(model, [x])[0]["y"])


def test_dynamic_prescale_keeps_small_and_constant_rows_finite_in_fp16():
    """One k for all rows: a tiny row's scaled squares and eps * 2^-12 both flush to 0 in FP16 (d / 0 = inf), and
    a constant row gives 0/0 = NaN. The per-row scale leaves rows below 1 unscaled, so their eps survives."""
    model = layer_norm(14)
    calib = feeds_with_outliers()
    x = feeds_with_outliers(tiny=True)[0]["x"]
    x[1, 7] = 500.0
    static, _ = run_pass(model, FuseNormalization(prescale="static"), calib)
    dynamic, _ = run_pass(model, FuseNormalization(prescale="dynamic"), calib)
    broken = check_fp16(static, [{"x": x}]).outputs[0]
    assert broken.nan == 64 and broken.inf == 64  # the constant row and the tiny row
    report = check_fp16(dynamic, [{"x": x}])
    assert report.passed and report.outputs[0].nan == 0 and report.outputs[0].rel_l2 < 2e-3


def test_rms_norm_fuses_when_the_opset_is_upgraded():
    model, feeds = rms_norm(17), feeds_with_outliers()
    assert check_fp16(model, feeds).outputs[0].rel_l2 > 0.05
    fixed, record = run_pass(model, FuseNormalization(opset=23), feeds)
    assert record.status == "kept"
    assert record.rewritten[0].detail == "model upgraded to opset 23 (asked for)"
    assert fixed.opset_import[0].version == 23
    assert [n.op_type for n in fixed.graph.node] == ["RMSNormalization"]
    assert check_fp16(fixed, feeds).passed


def test_rms_norm_without_upgrade_is_prescaled_exactly():
    model, feeds = rms_norm(17), feeds_with_outliers()
    fixed, record = run_pass(model, FuseNormalization(), feeds)
    assert record.status == "kept" and fixed.opset_import[0].version == 17
    assert "RMSNormalization needs opset 23, the model has 17" in record.rewritten[0].detail
    assert_bit_exact(model, fixed, adversarial())
    assert check_fp16(fixed, feeds).passed


def test_opset_is_never_downgraded_and_small_squares_are_left_alone():
    model = rms_norm(17)
    feeds = [{"x": RNG.uniform(-3, 3, (2, 16, 64)).astype(np.float32)}]
    fixed, record = run_pass(model, FuseNormalization(opset=13), feeds)
    assert record.status == "unchanged"
    assert any("not downgraded" in s.detail for s in record.skipped)
    assert any("squares fit FP16" in s.detail for s in record.skipped)


def test_non_trailing_axes_are_not_fused():
    """NAFNet's LayerNorm2d normalises over channels (axis 1 of NCHW): LayerNormalization cannot express it."""
    model = layer_norm(17, axes="[1]")
    feeds = feeds_with_outliers()
    fixed, record = run_pass(model, FuseNormalization(), feeds)
    assert all(n.op_type != "LayerNormalization" for n in fixed.graph.node)
    assert any("shapes do not allow it" in s.detail for s in record.rewritten + record.skipped)


def test_exported_group_norm_needs_opset_21():
    from onnx_fp16_rewrite.models.nafnet import demo_inputs
    from onnx_fp16_rewrite.models.residual_norm import build_residual_groupnorm

    model = build_residual_groupnorm(height=16, width=16)
    feeds = [demo_inputs(model)]
    _, record = run_pass(model, FuseNormalization(), feeds)
    assert record.status == "unchanged"
    assert "GroupNormalization needs opset 21" in record.skipped[0].detail
    assert "InstanceNormalization already computes in FP32" in record.skipped[0].detail
    fixed, record = run_pass(model, FuseNormalization(opset=21), feeds)
    assert record.status == "kept"
    ops = [n.op_type for n in fixed.graph.node]
    assert "GroupNormalization" in ops and "InstanceNormalization" not in ops
    gn = next(n for n in fixed.graph.node if n.op_type == "GroupNormalization")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gn.attribute}["num_groups"] == 8
    assert check_fp16(fixed, feeds).outputs[0].nan > 0  # fused or not, the residual Add still overflows


def test_nodes_option_selects_sites_and_bad_options_fail():
    model, feeds = layer_norm(14), feeds_with_outliers()
    _, record = run_pass(model, FuseNormalization(nodes=["nope"]), feeds)
    assert record.status == "unchanged" and "no decomposed" in record.skipped[0].detail
    _, record = run_pass(model, FuseNormalization(nodes=["reducemean0"]), feeds)
    assert record.status == "kept"
    with pytest.raises(BadInputError, match="prescale"):
        FuseNormalization(prescale="sometimes")
    with pytest.raises(BadInputError, match="opset"):
        FuseNormalization(opset=99)
    with pytest.raises(BadInputError, match="target_absmax"):
        FuseNormalization(target_absmax=300.0)


def test_intermediate_read_elsewhere_is_not_matched():
    model = layer_norm(17)
    model.graph.output.add().CopyFrom(onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [2, 16, 1]))
    _, record = run_pass(model, FuseNormalization(), feeds_with_outliers())
    assert record.status == "unchanged" and "no decomposed" in record.skipped[0].detail
