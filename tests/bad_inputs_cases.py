"""Models and files for tests/test_bad_inputs.py: each builder writes what a careful user might
hand the tool (broken, unusual or hostile) into a folder and returns the CLI arguments."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def small_model(opset: int = 17, ir: int | None = None, *, name: str = "scale") -> onnx.ModelProto:
    """y = relu(x * w): x [2, 8]; w is 64 floats as an initializer (external data when saved so)."""
    w = numpy_helper.from_array(np.linspace(0.5, 2.0, 8, dtype=np.float32).reshape(1, 8), "w")
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"], name=name), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 8])],
                          [helper.make_tensor_value_info("y", F, [2, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        m.ir_version = ir
    return m


def save(m: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save_model(m, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        path.write_bytes(m.SerializeToString())
    return path


def with_graph(m: onnx.ModelProto, **edits) -> onnx.ModelProto:
    for key, value in edits.items():
        field = getattr(m.graph, key)
        del field[:]
        field.extend(value)
    return m


def no_outputs(d: Path) -> list[str]:
    m = small_model()
    del m.graph.output[:]
    return ["check", str(save(m, d / "m.onnx"))]


def unknown_domain(d: Path) -> list[str]:
    m = small_model()
    m.graph.node[1].domain = "com.example.nosuch"
    m.opset_import.append(helper.make_opsetid("com.example.nosuch", 1))
    return ["check", str(save(m, d / "m.onnx"))]


def opset_30(d: Path) -> list[str]:
    return ["check", str(save(small_model(opset=30), d / "m.onnx"))]


def bad_shapes(d: Path) -> list[str]:
    """MatMul [2,8] x [3,5]: shapes that cannot agree."""
    w = numpy_helper.from_array(np.ones((3, 5), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", F, [2, 8])], [helper.make_tensor_value_info("y", F, [2, 5])], [w])
    return ["check", str(save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "m.onnx"))]


def bfloat16_model(d: Path) -> list[str]:
    """A bfloat16 Sin: ORT CPU has no kernel for it."""
    g = helper.make_graph([helper.make_node("Sin", ["x"], ["y"], name="sin")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 8])])
    return ["check", str(save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "m.onnx"))]


def bfloat16_model_fix(d: Path) -> list[str]:
    """The same model given to ``fix --auto``: refused before any analysis as ``check`` refuses it."""
    return ["fix", bfloat16_model(d)[1], "--auto", "-o", str(d / "out" / "f.onnx")]


def zero_dim_input(d: Path) -> list[str]:
    m = small_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 0
    return ["check", str(save(m, d / "m.onnx"))]


def sequence_input(d: Path) -> list[str]:
    g = helper.make_graph([helper.make_node("SequenceAt", ["s", "i"], ["y"], name="at")], "g",
                          [helper.make_tensor_sequence_value_info("s", F, [2, 8])],
                          [helper.make_tensor_value_info("y", F, [2, 8])],
                          [numpy_helper.from_array(np.array(0, np.int64), "i")])
    return ["check", str(save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "m.onnx"))]


def optional_input(d: Path) -> list[str]:
    opt = helper.make_value_info("o", helper.make_optional_type_proto(helper.make_tensor_type_proto(F, [2, 8])))
    g = helper.make_graph([helper.make_node("OptionalGetElement", ["o"], ["y"], name="get")], "g", [opt],
                          [helper.make_tensor_value_info("y", F, [2, 8])])
    return ["check", str(save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), d / "m.onnx"))]


def garbage_file(d: Path) -> list[str]:
    (d / "m.onnx").write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    return ["check", str(d / "m.onnx")]


def truncated_model(d: Path) -> list[str]:
    data = small_model().SerializeToString()
    (d / "m.onnx").write_bytes(data[: len(data) // 2])
    return ["check", str(d / "m.onnx")]


def missing_external_data(d: Path) -> list[str]:
    p = save(small_model(), d / "m.onnx", external=True)
    os.unlink(str(p) + ".data")
    return ["check", str(p)]


def short_external_data(d: Path) -> list[str]:
    p = save(small_model(), d / "m.onnx", external=True)
    Path(str(p) + ".data").write_bytes(b"\0" * 8)
    return ["check", str(p)]


def escaping_external_data(d: Path) -> list[str]:
    m = small_model()
    onnx.external_data_helper.convert_model_to_external_data(m, location="../outside.bin", size_threshold=0)
    (d.parent / "outside.bin").write_bytes(b"\0" * 64)
    (d / "m.onnx").write_bytes(m.SerializeToString())
    return ["check", str(d / "m.onnx")]


def missing_model(d: Path) -> list[str]:
    return ["check", str(d / "nosuch.onnx")]


def npz(d: Path, name: str = "in.npz", **arrays) -> Path:
    arrays = arrays or {"x": np.ones((2, 8), np.float32)}
    np.savez(d / name, **arrays)
    return d / name


def model_and(d: Path, *extra: str, command: str = "check") -> list[str]:
    return [command, str(save(small_model(), d / "m.onnx")), *extra]


def corrupt_npz(d: Path) -> list[str]:
    (d / "in.npz").write_bytes(b"PK\x03\x04 broken zip" * 5)
    return model_and(d, "--inputs", str(d / "in.npz"))


def npz_member_not_npy(d: Path) -> list[str]:
    with zipfile.ZipFile(d / "in.npz", "w") as z:
        z.writestr("x.npy", b"plain text, no npy header")
    return model_and(d, "--inputs", str(d / "in.npz"))


def npz_pickled(d: Path) -> list[str]:
    np.savez(d / "in.npz", x=np.array([{"a": 1}], dtype=object))
    return model_and(d, "--inputs", str(d / "in.npz"))


def nested_json(d: Path) -> list[str]:
    (d / "in.json").write_text("[" * 100000 + "]" * 100000)
    return model_and(d, "--inputs", str(d / "in.json"))


def json_not_feeds(d: Path) -> list[str]:
    (d / "in.json").write_text(json.dumps({"x": [1, 2, 3]}))
    return model_and(d, "--inputs", str(d / "in.json"))


def nonfinite_inputs(kind: float):
    def build(d: Path) -> list[str]:
        x = np.ones((2, 8), np.float32)
        x[1, 3] = kind
        return model_and(d, "--inputs", str(npz(d, x=x)))
    return build


def zero_size_npz(d: Path) -> list[str]:
    m = small_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    save(m, d / "m.onnx")
    return ["check", str(d / "m.onnx"), "--inputs", str(npz(d, x=np.ones((0, 8), np.float32)))]


def huge_shape(d: Path) -> list[str]:
    m = small_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    save(m, d / "m.onnx")
    return ["check", str(d / "m.onnx"), "--shape", "x:99999999999x8"]


def wrong_dtype_npz(d: Path) -> list[str]:
    return model_and(d, "--inputs", str(npz(d, x=np.ones((2, 8), np.float64))))


def unknown_input_npz(d: Path) -> list[str]:
    return model_and(d, "--inputs", str(npz(d, x=np.ones((2, 8), np.float32), nosuch=np.ones(3, np.float32))))


def empty_inputs_folder(d: Path) -> list[str]:
    (d / "calib").mkdir()
    return model_and(d, "--inputs", str(d / "calib"))


def fix_args(*extra: str):
    def build(d: Path) -> list[str]:
        return [*model_and(d, command="fix"), "-o", str(d / "out" / "f.onnx"), *extra]
    return build


def out_is_external_data(d: Path) -> list[str]:
    p = save(small_model(), d / "m.onnx", external=True)
    return ["fix", str(p), "-o", str(p) + ".data"]


def out_data_is_input_data(d: Path) -> list[str]:
    """-o out.onnx would write out.onnx.data: that is the input's external-data file."""
    m = small_model()
    onnx.save_model(m, str(d / "m.onnx"), save_as_external_data=True, location="f.onnx.data", size_threshold=0)
    return ["fix", str(d / "m.onnx"), "-o", str(d / "f.onnx"), "--emit", "fp32"]


