"""Canonicalisation of models whose weights are references (io.weights): shared before the
analysis copies them, or read from a model file past LARGE_TENSOR_BYTES. graphsurgeon's folds read
their arrays (weights.load_refs) and give what the same model with its weights in the proto gives."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fp16_rewrite.canonical import canonicalize
from onnx_fp16_rewrite.io.ort_runner import run_model


def test_shared_weights_fold_as_in_proto_ones():
    """fix shares the weights before canonicalising (one buffer, cheap copies): a fold that reads a
    weight (GPT-2's position table gathered at positions from the input's shape) folds the same,
    and the canonical model's bytes are those of the unshared run (io.weights.load_refs)."""
    from onnx_fp16_rewrite.io import weights as w

    rng = np.random.default_rng(0)
    wpe = onnx.numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "wpe")
    wte = onnx.numpy_helper.from_array(rng.standard_normal((100, 16)).astype(np.float32), "wte")
    consts = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for v, n in ((1, "one"), (0, "zero"))]
    nodes = [
        onnx.helper.make_node("Shape", ["ids"], ["shape"], name="shape"),
        onnx.helper.make_node("Gather", ["shape", "one"], ["n"], name="n", axis=0),
        onnx.helper.make_node("Range", ["zero", "n", "one"], ["pos"], name="pos"),
        onnx.helper.make_node("Gather", ["wpe", "pos"], ["pe"], name="pe", axis=0),
        onnx.helper.make_node("Gather", ["wte", "ids"], ["te"], name="te", axis=0),
        onnx.helper.make_node("Add", ["te", "pe"], ["y"], name="add"),
    ]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32, 16])], [wpe, wte, *consts])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    feeds = [{"ids": rng.integers(0, 100, (1, 32)).astype(np.int64)}]
    plain, plain_report = canonicalize(model, feeds)
    shared = w.share(model)
    assert w.is_ref(next(t for t in shared.graph.initializer if t.name == "wpe"))
    folded, report = canonicalize(shared, feeds)
    assert [n.op_type for n in plain.graph.node] == ["Gather", "Add"]  # the position gather folded
    assert w.unshare(folded).SerializeToString() == plain.SerializeToString()
    assert report.summary() == plain_report.summary()
    w.release(shared, model)


def test_a_large_weight_read_from_its_file_folds_as_in_memory(tmp_path):
    """A weight past LARGE_TENSOR_BYTES stays a reference to the model's file (io.weights); a
    Transpose of it folds as it does for the same model in memory (graphsurgeon's fold reads the
    reference's array: weights.load_refs; before, ORT could not read it and the fold was skipped),
    and the folded model computes the same outputs."""
    from onnx_fp16_rewrite.io import weights as w
    from onnx_fp16_rewrite.io.model_io import load_model

    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((48, 64)).astype(np.float32), "W")
    nodes = [onnx.helper.make_node("Transpose", ["W"], ["WT"], name="t", perm=[1, 0]),
             onnx.helper.make_node("MatMul", ["x", "WT"], ["y"], name="mm")]
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 48])], [weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    loaded = load_model(tmp_path / "m.onnx", large_tensor_bytes=1024)
    assert w.is_ref(loaded.graph.initializer[0])
    feeds = [{"x": rng.standard_normal((2, 64)).astype(np.float32)}]
    in_memory, _ = canonicalize(model, feeds)
    from_file, report = canonicalize(loaded, feeds)
    assert [n.op_type for n in from_file.graph.node] == [n.op_type for n in in_memory.graph.node] == ["MatMul"]
    assert report.folded == 1
    np.testing.assert_array_equal(run_model(from_file, feeds)[0]["y"], run_model(model, feeds)[0]["y"])
