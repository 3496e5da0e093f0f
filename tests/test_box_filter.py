"""box-filter: integral-image window sums replaced by in-range forms; FP32 kept, FP16 fixed, FLOPs bounded."""

import numpy as np
import pytest
from onnx import numpy_helper

from onnx_fp16_rewrite.models import build_integral_box_filter, build_nafnet
from onnx_fp16_rewrite.models.guided_filter import build_guided_filter
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.passes import ProtectFp32
from onnx_fp16_rewrite.passes.box_filter import BoxFilter
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction, node_flops, tensor_shapes
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.analysis.range_profile import profile_absmax
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from tests.adversarial import adversarial_feeds
from tests.conftest import WINDOW, parse_named

SMALL = {
    "nafnet": lambda: build_nafnet(height=64, width=64, kernel=(48, 48)),
    "guided": lambda: build_guided_filter(size=48, radius=3),
    "box": lambda: build_integral_box_filter(size=64),
    "window": lambda: parse_named(WINDOW),
}


def run(model, pass_, feeds):
    fixed, report = PassManager([pass_], feeds).run(model)
    return fixed, report.passes[0]


def total_flops(model) -> float:
    return sum(node_flops(model).values())


@pytest.mark.parametrize("form", ["auto", "blocked", "prefix", "pool"])
@pytest.mark.parametrize("name", list(SMALL))
def test_every_form_keeps_fp32_results_on_adversarial_inputs(name, form):
    model = SMALL[name]()
    feeds = adversarial_feeds(model)
    fixed, record = run(model, BoxFilter(window_form=form, max_flop_ratio=1e3), feeds)
    assert record.status == "kept", record.error
    assert not record.skipped and record.rewritten
    # Within rtol/atol 1e-5 of the original, or (large dynamic range: the original's own FP32 integral
    # image is the noisy one) no further from a float64 evaluation than the original is.
    assert all(o.ok and o.judged_against in ("fp32", "float64") for o in record.validation.outputs)
    # The integral images are gone. CumSums that remain (blocked, prefix) all scan axis 1 of a rank-3
    # view, so there are never CumSums on different axes (TensorRT 10.8-10.11, #4551).
    inits = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    shapes, _ = tensor_shapes(fixed)
    scans = [n for n in fixed.graph.node if n.op_type == "CumSum"]
    assert {(int(inits[n.input[1]]), len(shapes[n.input[0]])) for n in scans} <= {(1, 3)}
    assert bool(scans) == (form in ("blocked", "prefix") or (form == "auto" and name in ("nafnet", "window")))


@pytest.mark.parametrize("build, forms", [
    (SMALL["nafnet"], "axis 2: prefix, axis 3: prefix"),  # 64 / 48: prefix sums grow at most 2.3x: cheapest
    (lambda: build_guided_filter(size=64, radius=8), "axis 2: blocked, axis 3: blocked"),  # 17 wide: blocks
    (SMALL["guided"], "axis 2: pool, axis 3: pool"),  # 7 wide: pooling (7 FLOPs per element) is cheaper
    (SMALL["box"], "axis 2: pool, axis 3: pool"),
    (SMALL["window"], "axis 1: blocked"),
])
def test_auto_picks_the_cheapest_in_range_form_and_states_the_flop_ratio(build, forms):
    model = build()
    fixed, record = run(model, BoxFilter(), [demo_inputs(model)])
    for site in record.rewritten:
        assert forms in site.detail and "FLOPs" in site.detail and "x)" in site.detail
    assert total_flops(fixed) <= 3 * total_flops(model)


def test_new_values_stay_near_the_input_range():
    model = build_guided_filter(size=64, radius=8)
    feeds = [demo_inputs(model)]
    before = profile_absmax(model, feeds)
    fixed, _ = run(model, BoxFilter(), feeds)
    after = profile_absmax(fixed, feeds)
    new = {k: v for k, v in after.items() if "/box_filter/" in k}
    assert max(before.values()) > 1000  # the integral images (80x80 padded, of U(0,1))
    assert new and max(new.values()) <= 2 * 17  # sums of two blocks of 17 values <= 1, before the 1/k fold


def one_d(*, exclusive=0, reverse=0, combine="Sub", reader="", opset=17) -> str:
    """x[1,256] -> CumSum -> two Slices 16 apart -> combine -> / 16 (+ an optional extra reader)."""
    return parse_named(f"""<ir_version: 8, opset_import: ["" : {opset}]>
g (float[1,256] x) => (float[1,240] y{', float mx' if reader else ''}) {{
  ax = Constant<value=int64 {{1}}>()
  c = CumSum<exclusive={exclusive}, reverse={reverse}>(x, ax)
  s0 = Constant<value=int64[1] {{0}}>()
  e0 = Constant<value=int64[1] {{240}}>()
  s1 = Constant<value=int64[1] {{16}}>()
  e1 = Constant<value=int64[1] {{256}}>()
  one = Constant<value=int64[1] {{1}}>()
  lo = Slice(c, s0, e0, one)
  hi = Slice(c, s1, e1, one)
  d = {combine}(hi, lo)
  k = Constant<value=float {{16.0}}>()
  y = Div(d, k)
  {reader}
}}""")


