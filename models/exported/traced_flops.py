"""An independent FLOP count on traced shapes: the yardstick for the tool's printed FP16 FLOP fraction.

Every main-graph tensor is made a graph output and the model is run once in ONNX Runtime, so each node's input
and output shapes are the real ones (no shape inference, no symbolic dims). FLOPs per node, deliberately simple
and written apart from ``onnx_fp16_rewrite.analysis.flops``:

- Conv / ConvTranspose: 2 * output elements * (C_in / group) * kernel elements
- MatMul / Gemm: 2 * output elements * contracted length; Einsum: 2 * product of all index sizes
- everything else with a float output: one per output element (elementwise, normalisation, reductions count
  their input elements instead)

Nodes without a float output (shape arithmetic, index math ending in ints) count on neither side. Control flow is
not looked into: an If/Loop/Scan counts one FLOP per output element, its bodies nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

__all__ = ["trace", "traced_flops", "traced_fp16_fraction"]

_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare",
               "ReduceLogSumExp", "Softmax", "LogSoftmax", "CumSum", "LayerNormalization", "GroupNormalization",
               "InstanceNormalization", "BatchNormalization", "RMSNormalization", "GlobalAveragePool",
               "AveragePool", "MaxPool", "GlobalMaxPool"}


def trace(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every main-graph tensor's value on ``feed`` (ORT CPU, graph optimisations off)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in known:
                m.graph.output.append(helper.ValueInfoProto(name=out))
                known.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    values = dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted})))
    values.update(feed)
    values.update({i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer})
    return values


def _node_flops(node: onnx.NodeProto, shape: dict[str, tuple[int, ...]]) -> float:
    ins = [shape.get(i) for i in node.input]
    out = shape.get(node.output[0], ())
    n_out = float(np.prod(out)) if out else 1.0
    op = node.op_type
    if op == "Conv" and ins[1] is not None:  # weight [C_out, C_in/group, k...]
        return 2.0 * n_out * float(np.prod(ins[1][1:]))
    if op == "ConvTranspose" and ins[1] is not None:  # each input element scatters into C_out/group * k outputs
        return 2.0 * float(np.prod(ins[0])) * float(np.prod(ins[1][1:]))
    if op == "MatMul" and ins[0]:
        return 2.0 * n_out * ins[0][-1]
    if op == "Gemm" and ins[0]:
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return 2.0 * n_out * (ins[0][0] if trans_a else ins[0][-1])
    if op == "Einsum":
        eq = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
        sizes: dict[str, int] = {}
        for term, s in zip(eq.split("->")[0].split(","), ins):
            for label, dim in zip(term.replace("...", ""), (s or ())[-len(term.replace("...", "")):]):
                sizes[label] = dim
        return 2.0 * float(np.prod(list(sizes.values()))) if sizes else n_out
    if op in _REDUCTIONS and ins and ins[0] is not None:
        return float(np.prod(ins[0])) if ins[0] else 1.0
    return n_out


def traced_flops(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, tuple[float, bool]]:
    """Node name -> (FLOPs on the traced shapes, whether the node has a float output). Unnamed nodes get
    ``<op>_<index>``."""
    values = trace(model, feed)
    shape = {k: tuple(np.shape(v)) for k, v in values.items()}
    result: dict[str, tuple[float, bool]] = {}
    for i, node in enumerate(model.graph.node):
        is_float = any(o in values and np.asarray(values[o]).dtype.kind == "f" for o in node.output if o)
        result[node.name or f"{node.op_type}_{i}"] = (_node_flops(node, shape), is_float)
    return result


def traced_fp16_fraction(model: onnx.ModelProto, feed: dict[str, np.ndarray], fp32_nodes: set[str]) -> float:
    """Share of traced float FLOPs in nodes that are not in ``fp32_nodes`` (a weakly typed model's plan)."""
    fp16 = total = 0.0
    for name, (flops, is_float) in traced_flops(model, feed).items():
        if is_float:
            total += flops
            fp16 += 0.0 if name in fp32_nodes else flops
    return fp16 / total if total else 0.0
