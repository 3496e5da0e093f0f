"""Small graphs with a known FP16 failure site, shared by the tests of the fixer's shortcuts."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def upstream_site_model() -> onnx.ModelProto:
    """x -> Mul(1e5) overflows FP16 (the site) -> y; a separate branch x -> Mul(3) -> Mul(2) -> z."""
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("big", 1e5), ("three", 3.0),
                                                                               ("two", 2.0), ("small", 1e-5))]
    nodes = [helper.make_node("Mul", ["x", "big"], ["a"], name="blow_up"),
             helper.make_node("Mul", ["a", "small"], ["y"], name="back"),
             helper.make_node("Mul", ["x", "three"], ["b"], name="branch"),
             helper.make_node("Mul", ["b", "two"], ["z"], name="branch_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 8]) for n in ("y", "z")], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
