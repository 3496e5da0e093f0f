"""If / Loop / Scan bodies: rounded in the FP16 emulation, pinned by --auto and typed in --emit mixed
like the main graph; a body that cannot be emulated is said so and never PASSes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.models.control_flow import build_loop, build_scan, build_vad_if, vad_inputs

FP32, FP16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
SPEECH_SITE = {"/speech/energy/Mul", "/speech/energy/ReduceSum", "/speech/energy/Div"}


def _body_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for node in inferred.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                for vi in (*a.g.value_info, *a.g.output):
                    types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _ort(model_or_path, feed):
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    typed = {i.name: feed[i.name].astype(np.float16 if i.type == "tensor(float16)" else np.float32)
             for i in session.get_inputs()}
    return [np.asarray(v, np.float64) for v in session.run(None, typed)]


def _rel(got, ref):
    return max(float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(got, ref))


def test_emulation_finds_the_overflow_inside_the_taken_branch():
    model = build_vad_if()
    speech = check_fp16(model, [vad_inputs(speech=True)])
    assert not speech.passed and speech.outputs[0].nan == 8
    first = speech.first_failures[0]
    assert (first.node, first.kind) == ("/speech/energy/Mul", "overflow") and first.absmax > 65504
    # Counts include the 8 body nodes (5 speech, 3 silence) besides Mul, ReduceMean, If, Sigmoid;
    # the energy that feeds the comparison is index arithmetic, FP32.
    assert (speech.fp16_nodes, speech.fp32_nodes) == (10, 2)
    silence = check_fp16(model, [vad_inputs(speech=False)])
    assert silence.passed and not silence.first_failures  # the branch not taken reports nothing


def test_vad_fix_auto_cli_pins_body_nodes_and_types_the_rest_fp16(tmp_path, capsys):
    path = tmp_path / "vad.onnx"
    onnx.save(build_vad_if(), path)
    feeds = {"speech": vad_inputs(speech=True), "silence": vad_inputs(speech=False)}
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, feed in feeds.items():
        np.savez(inputs / f"{name}.npz", **feed)
    ref = {k: _ort(path, f) for k, f in feeds.items()}
    assert main(["check", str(path), "--inputs", str(inputs)]) == 4
    for emit in ("fp32", "mixed"):
        out, rep = tmp_path / f"vad_{emit}.onnx", tmp_path / f"{emit}.json"
        assert main(["fix", str(path), "-o", str(out), "--auto", "--emit", emit, "--inputs", str(inputs),
                     "--report", str(rep)]) == 0, capsys.readouterr()
        fixed = onnx.load(out)
        assert set(PrecisionPlan.from_model(fixed).fp32_nodes) == SPEECH_SITE  # not the whole If
        for name, feed in feeds.items():
            got = _ort(fixed, feed)
            if emit == "fp32":
                np.testing.assert_allclose(got[0], ref[name][0], rtol=1e-5, atol=1e-6)
            else:
                assert _rel(got, ref[name]) < 2e-3
        if emit == "mixed":
            types = _body_types(fixed)
            assert types["sp_h"] == types["si_h"] == types["si_r"] == FP16  # the branches' networks
            assert types["sp_e"] == types["sp_tot"] == types["sp_share"] == FP32  # what the plan pins


@pytest.mark.parametrize("build, shape, pinned, counts", [
    # Loop: FP16 MatMul, Identity (body), 2 output Identities; FP32 the 3 pinned and the Loop itself.
    (build_loop, (1, 16), {"/loop/body/Mul", "/loop/body/ReduceSum", "/loop/body/Div"}, (4, 4)),
    # Scan: FP16 Unsqueeze, MatMul, Squeeze, ReduceMean, Add (body); FP32 the 3 pinned and the Scan.
    (build_scan, (8, 16), {"/scan/body/Mul", "/scan/body/ReduceSum", "/scan/body/Div"}, (5, 4)),
])
def test_loop_and_scan_bodies(build, shape, pinned, counts):
    model = build()
    feed = {"x": np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)}
    before = check_fp16(model, [feed])
    assert not before.passed
    assert any(f.node in pinned and f.kind == "overflow" for f in before.first_failures)
    body_nodes = len(model.graph.node[0].attribute[0].g.node) if build is build_scan else 6
    assert before.fp16_nodes + before.fp32_nodes >= body_nodes  # body nodes are counted
    ref = _ort(model, feed)
    for emit in ("fp32", "mixed"):
        result = fix_model(model, [], [feed], emit=emit, auto=True)
        assert result.report.fp16_after.passed
        assert set(PrecisionPlan.from_model(result.model).fp32_nodes) == pinned
        got = _ort(result.model, feed)
        assert _rel(got, ref) < (1e-5 if emit == "fp32" else 2e-3)
        if emit == "mixed":
            types = _body_types(result.model)
            assert types[("lp_h" if build is build_loop else "sc_h")] == FP16
            assert types[("lp_e" if build is build_loop else "sc_e")] == FP32
            mixed = result.report.mixed
            assert (mixed.fp16_node_count, mixed.fp32_node_count) == counts
            assert "bodies are converted" in mixed.fp32_nodes[model.graph.node[0].name]


SEQUENCE_MAP = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4] x) => (float[2,4] y) {
  s = SplitToSequence<axis=0, keepdims=0>(x)
  t = SequenceMap(s) <body = b (float[4] e) => (float[4] f) { f = Mul(e, e) }>
  y = ConcatFromSequence<axis=0, new_axis=1>(t)
}"""


def test_a_body_that_cannot_be_emulated_is_no_pass(caplog):
    model = onnx.parser.parse_model(SEQUENCE_MAP)
    report = check_fp16(model, [{"x": np.full((2, 4), 0.5, np.float32)}])
    assert not report.passed and report.outputs[0].ok  # outputs agree, the verdict still is not PASS
    assert any("SequenceMap" in n and "not emulated" in n for n in report.notes)
    assert any("not emulated" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_profile_measures_body_tensors_and_empty_ones():
    from onnx_fp16_rewrite.analysis.range_profile import profile_ranges

    prof = profile_ranges(build_vad_if(), [vad_inputs(speech=True)])
    assert prof.ranges["sp_e"].node == "/speech/energy/Mul" and prof.ranges["sp_e"].absmax > 65504
    assert prof.ranges["si_h"].absmax == 0.0  # the branch not taken
    # A Loop that runs no iteration leaves an empty scan output: an empty sample, no failure.
    x = np.random.default_rng(0).uniform(0, 1, (1, 16)).astype(np.float32)
    empty = profile_ranges(build_loop(iterations=0), [{"x": x}])
    assert empty.ranges["states"].absmax == 0.0
    assert empty.ranges["s_final"].absmax == pytest.approx(float(x.max()))
    assert check_fp16(build_loop(iterations=0), [{"x": x}]).passed
