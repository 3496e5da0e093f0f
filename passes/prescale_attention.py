"""prescale-attention: keep attention logits, softmax and mask fills inside FP16 range.

Three rewrites, applied in this order:
1. ``MatMul(q, kT) -> Div(sqrt(d))`` (or ``Mul(1/sqrt(d))``): the raw product is ``sqrt(d)`` times larger than the
   logits and can pass 65504 while the logits fit. The scale moves onto q before the MatMul (or, with ``split_qk``,
   ``sqrt`` of it onto each of q and kT). MatMul is bilinear, so this is exact when the factor is a power of two
   (head size 64 -> 1/8). Otherwise (head size 32) only its power-of-two part moves and the rest, in [1, 2), stays
   after the MatMul: still exact, and the product is at most 2x the logits (``full_move``: rounding-level).
   The scale may be a tensor computed from constants (``torch.full([], v.size(-1) ** 0.5)``): it is folded.
2. Softmax written as ``Exp -> ReduceSum -> Div`` without subtracting the row maximum overflows FP16 once a logit
   passes 11.09 (exp(11.1) > 65504). It becomes ``Softmax`` (``softmax="fuse"``; TensorRT's softmax subtracts the
   max) or gets the max subtracted in place (``softmax="max-subtract"``).
3. Mask fills of ``finfo(float32).min`` (or anything below -65504) in a constant added to the logits, or chosen by
   a ``Where``, become ``-F``, a value representable in FP16: with F > 2*|logits| + 128 every masked logit stays
   more than 128 below its row's maximum, where FP32 ``exp`` is already 0 (ORT clamps its argument at -103.97),
   so the softmax is bit-identical; and |logit - F| stays below 65504. F comes from the measured logit range.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.patterns.norm_patterns import (
    const_value,
    consumers,
    measured_absmax,
    other_input,
    reduce_axes,
    remove_nodes,
    scalar,
    sole_consumer,
)
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX
from onnx_fp16_rewrite.pipeline.graph_edit import NameSource
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

# exp(x) is 0 in FP32 for x < -103.97 (ORT clamps there); masked logits are kept this far below the row maximum.
EXP_ZERO_MARGIN = 128.0


class PrescaleAttention(Pass):
    name = "prescale-attention"
    summary = "scale q before q.kT, make softmax max-subtracted, and mask fills FP16-representable (exact)"
    auto_cost = 15  # bit-exact, no extra FLOPs; before rescale-residual

    def __init__(
        self,
        *,
        split_qk: bool = False,
        softmax: str = "fuse",
        fix_masks: bool = True,
        full_move: bool = False,
        nodes: Sequence[str] = (),
    ) -> None:
        """``split_qk``: scale q and kT by the square root of the factor each instead of q alone (for a q that
        is itself near the FP16 limit; not exact). ``softmax``: ``fuse`` (-> Softmax), ``max-subtract`` or
        ``keep``. ``full_move``: move a scale that is not a power of two onto q whole (rounding-level) instead of
        only its power-of-two part (exact; the rest, in [1, 2), stays after the MatMul). ``nodes``: only the sites
        whose MatMul / Exp / mask node has one of these names."""
        if softmax not in ("fuse", "max-subtract", "keep"):
            raise BadInputError(f"prescale-attention: softmax must be fuse, max-subtract or keep, got {softmax!r}")
        self.split_qk = split_qk
        self.softmax = softmax
        self.fix_masks = fix_masks
        self.full_move = full_move
        self.nodes = tuple(nodes)

    def _wanted(self, node: gs.Node) -> bool:
        return not self.nodes or node.name in self.nodes

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        self._names = NameSource(graph)  # every new node/tensor name unique, also across sites sharing a scope
        outputs = {t.name for t in graph.outputs}
        for node in list(graph.nodes):
            if node.op == "MatMul" and self._wanted(node):
                self._move_scale(graph, node, outputs, result)
        if self.softmax != "keep":
            for node in list(graph.nodes):
                if node.op == "Exp" and self._wanted(node):
                    self._softmax(graph, node, outputs, result)
        if self.fix_masks:
            absmax = None
            for node in list(graph.nodes):
                if node.op in ("Add", "Where") and self._wanted(node) and _fill_input(node) is not None:
                    absmax = absmax if absmax is not None else measured_absmax(ctx, graph)
                    self._fix_fill(node, absmax, result)
        if not result.rewritten and not result.skipped:
            result.skipped.append(Site("-", "-", "no scaled q.kT MatMul, decomposed softmax or mask fill found"))
        result.modified = bool(result.rewritten)
        return result

    def _move_scale(self, graph: gs.Graph, mm: gs.Node, outputs: set[str], result: PassResult) -> None:
        a, b = mm.inputs
        if const_value(a) is not None or const_value(b) is not None:
            return  # a projection with weights, not q.kT
        scale = sole_consumer(mm.outputs[0], ("Div", "Mul"), outputs)
        if scale is None or (scale.op == "Div" and scale.inputs[0] is not mm.outputs[0]):
            result.skipped.append(Site(mm.name, "MatMul", "activation MatMul not followed by a scalar Div/Mul "
                                                          "(no attention scale to move)"))
            return
        constant = other_input(scale, mm.outputs[0])  # Mul may hold its constant first
        c = scalar(constant)
        factor = None if c is None or c == 0 else (1.0 / c if scale.op == "Div" else c)
        if factor is None or not 0 < factor < 1:
            result.skipped.append(Site(mm.name, "MatMul", f"{scale.op} by {c} does not shrink the product"))
            return
        scope = scale.name.rsplit("/", 1)[0] if "/" in scale.name else scale.name
        if self.split_qk:
            root = np.float32(math.sqrt(factor))
            root_const = gs.Constant(self._names(f"{mm.outputs[0].name}/prescale.root"), np.asarray(root))
            for i, t in enumerate((a, b)):
                moved = gs.Variable(self._names(f"{t.name}/prescaled"), dtype=np.float32)
                graph.nodes.append(gs.Node("Mul", self._names(f"{scope}/prescale/Mul_{i}"), inputs=[t, root_const],
                                           outputs=[moved]))
                mm.inputs[i] = moved
            how, exact = f"q and kT each by {float(root):.6g}", _power_of_two(float(root))
        elif not _power_of_two(factor) and not self.full_move:
            # Head size 32: 1/sqrt(32) = 2^-3 * 1.414. Only the power of two moves onto q (exact); the rest stays
            # after the MatMul as the same kind of node: fl(fl(2^-3 P) * (8 c)) == fl(P * c), bit for bit.
            e = math.ceil(-math.log2(factor))
            moved = gs.Variable(self._names(f"{a.name}/prescaled"), dtype=np.float32)
            graph.nodes.append(gs.Node("Mul", self._names(f"{scope}/prescale/Mul"), inputs=[
                a, gs.Constant(self._names(f"{scope}/prescale.pow2"), np.asarray(2.0**-e, np.float32))],
                outputs=[moved]))
            mm.inputs[0] = moved
            rest = np.float32(np.float32(c) * np.float32(2.0**-e if scale.op == "Div" else 2.0**e))
            scale.inputs[[i for i, x in enumerate(scale.inputs) if x is constant][0]] = gs.Constant(
                self._names(f"{constant.name}_rest"), np.asarray(rest, np.float32).reshape(np.shape(const_value(constant))))
            result.rewritten.append(Site(mm.name, "MatMul", f"moved the power-of-two part of the attention scale "
                                                            f"before the MatMul (q by 2^-{e}; {scale.op} {float(rest):.6g}"
                                                            f" stays after it): exact"))
            return
        else:
            moved = gs.Variable(self._names(f"{a.name}/prescaled"), dtype=np.float32)
            graph.nodes.append(gs.Node(scale.op, self._names(f"{scope}/prescale/{scale.op}"), inputs=[a, constant],
                                       outputs=[moved]))
            mm.inputs[0] = moved
            how, exact = f"q by {scale.op} {c:.6g}", _power_of_two(factor)
        logits = scale.outputs[0]
        remove_nodes(graph, [scale])
        mm.outputs[0] = logits
        result.rewritten.append(Site(mm.name, "MatMul", f"moved the attention scale before the MatMul ({how}): "
                                                        f"{'exact (power of two)' if exact else 'rounding-level'}"))

    def _softmax(self, graph: gs.Graph, exp: gs.Node, outputs: set[str], result: PassResult) -> None:
        x, e = exp.inputs[0], exp.outputs[0]
        readers = consumers(e)
        total = next((n for n in readers if n.op == "ReduceSum"), None)
        div = next((n for n in readers if n.op == "Div"), None)
        if len(readers) != 2 or total is None or div is None or e.name in outputs:
            return  # an Exp that is not a softmax numerator
        axes = reduce_axes(total)
        if sole_consumer(total.outputs[0], "Div", outputs) is not div or div.inputs[0] is not e or axes != [-1]:
            result.skipped.append(Site(exp.name, "Exp", "Exp/ReduceSum/Div is not a last-axis softmax"))
            return
        producer = x.inputs[0] if x.inputs else None
        if producer is not None and producer.op == "Sub" and producer.inputs[1].inputs and \
                producer.inputs[1].inputs[0].op == "ReduceMax" and producer.inputs[1].inputs[0].inputs[0] is \
                producer.inputs[0]:
            result.skipped.append(Site(exp.name, "Exp", "softmax already subtracts the row maximum"))
            return
        scope = exp.name.rsplit("/", 1)[0] if "/" in exp.name else exp.name
        if self.softmax == "fuse":
            probs = div.outputs[0]
            remove_nodes(graph, [exp, total, div])
            graph.nodes.append(gs.Node("Softmax", self._names(f"{scope}/Softmax"), {"axis": -1}, [x], [probs]))
            result.rewritten.append(Site(exp.name, "Exp", "decomposed softmax (no max subtraction) -> Softmax "
                                                          "(axis -1): rounding-level"))
            return
        peak = gs.Variable(self._names(f"{x.name}/rowmax"), dtype=np.float32)
        shifted = gs.Variable(self._names(f"{x.name}/shifted"), dtype=np.float32)
        if graph.opset >= 18:
            reduce = gs.Node("ReduceMax", self._names(f"{scope}/ReduceMax"), {"keepdims": 1},
                             [x, gs.Constant(self._names(f"{scope}/rowmax.axes"), np.array([-1], np.int64))], [peak])
        else:
            reduce = gs.Node("ReduceMax", self._names(f"{scope}/ReduceMax"), {"axes": [-1], "keepdims": 1}, [x], [peak])
        graph.nodes += [reduce, gs.Node("Sub", self._names(f"{scope}/Sub_rowmax"), inputs=[x, peak], outputs=[shifted])]
        exp.inputs[0] = shifted
        result.rewritten.append(Site(exp.name, "Exp", "subtracted the row maximum before Exp: rounding-level"))

    def _fix_fill(self, node: gs.Node, absmax: dict[str, float], result: PassResult) -> None:
        idx = _fill_input(node)
        assert idx is not None
        values = const_value(node.inputs[idx])
        fill = values < -FP16_MAX
        scores = node.inputs[2 if idx == 1 else 1] if node.op == "Where" else other_input(node, node.inputs[idx])
        if not _feeds_softmax(node.outputs[0]):
            result.skipped.append(Site(node.name, node.op, "mask fill does not flow straight into a softmax: "
                                                           "its effect there cannot be checked"))
            return
        if scores is None or scores.name not in absmax or not math.isfinite(absmax[scores.name]):
            result.skipped.append(Site(node.name, node.op, "logit range not measured: no safe fill value"))
            return
        rest = values[~fill]
        bound = absmax[scores.name] + (float(np.abs(rest).max()) if rest.size and node.op == "Add" else 0.0)
        need = 2 * bound + EXP_ZERO_MARGIN
        fill_value = 2.0 ** math.ceil(math.log2(need))
        if fill_value + bound > FP16_MAX:
            fill_value = math.floor(FP16_MAX - bound)
        if fill_value <= need:
            result.skipped.append(Site(node.name, node.op, f"logits too large (absmax {bound:.4g}) for a fill that "
                                                           "is both FP16-representable and exactly masking"))
            return
        new = np.where(fill, np.asarray(-fill_value, values.dtype), values).astype(values.dtype)
        old = node.inputs[idx]
        # A fill shared with other readers is replaced for this reader only, under its own name.
        node.inputs[idx] = gs.Constant(self._names(f"{old.name}_fp16fill"), new)
        result.rewritten.append(Site(node.name, node.op, f"mask fill {float(values[fill].min()):.4g} -> "
                                                         f"{-fill_value:g} ({int(fill.sum())} entries; logits absmax "
                                                         f"{bound:.4g}): exact (masked exp stays 0)"))


def _fill_input(node: gs.Node) -> int | None:
    """Index of a constant input holding mask fills (values below -65504), for Add and Where's branches."""
    candidates = (1, 2) if node.op == "Where" else (0, 1)
    for idx in candidates:
        if idx >= len(node.inputs):
            continue
        v = const_value(node.inputs[idx])
        if v is not None and np.issubdtype(v.dtype, np.floating) and (v < -FP16_MAX).any() \
                and np.isfinite(v).all():
            return idx
    return None


def _feeds_softmax(t: gs.Tensor) -> bool:
    """Every reader is a last-axis Softmax or the start of a decomposed one (Exp, or ReduceMax + Sub)."""
    readers = consumers(t)
    for n in readers:
        if n.op == "Softmax" and n.attrs.get("axis", -1) == -1:
            continue
        if n.op == "Exp" or (n.op == "ReduceMax" and reduce_axes(n) == [-1]):
            continue
        if n.op == "Sub" and n.inputs[0] is t:
            continue
        return False
    return bool(readers)


def _power_of_two(v: float) -> bool:
    m, _ = math.frexp(abs(v))
    return v != 0 and m == 0.5
