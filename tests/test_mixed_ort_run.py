"""The mixed model's ORT run on its own thread: the same numbers as run in line, its failures
raised to the caller, and the caller free to edit its model meanwhile."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.emit.mixed_ort_run import MixedOrtRun, mixed_ort_error
from onnx_fp16_rewrite.emit.mixed_precision import to_mixed_precision
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.io.ort_runner import run_model


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Tanh", ["h"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_thread_gives_the_in_line_numbers_while_the_caller_edits_its_model():
    model = _model()
    feeds = [{"x": np.random.default_rng(i).standard_normal((8, 64)).astype(np.float32) * 0.1} for i in range(2)]
    reference = run_model(model, feeds)
    mixed, _ = to_mixed_precision(model, PrecisionPlan(), keep_io_types=False)
    run = MixedOrtRun(mixed, feeds, reference)
    for node in mixed.graph.node:  # what fix's annotation does meanwhile
        node.doc_string = "edited while the run goes on"
    got = run.result()
    want = mixed_ort_error(mixed, feeds, reference)
    assert [(e.output, e.max_abs_error, e.rel_l2) for e in got] == [(e.output, e.max_abs_error, e.rel_l2) for e in want]
    # FP16 weights and activations: a real, small error (not 0: the run was FP16).
    assert 1e-5 < got[0].rel_l2 < 1e-2


def test_a_failing_run_raises_in_the_callers_thread():
    model = _model()
    mixed, _ = to_mixed_precision(model, PrecisionPlan(), keep_io_types=False)
    run = MixedOrtRun(mixed, [{"x": np.zeros((8, 65), np.float32)}], [{"y": np.zeros((8, 64), np.float32)}])
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        run.result()
