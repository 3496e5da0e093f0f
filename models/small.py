"""Tiny test models, and the small graph builder every model in this package uses.

``GraphBuilder`` names nodes the way the PyTorch (TorchScript) exporter does: ``{scope}/{OpType}``, then
``{scope}/{OpType}_1``, ``_2`` ... for repeats in the same scope; a node's outputs are ``{node}_output_{k}``.
Constants become initializers (not ``Constant`` nodes), so tools that need constant axes or pads see them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["GraphBuilder", "build_cumsum_chain", "build_mlp"]

logger = logging.getLogger(__name__)

Dim = int | str


class GraphBuilder:
    """Accumulates nodes and initializers in topological order, with unique PyTorch-style names."""

    def __init__(self, opset: int = 17) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._seen: dict[str, int] = {}

    def _unique(self, base: str) -> str:
        count = self._seen.get(base, 0)
        self._seen[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def const(self, scope: str, value: np.ndarray | float | int | Sequence[int], *, name: str | None = None,
              dtype: type | None = None) -> str:
        """Add an initializer; ``name`` for weights (``conv1.weight``), else ``{scope}/Constant_k_output_0``."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        if name is None:
            name = self._unique(f"{scope}/Constant") + "_output_0"
        elif name in self._seen:
            raise ValueError(f"duplicate initializer name {name!r}")
        else:
            self._seen[name] = 1
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, scope: str, values: Sequence[int] | int) -> str:
        """An int64 constant (axes, pads, starts ...)."""
        return self.const(scope, values, dtype=np.int64)

    def op(self, scope: str, op_type: str, inputs: Sequence[str], *, n_out: int = 1,
           out_names: Sequence[str] | None = None, **attrs: object) -> str:
        """Add one node; returns its (first) output name. Use ``op_multi`` for several outputs."""
        return self.op_multi(scope, op_type, inputs, n_out=n_out, out_names=out_names, **attrs)[0]

    def op_multi(self, scope: str, op_type: str, inputs: Sequence[str], *, n_out: int = 1,
                 out_names: Sequence[str] | None = None, **attrs: object) -> list[str]:
        name = self._unique(f"{scope}/{op_type}")
        outputs = list(out_names) if out_names is not None else [f"{name}_output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs

    # Ops whose signature changed across opsets: the builder hides the difference.
    def reduce_mean(self, scope: str, x: str, axes: Sequence[int], *, keepdims: int = 1) -> str:
        if self.opset >= 18:
            return self.op(scope, "ReduceMean", [x, self.ints(scope, list(axes))], keepdims=keepdims)
        return self.op(scope, "ReduceMean", [x], axes=list(axes), keepdims=keepdims)

    def conv(self, scope: str, x: str, weight: np.ndarray, bias: np.ndarray | None, *, prefix: str,
             pad: int = 0, group: int = 1, out_name: str | None = None) -> str:
        """A Conv with PyTorch parameter names (``{prefix}.weight``/``{prefix}.bias``), stride 1."""
        k_h, k_w = weight.shape[2:]
        inputs = [x, self.const(scope, weight, name=f"{prefix}.weight")]
        if bias is not None:
            inputs.append(self.const(scope, bias, name=f"{prefix}.bias"))
        return self.op(scope, "Conv", inputs, out_names=[out_name] if out_name else None,
                       dilations=[1, 1], group=group, kernel_shape=[k_h, k_w],
                       pads=[pad, pad, pad, pad], strides=[1, 1])

    def model(self, *, graph_name: str, inputs: Sequence[tuple[str, Sequence[Dim]]],
              outputs: Sequence[tuple[str, Sequence[Dim]]], doc: str = "") -> onnx.ModelProto:
        """Assemble a float32-I/O model; the IR version is the lowest that carries ``opset``."""
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs],
            initializer=self.initializers, doc_string=doc,
        )
        opset_ids = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opset_ids, producer_name="onnx-fp16-rewrite.models",
                                  ir_version=helper.find_min_ir_version_for(opset_ids))
        logger.debug("built %s: %d nodes, %d initializers, opset %d", graph_name, len(self.nodes),
                     len(self.initializers), self.opset)
        return model


def build_cumsum_chain(*, length: int = 4096, scale: float = 1.0, opset: int = 17) -> onnx.ModelProto:
    """``x[1,length] -> Mul(scale) -> CumSum(axis 1) -> Div(length) -> y``: a running mean.

    The CumSum output reaches about ``length * scale * mean(x)``; with U(0,1) inputs it passes 65504 (FP16 max)
    once ``length * scale / 2 > 65504``, e.g. ``length=4096, scale=64``. The output itself stays near ``scale/2``.
    """
    b = GraphBuilder(opset)
    h = b.op("", "Mul", ["x", b.const("", np.float32(scale))])
    h = b.op("", "CumSum", [h, b.ints("", 1)])
    b.op("", "Div", [h, b.const("", np.float32(length))], out_names=["y"])
    return b.model(graph_name="cumsum_chain", inputs=[("x", [1, length])], outputs=[("y", [1, length])],
                   doc=f"running mean over {length} values, scaled by {scale}")


def build_mlp(*, in_features: int = 16, hidden: int = 32, out_features: int = 8, seed: int = 0,
              opset: int = 17) -> onnx.ModelProto:
    """``x[1,16] -> MatMul+Add -> Relu -> MatMul -> y``: small weights, never near FP16 limits (a clean model)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    w1 = rng.uniform(-1, 1, (in_features, hidden)) / np.sqrt(in_features)
    w2 = rng.uniform(-1, 1, (hidden, out_features)) / np.sqrt(hidden)
    h = b.op("/fc1", "MatMul", ["x", b.const("/fc1", w1, name="fc1.weight")])
    h = b.op("/fc1", "Add", [h, b.const("/fc1", rng.uniform(-0.1, 0.1, hidden), name="fc1.bias")])
    h = b.op("/act", "Relu", [h])
    b.op("/fc2", "MatMul", [h, b.const("/fc2", w2, name="fc2.weight")], out_names=["y"])
    return b.model(graph_name="mlp", inputs=[("x", [1, in_features])], outputs=[("y", [1, out_features])])
