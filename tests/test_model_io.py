import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.io.model_io import check_model, load_model, save_model


def _model_with_weight(n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"], name="add")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [n])],
                              [helper.make_tensor_value_info("y", 1, [n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_round_trip_and_atomic_write(tmp_path):
    model = _model_with_weight(16)
    out = save_model(model, tmp_path / "m.onnx")
    assert load_model(out).SerializeToString() == model.SerializeToString()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp files left


def test_external_data_round_trip(tmp_path):
    model = _model_with_weight(4096)
    out = save_model(model, tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").stat().st_size == 4096 * 4
    assert (tmp_path / "big.onnx").stat().st_size < 1000
    again = load_model(out)
    assert np.array_equal(numpy_helper.to_array(again.graph.initializer[0]), np.arange(4096, dtype=np.float32))


def test_refuses_to_overwrite_input(tmp_path):
    path = save_model(_model_with_weight(4), tmp_path / "in.onnx")
    before = path.read_bytes()
    with pytest.raises(BadInputError, match="refusing to overwrite"):
        save_model(_model_with_weight(8), tmp_path / "." / "in.onnx", input_path=path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content,message",
    [(None, "model file not found"), (b"this is not a protobuf at all \xff\xfe", "not a valid ONNX model")],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadInputError, match=message):
        load_model(path)


def test_truncated_protobuf(tmp_path):
    data = _model_with_weight(256).SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError):
        check_model(load_model(path))


def test_missing_external_data(tmp_path):
    out = save_model(_model_with_weight(4096), tmp_path / "big.onnx", external_data=True)
    (tmp_path / "big.onnx.data").unlink()
    with pytest.raises(BadInputError, match="external data"):
        load_model(out)


# --- outputs: planned up front, staged, all renamed at the end or none (io.paths) ---

import errno  # noqa: E402

from onnx_fp16_rewrite.io import paths  # noqa: E402


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_run_leaves_targets_as_they_were(tmp_path):
    (tmp_path / "r.json").write_text("old report")
    plan = paths.plan_outputs([], {"--output": tmp_path / "m.onnx", "--report": tmp_path / "r.json"})
    with pytest.raises(RuntimeError):
        with plan.transaction() as tx:
            tx.write_model("--output", _model_with_weight(4))
            tx.write_text("--report", "new report")
            raise RuntimeError("a later step fails")
    assert _files(tmp_path) == ["r.json"] and (tmp_path / "r.json").read_text() == "old report"


def test_full_disk_while_staging_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    plan = paths.plan_outputs([], {"--output": tmp_path / "m.onnx", "--report": tmp_path / "r.json"})
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the model went through; the report hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(BadInputError, match=r"cannot write --report .*No space left on device"):
        with plan.transaction() as tx:
            tx.write_model("--output", _model_with_weight(4))
            tx.write_text("--report", "{}")
    assert _files(tmp_path) == []


def test_failed_rename_restores_what_was_there(tmp_path, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"previous model")
    plan = paths.plan_outputs([], {"--output": tmp_path / "m.onnx", "--report": tmp_path / "r.json"})
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("r.json"):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    with pytest.raises(BadInputError, match="cannot write"):
        with plan.transaction() as tx:
            tx.write_model("--output", _model_with_weight(4))
            tx.write_text("--report", "{}")
            monkeypatch.setattr(os, "replace", replace)
    monkeypatch.undo()
    assert _files(tmp_path) == ["m.onnx"] and (tmp_path / "m.onnx").read_bytes() == b"previous model"


def test_interrupted_fix_leaves_nothing(tmp_path, monkeypatch, capfd):
    from onnx_fp16_rewrite import fix
    from onnx_fp16_rewrite.cli import main

    src = save_model(_model_with_weight(8), tmp_path / "in.onnx")
    out = tmp_path / "out"
    out.mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fix, "fix_model", interrupted)
    code = main(["fix", str(src), "--shape", "x:8", "-o", str(out / "f.onnx"), "--report", str(out / "r.json"),
                 "--save-inputs", str(out / "inputs.json")])
    assert code == 130 and "interrupted" in capfd.readouterr().err
    assert _files(out) == []


def test_a_library_writer_failing_mid_write_is_one_line_exit_2(tmp_path):
    """--save-inputs is written by Polygraphy's own JSON writer through tx.write_with: an OSError
    there (full disk) is the environment's doing, exit 2, and nothing is left."""
    from onnx_fp16_rewrite.errors import BadInputError
    from onnx_fp16_rewrite.io.paths import plan_outputs

    target = tmp_path / "inputs.json"
    plan = plan_outputs(inputs=[], outputs={"--save-inputs": target})

    def full_disk(path):
        path.write_text("[")
        raise OSError(28, "No space left on device")

    with pytest.raises(BadInputError, match=r"cannot write --save-inputs .*No space left on device"):
        with plan.transaction() as tx:
            tx.write_with("--save-inputs", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_checker_on_the_skeleton_still_refuses_short_raw_data():
    """Past 4 MB of in-proto float weights the ONNX checker sees the weight-less skeleton (no
    copy of the weights through protobuf); the raw-data length it would check is checked here,
    with its message, and a well-formed model passes either way."""
    from onnx import TensorProto, helper

    from onnx_fp16_rewrite.errors import BadInputError
    from onnx_fp16_rewrite.io import model_io

    def model(short: bool):
        w = TensorProto()
        w.name, w.data_type = "w", TensorProto.FLOAT
        w.dims.extend([1024, 1024])
        w.raw_data = np.zeros(1024 * 1024 - (1 if short else 0), np.float32).tobytes()
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])], [w])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert 4 * 1024 * 1024 >= model_io._CHECK_COPY  # the skeleton path
    model_io.check_model(model(short=False), "model")
    with pytest.raises(BadInputError, match=r"fails the ONNX checker: .*tensor name: w.* raw_data size \(4194300 bytes\) "
                                            r"is too small .*4194304 bytes required"):
        model_io.check_model(model(short=True), "model")
