"""Small helpers over ONNX op schemas and Constant nodes."""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper, numpy_helper


def fixed_type_inputs(node: onnx.NodeProto, opset: int) -> set[int]:
    """Indices of the node's inputs whose schema type is fixed (e.g. Resize ``scales`` is
    ``tensor(float)``), not a type variable: such inputs are parameters, never FP16 data."""
    formals = _formal_inputs(node.op_type, node.domain or "", opset)
    if formals is None:
        return set()
    fixed = set()
    for idx in range(len(node.input)):
        if not formals:
            break
        type_str, variadic = formals[min(idx, len(formals) - 1)]
        if idx >= len(formals) and not variadic:
            break
        if type_str.startswith("tensor(") or type_str.startswith("seq("):
            fixed.add(idx)
    return fixed


@functools.lru_cache(maxsize=None)
def _formal_inputs(op_type: str, domain: str, opset: int) -> tuple[tuple[str, bool], ...] | None:
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return tuple((p.type_str, p.option == variadic) for p in schema.inputs)


def inline_constants(graph: onnx.GraphProto) -> int:
    """Turn Constant nodes into initializers (weights are what an engine clamps and converts);
    returns how many were turned."""
    keep, count = [], 0
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            keep.append(node)
            continue
        attr = node.attribute[0]
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            arr = numpy_helper.to_array(value)
        elif attr.name in ("value_float", "value_floats"):
            arr = np.array(value, dtype=np.float32)
        elif attr.name in ("value_int", "value_ints"):
            arr = np.array(value, dtype=np.int64)
        else:  # sparse or string constants are left alone
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        count += 1
    del graph.node[:]
    graph.node.extend(keep)
    return count
