"""split-cumsum: every CumSum attribute case rewritten correctly or skipped with a reason."""

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.models import build_cumsum_chain, build_nafnet
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.passes.split_cumsum import SplitCumSum
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from tests.adversarial import adversarial_feeds


def cumsum_model(shape, axis, *, exclusive=0, reverse=0, dims=None, dtype=TensorProto.FLOAT, axis_input=False):
    """x -> CumSum(axis) -> y; ``dims`` may name symbolic dims; ``axis_input`` makes the axis a graph input."""
    dims = dims or shape
    node = helper.make_node("CumSum", ["x", "ax"], ["y"], name="cs", exclusive=exclusive, reverse=reverse)
    inputs = [helper.make_tensor_value_info("x", dtype, dims)]
    inits = []
    if axis_input:
        inputs.append(helper.make_tensor_value_info("ax", TensorProto.INT64, []))
    else:
        inits.append(numpy_helper.from_array(np.array(axis, np.int64), "ax"))
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", dtype, dims)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model, pass_, feeds):
    fixed, report = PassManager([pass_], feeds).run(model)
    return fixed, report.passes[0]


CASES = list(itertools.product([2, -2, -1, 0], [0, 1], [0, 1], [False, True]))


@pytest.mark.parametrize("axis, exclusive, reverse, dynamic", CASES)
def test_blocked_scan_every_attribute_case(axis, exclusive, reverse, dynamic):
    shape = {2: [3, 2, 300, 5], -2: [3, 2, 300, 5], -1: [2, 3, 5, 300], 0: [300, 2, 3]}[axis]
    a = axis % len(shape)
    dims = [("L" if i == a and dynamic else d) for i, d in enumerate(shape)]
    rng = np.random.default_rng(0)
    other = [257 if i == a and dynamic else d for i, d in enumerate(shape)]  # a second length, not a multiple
    feeds = [{"x": rng.uniform(0, 1, shape).astype(np.float32)}, {"x": rng.uniform(-1, 1, other).astype(np.float32)}]
    fixed, record = run(cumsum_model(shape, axis, exclusive=exclusive, reverse=reverse, dims=dims),
                        SplitCumSum(block_size=64), feeds)
    assert record.status == "kept", record.error
    assert all(o.ok for o in record.validation.outputs)
    detail = record.rewritten[0].detail
    assert f"exclusive={exclusive}, reverse={reverse}" in detail and ("dynamic" in detail) == dynamic
    # TensorRT ignores CumSum's reverse (#4513) and mixes up axes (#4551): no reverse, one axis.
    for node in (n for n in fixed.graph.node if n.op_type == "CumSum"):
        assert all(not (a.name == "reverse" and a.i) for a in node.attribute)


@pytest.mark.parametrize("axis, exclusive, reverse", list(itertools.product([2, -1, 0], [0, 1], [0, 1])))
def test_matmul_form_is_exact_for_every_attribute_case(axis, exclusive, reverse):
    shape = {2: [3, 2, 60, 5], -1: [2, 3, 5, 60], 0: [60, 2, 3]}[axis]
    feeds = [{"x": np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32)}]
    model = cumsum_model(shape, axis, exclusive=exclusive, reverse=reverse)
    fixed, record = run(model, SplitCumSum(scan_form="matmul"), feeds)
    assert record.status == "kept" and "60x60 triangular" in record.rewritten[0].detail
    assert [n.op_type for n in fixed.graph.node if n.op_type in ("CumSum", "MatMul")] == ["MatMul"]


