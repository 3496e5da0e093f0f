"""Whether a canonical form computes what the graph it came from does, bit for bit, proved without running.

Canonicalisation folds shape arithmetic, removes no-op Casts and specialises Shape ops to the
feeds' shapes; each step used to be validated by running the original in FP32 (an ORT session
and an inference more per ``check`` and ``fix`` of every real export). A folded tensor is taken
as the value the model computes at run time when everything on the way to it is *exact*: it
starts from constants and the shapes of tensors (``Shape``/``Size``: integers known from the
shapes the canonical form was made for) and goes through ops whose every correct implementation
gives the same bits: integer arithmetic, data movement, comparisons, and the float ops IEEE 754
rounds correctly (+ - * /, sqrt, casts; ORT runs with denormals kept). A TorchScript attention
scale ``1 / sqrt(sqrt(d))`` from ``Shape`` is such a value; ``d ** 0.5`` (Pow) is not. The folded
tensors then take the numbers of the constants that replace them, and value numbering
(``emulation.same_values``: no-op Casts and Identity seen through, Constants by value) checks
that every graph output has one number in both graphs: the same nodes on the same values. Any
other difference leaves the step to the FP32 validation run.
"""

from __future__ import annotations

import onnx

from onnx_fp16_rewrite.emulation.fp16_graph_edits import subgraphs
from onnx_fp16_rewrite.emulation.same_values import ValueNumbers
from onnx_fp16_rewrite.io.ort_runner import infer_types

_FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                     onnx.TensorProto.BFLOAT16})
_SHAPE_OF = frozenset({"Shape", "Size"})  # integer values from a tensor's shape, whatever its type
# Ops whose result any correct implementation computes bit for bit: data movement, comparisons,
# integer arithmetic, and float ops IEEE 754 rounds correctly. (Pow, Exp, Log, Reciprocal: not.)
_EXACT = frozenset({
    "Add", "Sub", "Mul", "Div", "Sqrt", "Neg", "Abs", "Floor", "Ceil", "Max", "Min", "Cast", "Mod", "Sign",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where",
    "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Gather", "GatherElements", "Concat", "Slice", "Expand",
    "Tile", "Transpose", "Identity", "Range", "ConstantOfShape", "Constant", "ReduceMax", "ReduceMin",
})


def different_computation(before: onnx.ModelProto, after: onnx.ModelProto) -> str | None:
    """None when ``after`` (a canonicalisation step's result) provably computes every output of
    ``before`` bit for bit on feeds of the shapes it was made for; else why that is not proved."""
    if any(subgraphs(n) for g in (before.graph, after.graph) for n in g.node):
        return "control flow"
    outputs = [o.name for o in before.graph.output]
    if outputs != [o.name for o in after.graph.output]:
        return "the outputs differ"
    try:
        types, _ = infer_types(before)
        types_after, _ = infer_types(after)
    except Exception as exc:  # shape inference refuses the graph: nothing is proved
        return f"types unknown ({type(exc).__name__})"
    producer = {o: n for n in before.graph.node for o in n.output if o}
    inits = {t.name: t for t in before.graph.initializer}
    exact: dict[str, bool] = {}
    # Tensors ``before`` computes and ``after`` holds as constants, exact all the way.
    folded = [t.name for t in after.graph.initializer
              if t.name in producer and _exact_all_the_way(t.name, producer, inits, types, exact)]
    # First with weights known by type and shape only (no weight read): most differences show
    # there; then with every weight's values.
    for numbers in (ValueNumbers(coarse=True), ValueNumbers()):
        got = numbers.number(after, types=types_after)
        if got is None:
            return "random ops"
        want = numbers.number(before, given={name: got[name] for name in folded}, types=types)
        if want is None:
            return "random ops"
        differ = next((o for o in outputs if want.get(o) is None or want.get(o) != got.get(o)), None)
        if differ is not None:
            return f"output {differ!r} is computed differently"
    return None


def _exact_all_the_way(name: str, producer: dict, inits: dict, types: dict[str, int],
                       memo: dict[str, bool]) -> bool:
    """Whether ``name`` is computed only by exact ops (``_EXACT``) from constants and tensor
    shapes: no graph input's values and no op whose result depends on its implementation."""
    stack = [(name, False)]
    while stack:  # post-order, iterative: export shape chains run deep
        t, inputs_done = stack.pop()
        if t in memo:
            continue
        node = producer.get(t)
        if inputs_done:
            memo[t] = all(memo.get(i, False) for i in node.input if i)
        elif node is None:
            memo[t] = t in inits  # a weight; a graph input's values are data
        elif node.domain not in ("", "ai.onnx"):
            memo[t] = False
        elif node.op_type in _SHAPE_OF:
            memo[t] = True
        elif node.op_type not in _EXACT or types.get(t) is None or (node.op_type == "Range" and types[t] in _FLOATS):
            memo[t] = False  # (a float Range accumulates its delta: implementations round differently)
        else:
            stack.append((t, True))
            stack.extend((i, False) for i in node.input if i and i not in memo)
    return memo.get(name, False)


__all__ = ["different_computation"]
