"""Opsets 7 to 23 through the CLI: check finds the overflow, fix --auto fixes it with both emits,
the written model keeps its opset and runs in ORT close to the original."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.models.opset_models import OPSETS, build_opset_model


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    return session.run(None, {"x": x.astype(dtype)})[0].astype(np.float64)


@pytest.mark.parametrize("opset", OPSETS)
def test_check_and_fix_auto_at_opset(opset, tmp_path, capsys):
    model = build_opset_model(opset)
    path, inputs = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx.save(model, path)
    x = np.random.default_rng(1).uniform(0, 1, (1, 64)).astype(np.float32)
    np.savez(inputs, x=x)
    ref = _run(path, x)

    assert main(["check", str(path), "--inputs", str(inputs), "--report", str(tmp_path / "c.json")]) == 4
    first = json.loads((tmp_path / "c.json").read_text())["failing_tensors"][0]["tensors"][0]
    assert (first["op"], first["kind"]) == ("Mul", "overflow") and first["absmax"] > 65504
    if opset >= 11:  # CumSum exists: the strict (FP16-accumulating Scan) emulation at this opset too
        assert main(["check", str(path), "--inputs", str(inputs), "--strict-cumsum"]) == 4

    for emit in ("fp32", "mixed"):
        out = tmp_path / f"fixed_{emit}.onnx"
        code = main(["fix", str(path), "-o", str(out), "--auto", "--emit", emit, "--inputs", str(inputs),
                     "--report", str(tmp_path / f"{emit}.json")])
        assert code == 0, capsys.readouterr()
        fixed = onnx.load(out)
        assert fixed.opset_import[0].version == opset  # no silent upgrade
        onnx.checker.check_model(fixed, full_check=True)
        got = _run(out, x)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        if emit == "fp32":
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        else:
            assert fixed.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
            assert rel < 2e-3, rel
        # The written model checks clean on its own (its stored plan, or its types).
        typed = tmp_path / f"x_{emit}.npz"
        np.savez(typed, x=x.astype(np.float16 if emit == "mixed" else np.float32))
        assert main(["check", str(out), "--inputs", str(typed)]) == 0


def test_opset_older_than_7_is_one_line_exit_2(tmp_path, capsys):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "old.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 6)], ir_version=3), path)
    for argv in (["check", str(path)], ["fix", str(path), "-o", str(tmp_path / "out.onnx"), "--auto"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "opset 6" in err and "version_converter" in err
    assert not (tmp_path / "out.onnx").exists()
