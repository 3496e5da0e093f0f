"""ORT graph optimisations keep the emulator's FP16 rounding; sessions and runs are cached per graph."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation, emu_feed
from onnx_fp16_rewrite.io import sessions
from onnx_fp16_rewrite.io.ort_runner import make_session
from onnx_fp16_rewrite.models.nafnet import build_nafnet, demo_inputs

LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def _run(model: onnx.ModelProto, feed, level: str, saved: str | None = None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.log_severity_level = 3
    if saved:
        opts.optimized_model_filepath = saved
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=True), name
        assert int(np.isnan(a[name]).sum()) == int(np.isnan(b[name]).sum()), name


@pytest.fixture(scope="module")
def nafnet():
    model = build_nafnet()  # the CLI's --demo nafnet: overflows in FP16 (NaN outputs)
    return model, demo_inputs(model)


@pytest.mark.parametrize("pinned", [False, True])
def test_nafnet_emulation_is_bitwise_the_same_with_basic_and_extended_optimisations(nafnet, pinned):
    model, feed = nafnet
    if pinned:  # pinned FP32 nodes leave unrounded edges where ORT could fuse (a smaller NAFNet)
        model = build_nafnet(height=128, width=128, blocks=1, kernel=(96, 96))
        feed = demo_inputs(model)
    plan = PrecisionPlan({n.name: "test" for n in model.graph.node if "sca" in n.name}) if pinned else None
    emu = build_emulation(model, plan)
    feed = emu_feed(feed, emu.fp16_inputs)
    off = _run(emu.model, feed, "disabled")
    assert pinned or np.isnan(off["output"]).sum() > 0  # the all-FP16 demo does overflow
    for level in ("basic", "extended"):
        _assert_bitwise(_run(emu.model, feed, level), off)
    # What the tool itself builds (make_session(optimize=True): basic, cast chains kept).
    _assert_bitwise(dict(zip(off, make_session(emu.model, optimize=True).run(list(off), feed))), off)


def test_fusable_cast_pairs_survive_every_level(tmp_path):
    """x*x -> Cast(FP16) -> Cast(FP32) -> +x: a single-consumer Cast chain ORT's cast-chain
    elimination would fold; the rounding (and the overflow to inf) must stay."""
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"]),
        helper.make_node("Cast", ["sq"], ["half"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["half"], ["back"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["back", "x"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([1.0001, 300.0, 1e-4, 3.3, -7.77], np.float32)
    with np.errstate(over="ignore"):
        expected = (x * x).astype(np.float16).astype(np.float32) + x
    assert np.isinf(expected[1])  # 300^2 = 9e4 > 65504
    for level in LEVELS:
        saved = str(tmp_path / f"{level}.onnx")
        got = _run(model, {"x": x}, level, saved)["y"]
        assert np.array_equal(got, expected), level
        assert [n.op_type for n in onnx.load(saved).graph.node].count("Cast") == 2, level
    got = make_session(model, optimize=True).run(["y"], {"x": x})[0]
    assert np.array_equal(got, expected)


def test_sessions_and_runs_are_built_once_per_graph():
    sessions.clear()
    model = build_nafnet(height=32, width=32, blocks=1, kernel=(16, 16))
    emu = build_emulation(model).model
    feeds = [demo_inputs(model, seed=0), demo_inputs(model, seed=1)]
    before = sessions.stats()
    first = sessions.run_cached(emu, feeds, optimize=True)
    # Metadata (a stored plan, docs) does not change what ORT runs: same session, same runs.
    tagged = onnx.ModelProto()
    tagged.CopyFrom(emu)
    tagged.doc_string = "a stored plan changes nothing ORT runs"
    again = sessions.run_cached(tagged, feeds[::-1], optimize=True)
    after = sessions.stats()
    assert after["sessions"] - before["sessions"] == 1
    assert after["runs"] - before["runs"] == 2 and after["reused_runs"] - before["reused_runs"] == 2
    for a, b in zip(first, again[::-1]):
        _assert_bitwise(a, b)
    # The results equal a plain session's.
    plain = make_session(emu, optimize=True)
    _assert_bitwise(dict(zip(first[0], plain.run(list(first[0]), feeds[0]))), first[0])


def test_our_sessions_do_not_prepack_weights_and_a_users_does():
    """Prepacking MatMul weights at set-up costs more than it saves in sessions that run once or
    a few times (T5 encoder: 0.35 -> 0.21 s a session); a packed MatMul also rounds differently,
    so every session of ours must agree. The user-like session (fix's mixed model run) keeps
    ORT's default, and both compute the same product to FP32 rounding."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((64, 256)).astype(np.float32)
    ours = [make_session(model), make_session(model, optimize=True)]
    user = make_session(model, as_user=True)
    for session in ours:
        assert session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError, match="disable_prepacking"):  # not set: ORT's default (packing)
        user.get_session_options().get_session_config_entry("session.disable_prepacking")
    # The user-like session runs on a thread beside our work: its idle workers do not spin.
    assert user.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="allow_spinning"):
        ours[0].get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    results = [s.run(["y"], {"x": x})[0] for s in (*ours, user)]
    assert np.array_equal(results[0], results[1])
    np.testing.assert_allclose(results[2], x.astype(np.float64) @ w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(results[0], results[2], rtol=1e-5, atol=1e-4)


def _pad_model(pads_from_shape: bool, dim: int | str = 64) -> onnx.ModelProto:
    """y = Pad(x): pads as a constant, or computed from Shape(x) as TorchScript writes F.pad's."""
    nodes, inits = [], [onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    if pads_from_shape:
        inits.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"))
        nodes += [helper.make_node("Shape", ["x"], ["shape"]),
                  helper.make_node("Mul", ["shape", "zero"], ["zeros"]),  # 0 * shape: still run-time values
                  helper.make_node("ReduceSum", ["zeros"], ["nothing"], keepdims=1),
                  helper.make_node("Add", ["pads", "nothing"], ["pads_rt"])]
    nodes.append(helper.make_node("Pad", ["x", "pads_rt" if pads_from_shape else "pads"], ["y"]))
    graph = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, dim, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_arena_serves_graphs_whose_shapes_are_known_only_at_run_time():
    """Without a memory plan before the first run, each activation would be mapped and faulted in
    fresh (a TorchScript NAFNetLocal's check graph: 12.5 s instead of 4.0 s); graphs of static
    shapes keep plain malloc, which returns memory between runs. Outputs do not depend on it."""
    from onnx_fp16_rewrite.io.ort_runner import shapes_at_run_time

    static, computed, symbolic = _pad_model(False), _pad_model(True), _pad_model(False, "height")
    assert [shapes_at_run_time(m) for m in (static, computed, symbolic)] == [False, True, True]
    sessions_ = [make_session(m) for m in (static, computed, symbolic)]
    assert [s.get_session_options().enable_cpu_mem_arena for s in sessions_] == [False, True, True]
    x = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    outs = [s.run(["y"], {"x": x})[0] for s in sessions_]
    assert outs[0].shape == (1, 4, 66, 66)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
