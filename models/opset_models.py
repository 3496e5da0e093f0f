"""One small network that overflows FP16, written with the op forms of a given opset (7 to 23).

``x[1,64] -> MatMul(W1) -> Mul(h, h) (~1e5, past 65504) -> ReduceSum over the row (~6e6)
-> Div (the row's energy shares, in [0, 1]) -> Clip -> Slice -> MatMul(W2) -> y``, plus what exists
at the opset: ``CumSum`` of the energies (the cumulative share, >= 11), ``LayerNormalization``
(>= 17), ``ReduceMean`` with an axes input (>= 18), ``RMSNormalization`` (>= 23). Attribute and
input forms follow the opset: ReduceSum axes as attribute before 13, Clip min/max as attributes
before 11, Slice bounds as attributes before 10. Before IR 4 (opsets 7/8) the weights are also
graph inputs, as IR 3 requires.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OPSETS", "build_opset_model"]

OPSETS = (7, 9, 11, 13, 17, 18, 21, 23)
_D = 64


def build_opset_model(opset: int, *, seed: int = 0) -> onnx.ModelProto:
    """Input ``x`` float [1,64] (U(0,1) data overflows), output ``y`` float [1,8]."""
    if not 7 <= opset <= 23:
        raise ValueError(f"opset {opset} outside 7..23")
    rng = np.random.default_rng(seed)
    inits = {
        "W1": rng.standard_normal((_D, _D)) * 40.0,
        "W2": rng.standard_normal((_D // 2, 8)) * 0.5,
        "W3": rng.standard_normal((_D, 8)) * 0.5,
    }
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        return out

    def ints(name: str, values: list[int]) -> str:
        inits[name] = np.array(values, np.int64)
        return name

    h = node("MatMul", ["x", "W1"], "h")
    e = node("Mul", [h, h], "energy")
    if opset >= 13:
        total = node("ReduceSum", [e, ints("axes_last", [-1])], "total", keepdims=1)
    else:
        total = node("ReduceSum", [e], "total", axes=[-1], keepdims=1)
    share = node("Div", [e, total], "share")
    if opset >= 11:
        inits["lo"], inits["hi"] = np.float32(0.0), np.float32(0.5)
        clipped = node("Clip", [share, "lo", "hi"], "clipped")
    else:
        clipped = node("Clip", [share], "clipped", min=0.0, max=0.5)
    if opset >= 10:
        half = node("Slice", [clipped, ints("s0", [0]), ints("s1", [_D // 2]), ints("ax1", [1])], "half")
    else:
        half = node("Slice", [clipped], "half", starts=[0], ends=[_D // 2], axes=[1])
    y = node("MatMul", [half, "W2"], "y_main")
    if opset >= 11:
        cum = node("CumSum", [e, ints("cum_axis", [1])], "cum")
        y = node("Add", [y, node("MatMul", [node("Div", [cum, total], "cum_share"), "W3"], "y_cum")], "y_sum")
    if opset >= 17:
        inits["ln_scale"] = np.ones(8, np.float32)
        y = node("LayerNormalization", [y, "ln_scale"], "y_ln", axis=-1, epsilon=1e-5)
    if opset >= 18:
        mean = node("ReduceMean", [y, ints("axes_mean", [-1])], "y_mean", keepdims=1)
        y = node("Sub", [y, mean], "y_centred")
    if opset >= 23:
        inits["rms_scale"] = np.ones(8, np.float32)
        y = node("RMSNormalization", [y, "rms_scale"], "y_rms", axis=-1, epsilon=1e-5)
    node("Identity", [y], "y")

    tensors = [numpy_helper.from_array(np.asarray(v, np.int64 if np.asarray(v).dtype == np.int64 else np.float32), k)
               for k, v in inits.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, _D])]
    opsets = [helper.make_opsetid("", opset)]
    ir = helper.find_min_ir_version_for(opsets)
    if ir < 4:  # IR 3: every initializer must be a graph input too
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors]
    graph = helper.make_graph(nodes, f"opset{opset}", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=tensors)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir, producer_name="onnx-fp16-rewrite.models")
    onnx.checker.check_model(model, full_check=True)
    return model