def out_is_input(how: str):
    def build(d: Path) -> list[str]:
        p = save(small_model(), d / "m.onnx")
        if how == "symlink":
            (d / "out" / "link.onnx").symlink_to(p)
            target = d / "out" / "link.onnx"
        elif how == "hardlink":
            os.link(p, d / "out" / "hard.onnx")
            target = d / "out" / "hard.onnx"
        elif how == "dotdot":
            target = d / "out" / ".." / "m.onnx"
        else:
            target = p
        return ["fix", str(p), "-o", str(target)]
    return build


def report_is(where: str):
    def build(d: Path) -> list[str]:
        p = save(small_model(), d / "m.onnx")
        inputs = npz(d)
        target = {"output": d / "out" / "f.onnx", "model": p, "folder": d / "out", "inputs": inputs,
                  "missing": d / "nosuch" / "r.json"}[where]
        return ["fix", str(p), "-o", str(d / "out" / "f.onnx"), "--inputs", str(inputs), "--report", str(target)]
    return build


def save_inputs_is_output(d: Path) -> list[str]:
    return fix_args("--save-inputs", str(d / "out" / "f.onnx"))(d)


def output_in_inputs_folder(d: Path) -> list[str]:
    (d / "calib").mkdir()
    npz(d / "calib", "a.npz")
    return [*model_and(d, command="fix"), "--inputs", str(d / "calib"), "-o", str(d / "calib" / "f.onnx")]


def output_missing_folder(d: Path) -> list[str]:
    return [*model_and(d, command="fix"), "-o", str(d / "nosuch" / "f.onnx")]


def output_is_folder(d: Path) -> list[str]:
    return [*model_and(d, command="fix"), "-o", str(d / "out")]


def unknown_node(d: Path) -> list[str]:
    return [*model_and(d, command="fix"), "-o", str(d / "out" / "f.onnx"), "--pass", "protect-fp32", "--nodes", "scael"]



def duplicate_node_names(d: Path) -> list[str]:
    m = small_model()
    m.graph.node[1].name = "scale"
    return ["check", str(save(m, d / "m.onnx"))]


def initializer_as_input() -> onnx.ModelProto:
    """Old exporters (keep_initializers_as_inputs): the weight is also listed as a graph input."""
    m = small_model()
    m.graph.input.append(helper.make_tensor_value_info("w", F, [1, 8]))
    return m


def ir3_opset7() -> onnx.ModelProto:
    m = small_model(opset=7, ir=3)
    m.graph.input.append(helper.make_tensor_value_info("w", F, [1, 8]))  # IR 3: weights are inputs too
    return m
