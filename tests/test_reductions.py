"""Whole-tensor reductions: two steps for large tensors (spread over threads), one for small ones."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnx_fp16_rewrite.emulation.reductions import ONE_STEP_BELOW, two_step
from onnx_fp16_rewrite.io.ort_runner import run_model


@pytest.mark.parametrize("shape", [(64, 256), (4, 256, 512)])
def test_small_tensors_reduce_in_one_step_large_in_two(shape):
    size = int(np.prod(shape))
    nodes = [helper.make_node(op, ["x"], [op], name=op, keepdims=0) for op in ("ReduceMax", "ReduceMin", "ReduceSum")]
    inits = []
    out = two_step(nodes, {"x": len(shape)}, 17, inits, size)
    assert len(out) == (3 if size < ONE_STEP_BELOW else 6)
    graph = helper.make_graph(out, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(n.op_type, TensorProto.FLOAT, []) for n in nodes], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = run_model(model, [{"x": x}])[0]
    assert got["ReduceMax"] == x.max() and got["ReduceMin"] == x.min()  # exact in any order
    assert abs(float(got["ReduceSum"]) - float(x.astype(np.float64).sum())) < 1e-4 * np.abs(x).sum()
    # Unknown size: two steps, as before sizes were known.
    assert len(two_step(nodes, {"x": len(shape)}, 17, [])) == 6