@pytest.mark.parametrize("model, pass_, reason", [
    (cumsum_model([1, 300], 1, axis_input=True), SplitCumSum(), "axis computed at run time"),
    (cumsum_model([1, 300], 1, dtype=TensorProto.INT64), SplitCumSum(), "not a float CumSum"),
    (cumsum_model([1, 100], 1), SplitCumSum(), "short axis (100 < min_length 256)"),
    (cumsum_model([1, 300, 4], 1, dims=[1, 300, "C"]), SplitCumSum(), "dims after the axis are dynamic"),
    (cumsum_model([1, 300], 1, dims=[1, "L"]), SplitCumSum(scan_form="matmul"), "dynamic length"),
    (cumsum_model([1, 2000], 1), SplitCumSum(scan_form="matmul"), "axis length 2000 > max_matmul_length 1024"),
])
def test_cases_it_cannot_rewrite_are_skipped_with_a_reason(model, pass_, reason):
    feeds = [{n.name: np.ones([d.dim_value or 300 for d in n.type.tensor_type.shape.dim],
                              helper.tensor_dtype_to_np_dtype(n.type.tensor_type.elem_type))
              for n in model.graph.input if n.name == "x"}]
    if any(i.name == "ax" for i in model.graph.input):
        feeds[0]["ax"] = np.array(1, np.int64)
    _, record = run(model, pass_, feeds)
    assert record.status == "unchanged" and reason in record.skipped[0].detail


@pytest.mark.parametrize("form", ["blocked", "matmul"])
def test_several_cumsums_on_different_axes(form):
    """NAFNet's two CumSums (W, then H) on adversarial inputs: after the blocked rewrite every CumSum
    scans axis 1 of a rank-3 view (so TensorRT's several-axes bug has nothing to confuse); after the
    matmul rewrite there is no CumSum at all."""
    model = build_nafnet(height=64, width=64, kernel=(48, 48))
    fixed, record = run(model, SplitCumSum(scan_form=form, min_length=32, block_size=16), adversarial_feeds(model))
    assert record.status == "kept" and len(record.rewritten) == 4
    assert all(o.ok for o in record.validation.outputs)
    inits = {i.name: numpy_helper.to_array(i) for i in fixed.graph.initializer}
    axes = {int(inits[n.input[1]]) for n in fixed.graph.node if n.op_type == "CumSum"}
    assert axes == ({1} if form == "blocked" else set())


def test_blocked_scan_fixes_fp16_accumulating_cumsum():
    """TensorRT <= 10.7 accumulates an FP16 CumSum in FP16: a running sum of U(0,1) stalls once its
    ulp passes the increments. In blocks of 64 the sums stay short."""
    model = build_cumsum_chain(length=16384, scale=1.0)
    feeds = [demo_inputs(model)]
    fixed, record = run(model, SplitCumSum(), feeds)
    before = check_fp16(model, feeds, strict_cumsum=True).outputs[0].rel_l2
    after = check_fp16(fixed, feeds, strict_cumsum=True).outputs[0].rel_l2
    assert before > 0.5 and after < 2e-3, (before, after)
    plain = check_fp16(fixed, feeds).outputs[0].rel_l2  # FP32 accumulation: both fine
    assert plain < 1e-3


def test_pin_offsets_pins_the_growing_part():
    model = build_cumsum_chain(length=4096)
    fixed, record = run(model, SplitCumSum(pin_offsets=True), [demo_inputs(model)])
    plan = PrecisionPlan.from_model(fixed)
    assert len(plan) == 2 and "offsets pinned" in record.rewritten[0].detail
    assert {n.op_type for n in fixed.graph.node if n.name in plan.fp32_nodes} == {"CumSum", "Add"}
    onnx.checker.check_model(fixed)


def test_bad_options():
    with pytest.raises(BadInputError, match="scan_form"):
        SplitCumSum(scan_form="tree")
    with pytest.raises(BadInputError, match="block_size"):
        SplitCumSum(block_size=1)


def test_fp32_pin_of_the_cumsum_moves_to_its_replacement():
    from onnx_fp16_rewrite.passes import ProtectFp32

    model = build_cumsum_chain(length=4096, scale=64.0)
    fixed, report = PassManager([ProtectFp32(grow=False), SplitCumSum()], [demo_inputs(model)]).run(model)
    plan = PrecisionPlan.from_model(fixed)
    assert "/CumSum" not in plan.fp32_nodes and set(plan.fp32_nodes) <= {n.name for n in fixed.graph.node}
    assert len(plan) > 5 and "its replacement is too" in report.passes[1].rewritten[0].detail
