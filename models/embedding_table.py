"""The network around a large embedding table, shared by the >2 GB benchmark and its test.

An embedding Gather (the large weight), a MatMul and a normalisation whose sum of squares
overflows FP16, so the automatic fix has something to pin.
"""

from __future__ import annotations

from onnx import helper


def table_nodes() -> list:
    """ids -> Gather(table) -> MatMul(w) -> x / sqrt(sum(x * x)) -> y; reads ``table``, ``w``, ``axes``."""
    return [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
        helper.make_node("MatMul", ["emb", "w"], ["h"], name="matmul"),
        helper.make_node("Mul", ["h", "h"], ["sq"], name="square"),
        helper.make_node("ReduceSum", ["sq", "axes"], ["ss"], name="sumsq", keepdims=1),
        helper.make_node("Sqrt", ["ss"], ["norm"], name="sqrt"),
        helper.make_node("Div", ["h", "norm"], ["y"], name="normalize"),
    ]