@pytest.mark.parametrize("model, reason", [
    (one_d(), None),
    (one_d(exclusive=1), "exclusive=1, reverse=0: not the integral-image form"),
    (one_d(reverse=1), "exclusive=0, reverse=1: not the integral-image form"),
    (one_d(combine="Add"), "corner coefficients"),
    (one_d(reader="mx = ReduceMax<keepdims=0>(c)"), "read by ReduceMax"),
    (one_d(opset=12), "opset 12 < 13"),
])
def test_cumsum_attributes_and_non_boxes_are_skipped_with_reasons(model, reason):
    feeds = [{"x": np.random.default_rng(0).uniform(0, 1, (1, 256)).astype(np.float32)}]
    fixed, record = run(model, BoxFilter(), feeds)
    if reason is None:
        assert record.status == "kept" and "1-D 16 window sum" in record.rewritten[0].detail
    else:
        assert record.status == "unchanged" and not record.rewritten
        assert reason in record.skipped[0].detail and record.skipped[0].node == "cumsum1"


def test_dynamic_shapes_and_costly_sites_are_skipped():
    dynamic = build_nafnet(height=64, width=64, kernel=(48, 48), dynamic=True)
    feeds = [demo_inputs(SMALL["nafnet"]())]
    _, record = run(dynamic, BoxFilter(), feeds)
    assert record.status == "unchanged" and len(record.skipped) == 2
    assert all("dynamic shape" in s.detail for s in record.skipped)
    _, record = run(SMALL["nafnet"](), BoxFilter(max_flop_ratio=0.5), feeds)
    assert record.status == "unchanged" and "cheapest rewrite costs 1.09x" in record.skipped[0].detail


def test_bad_options():
    with pytest.raises(BadInputError, match="window_form"):
        BoxFilter(window_form="dense")
    with pytest.raises(BadInputError, match="max_growth"):
        BoxFilter(max_growth=0.5)


ACCEPTANCE = {
    "nafnet-512": (build_nafnet, ProtectFp32(match="sca")),
    "guided-224": (lambda: build_guided_filter(size=224), ProtectFp32()),
    "guided-1024": (lambda: build_guided_filter(size=1024), ProtectFp32()),
}


@pytest.mark.parametrize("name, form", [("nafnet-512", "auto"), ("nafnet-512", "blocked"),
                                        ("guided-224", "auto"), ("guided-1024", "auto")])
def test_acceptance_every_tensor_fp16_beside_the_fp32_pinning_fix(name, form):
    build, protect = ACCEPTANCE[name]
    model = build()
    feeds = [demo_inputs(model)]
    reference = run_model(model, feeds)
    fixed, record = run(model, BoxFilter(window_form=form), feeds)
    assert record.status == "kept" and len(record.rewritten) == {"nafnet-512": 2}.get(name, 6)
    before = check_fp16(model, feeds, reference).outputs[0]
    after = check_fp16(fixed, feeds, reference, plan=PrecisionPlan()).outputs[0]  # nothing pinned
    pinned_model, _ = run(model, protect, feeds)
    pinned = check_fp16(pinned_model, feeds, reference).outputs[0]
    numbers = (f"{name} [{form}]: all-FP16 before NaN {before.nan} Inf {before.inf} rel L2 {before.rel_l2:.3g}; "
               f"box-filter NaN {after.nan} Inf {after.inf} rel L2 {after.rel_l2:.3g}; "
               f"protect-fp32 rel L2 {pinned.rel_l2:.3g}")
    assert not (before.nan == before.inf == 0 and before.rel_l2 <= 1e-2), numbers  # broken before
    assert after.nan == 0 and after.inf == 0 and after.rel_l2 <= 1e-2, numbers
    assert pinned.rel_l2 <= 1e-2, numbers
    ratio = total_flops(fixed) / total_flops(model)
    assert ratio <= 3.0, f"{numbers}; FLOP ratio {ratio:.2f}"
    # The point of rewriting rather than pinning: every FLOP stays FP16.
    assert fp16_flop_fraction(fixed, PrecisionPlan()) == 1.0
    assert fp16_flop_fraction(pinned_model, None) < 1.0


def test_fp32_pins_of_replaced_nodes_move_to_the_replacement():
    """Run after protect-fp32, the plan must not name nodes that no longer exist."""
    model = SMALL["window"]()
    feeds = [{"x": np.random.default_rng(1).uniform(20, 40, (1, 4096)).astype(np.float32)}]
    fixed, report = PassManager([ProtectFp32(), BoxFilter()], feeds).run(model)
    assert [p.status for p in report.passes] == ["kept", "kept"]
    plan = PrecisionPlan.from_model(fixed)
    assert plan.fp32_nodes and set(plan.fp32_nodes) <= {n.name for n in fixed.graph.node}
    assert all("/box_filter/" in name for name in plan.fp32_nodes)
    assert "replaced nodes were pinned to FP32" in report.passes[1].rewritten[0].detail
