"""box-filter: replace integral-image window sums by forms whose values never grow past the window.

An integral image (prefix sums over H and W, then ``s4 + s1 - s2 - s3`` at four window corners)
costs O(1) per pixel but its values grow to H*W*mean: NAFNet's TLC pooling at 512x512 reaches
3e5, past FP16's 65504, and even where it fits (a 17x17 guided filter at 224x224: ~2.5e4) FP16
keeps only ~3 digits of numbers that are then cancelled down to a small window sum. Rescaling
does not help (the cancellation stays); changing the *shape* of the sum does. The box is
separable, so each summed axis becomes a 1-D window sum, in one of three forms (``window_form``;
``auto``: per axis, the cheapest allowed one by estimated FLOPs, ``onnx_fp16_rewrite.analysis.flops`` rules):
- ``blocked``: prefix sums restarted every ``k`` (= window) elements; a window is the suffix of one
  block plus a prefix of the next (``T_b - E_b[t] + E_{b+1}[t]``), so no value exceeds a block sum.
  O(1) per element. All its CumSums scan axis 1 of a rank-3 view, so a graph with several of them
  never has CumSums on different axes (TensorRT 10.8-10.11 #4551).
- ``prefix``: a 1-D prefix sum along the axis and one difference; values grow to ``L/k`` times a
  window sum, so it is allowed only while that growth is at most ``max_growth`` (NAFNet: 512/384).
- ``pool``: AveragePool with a ``k x 1`` kernel (O(k) per element; best for small windows).
A following constant Div/Mul (NAFNet's ``/ (k1*k2)``, a guided filter's ``/ N``) is folded in as a
``1/k`` per axis, so intermediate values are bounded by max|x| times a small factor; the scale goes
before the scan when the measured input range times ``k`` exceeds ``max_partial``, else after it
(so small inputs do not become FP16 subnormals).
Recognised: a chain of zero-Pads and non-exclusive, non-reverse CumSums over distinct axes (pads
before or, leading only, after the sums: NAFNet's TLC form and the zero-pad-first guided-filter
form), read only by constant step-1 Slices whose Add/Sub/Neg combination is exactly a box's corners.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.analysis.flops import node_flops, tensor_shapes
from onnx_fp16_rewrite.pipeline.graph_edit import Emitter, carry_pins
from onnx_fp16_rewrite.patterns.integral_image import IntegralWindow, WindowAxis, match_integral_window
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext

logger = logging.getLogger(__name__)

WindowForm = Literal["auto", "blocked", "prefix", "pool"]
_FORMS = ("auto", "blocked", "prefix", "pool")


class BoxFilter(Pass):
    name = "box-filter"
    summary = "replace integral-image window sums (CumSum + corner differences) by in-range blocked sums or pooling"
    auto_cost = 20  # changes the graph's shape: tried after the bit-exact rescaling

    def __init__(self, *, window_form: WindowForm = "auto", max_growth: float = 4.0, max_partial: float = 4096.0,
                 max_flop_ratio: float = 3.0) -> None:
        """``window_form``: ``auto`` picks per axis the cheapest form whose values stay within
        ``max_growth`` times a window sum; ``max_partial``: the largest partial sum allowed before
        the 1/k scale moves in front of the scan; ``max_flop_ratio``: skip a site whose rewrite would
        cost more than this times the integral image's FLOPs."""
        if window_form not in _FORMS:
            raise BadInputError(f"box-filter: window_form must be one of {', '.join(_FORMS)}, got {window_form!r}")
        if max_growth < 1 or max_partial <= 0 or max_flop_ratio <= 0:
            raise BadInputError("box-filter: max_growth must be >= 1, max_partial and max_flop_ratio > 0")
        self.window_form = window_form
        self.max_growth = float(max_growth)
        self.max_partial = float(max_partial)
        self.max_flop_ratio = float(max_flop_ratio)

    def nothing_to_do(self, model: onnx.ModelProto) -> PassResult | None:
        return None if any(n.op_type == "CumSum" for n in model.graph.node) else PassResult(modified=False)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # The window sums' values stay (up to rounding): every other tensor keeps its value and range.
        result = PassResult(modified=False, rounding_only=True)
        cumsums = [n for n in graph.nodes if n.op == "CumSum"]
        if cumsums and graph.opset < 13:
            result.skipped += [Site(n.name, n.op, f"opset {graph.opset} < 13 (the new forms need ReduceSum "
                                    "with axes as an input)") for n in cumsums]
            return result
        graph.toposort()
        shapes, types = tensor_shapes(ctx.model)
        flops = node_flops(ctx.model)
        seen: set[str] = set()
        shared: dict[bytes, gs.Constant] = {}  # equal final scales (a guided filter's k^2/N) stored once
        for node in cumsums:
            if node.name in seen:
                continue
            match = match_integral_window(node, graph, shapes, seen)
            if isinstance(match, str):
                result.skipped.append(Site(node.name, node.op, match))
                continue
            if types.get(match.x.name) != onnx.TensorProto.FLOAT:
                result.skipped.append(Site(node.name, node.op, "not a FLOAT window sum (run before --emit mixed)"))
                continue
            before = sum(flops.get(n.name, 0.0) for n in match.nodes)
            plan = self._plan(match, graph.opset, _input_absmax(match.x, ctx))
            cost = plan.cost
            if before > 0 and cost / before > self.max_flop_ratio:
                result.skipped.append(Site(node.name, node.op, f"{match.describe()}: cheapest rewrite costs "
                                           f"{cost / before:.2f}x the integral image's FLOPs "
                                           f"(> max_flop_ratio {self.max_flop_ratio:g})"))
                continue
            new_nodes = plan.apply(graph, match, node.name + "/box_filter", shared)
            pinned = carry_pins(ctx.plan, [n.name for n in match.nodes], new_nodes)
            logger.debug("box-filter %s: %s, %d nodes -> %d", node.name, plan.labels, len(match.nodes),
                         len(new_nodes))
            result.modified = True
            ratio = f"{cost / before:.2f}x" if before > 0 else "n/a"
            result.rewritten.append(Site(node.name, node.op, (
                f"{match.describe()} -> {', '.join(plan.labels)}; FLOPs {before:.4g} -> {cost:.4g} ({ratio})"
                + (f"; {len(pinned)} replaced nodes were pinned to FP32: the new ones are too" if pinned else ""))))
        return result

    def _plan(self, m: IntegralWindow, opset: int, bound: float) -> "_Plan":
        shape = list(m.shape)
        steps: list[Callable[[Emitter, gs.Tensor], gs.Tensor]] = []
        labels, cost, scale = [], 0.0, 1.0
        # Axes that shrink the tensor most go first: later passes then work on less data.
        for ax in sorted(m.axes, key=lambda a: a.n_out / a.length):
            candidates = []
            for form in ("pool", "prefix", "blocked") if self.window_form == "auto" else (self.window_form,):
                growth = (ax.n_out + ax.window) / ax.window if form == "prefix" else 1.0
                if self.window_form == "auto" and growth > self.max_growth:
                    continue
                scaled = m.fold is not None or form == "pool"  # pooling always gives the mean
                pre = scaled and form != "pool" and bound * ax.window * growth > self.max_partial
                build = _builder(form, shape, ax, pre, scaled)
                candidates.append((_cost(opset, shape, build), form, pre, scaled, build))
            c, form, pre, scaled, build = min(candidates, key=lambda t: t[0])
            steps.append(build)
            cost += c
            scale *= 1.0 / ax.window if scaled else 1.0
            bound *= 1.0 if scaled else ax.window
            labels.append(f"axis {ax.axis}: {form}" + (" (1/k before the scan)" if pre else ""))
            shape[ax.axis] = ax.n_out
        final = (m.fold if m.fold is not None else np.float64(1.0)) / scale
        if np.all(np.abs(final - 1.0) < 1e-12):
            final = None
        else:
            cost += float(np.prod(shape))
        return _Plan(steps, final, labels, cost)


@dataclass
class _Plan:
    steps: list[Callable[[Emitter, gs.Tensor], gs.Tensor]]  # one 1-D window sum per summed axis
    final: np.ndarray | None  # the multiplier left after the per-axis 1/k (None: exactly 1)
    labels: list[str]
    cost: float

    def apply(self, graph: gs.Graph, m: IntegralWindow, prefix: str,
              shared: dict[bytes, gs.Constant]) -> list[gs.Node]:
        """Emit the plan in ``graph`` in place of ``m``; returns the new nodes."""
        e = Emitter(graph, prefix)
        cur: gs.Tensor = m.x
        for build in self.steps:
            cur = build(e, cur)
        m.out.inputs[0].outputs.clear()  # detach the old producer; cleanup removes the pattern
        if self.final is not None:
            final = np.asarray(self.final, np.float32)
            key = final.tobytes() + str(final.shape).encode()
            scale = shared.setdefault(key, e.const(final))
            e.op("Mul", [cur, scale], out=m.out)
        else:  # hand the last new node's output tensor over to the pattern's output
            last = e.nodes[-1]
            last.outputs.clear()
            last.outputs.append(m.out)
        return e.nodes


def _cost(opset: int, shape: list[int], build: Callable[[Emitter, gs.Tensor], gs.Tensor]) -> float:
    """FLOPs of one form, counted by ``node_flops`` on a scratch graph (the same rules as reports)."""
    g = gs.Graph(opset=opset)
    x = gs.Variable("x", dtype=np.float32, shape=list(shape))
    g.inputs = [x]
    g.outputs = [build(Emitter(g, "cost"), x)]
    return sum(node_flops(gs.export_onnx(g)).values())


def _builder(form: str, shape: list[int], ax: WindowAxis, pre: bool, scaled: bool):
    """A function emitting the 1-D window sum along ``ax`` (times 1/k when ``scaled``)."""
    a, k, off, n_out, length = ax.axis, ax.window, ax.offset, ax.n_out, ax.length
    outer = int(np.prod(shape[:a], dtype=np.int64))
    inner = int(np.prod(shape[a + 1:], dtype=np.int64))
    out_shape = list(shape)
    out_shape[a] = n_out

    def window_input(e: Emitter, x: gs.Tensor, need: int) -> tuple[gs.Tensor, int, int]:
        """x cropped to the ``need`` elements the windows read (minus zero padding); returns the
        tensor, its length, and the leading/trailing zeros still to add."""
        start, lead = max(off, 0), max(-off, 0)
        end = min(length, start + need - lead)
        if start > 0 or end < length:
            x = e.op("Slice", [x, e.ints([start]), e.ints([end]), e.ints([a])])
        if pre:
            x = e.op("Mul", [x, e.const(np.float32(1.0 / k))])
        return x, end - start, need - lead - (end - start)

    def pad(e: Emitter, x: gs.Tensor, lead: int, trail: int) -> gs.Tensor:
        if lead == 0 and trail == 0:
            return x
        pads = [0] * (2 * len(shape))
        pads[a], pads[len(shape) + a] = lead, trail
        return e.op("Pad", [x, e.ints(pads), e.const(np.float32(0.0))], {"mode": "constant"})

    def finish(e: Emitter, y: gs.Tensor) -> gs.Tensor:
        y = e.op("Reshape", [y, e.ints(out_shape)])
        if scaled and not pre and form != "pool":
            y = e.op("Mul", [y, e.const(np.float32(1.0 / k))])
        return y

    def blocked(e: Emitter, x: gs.Tensor) -> gs.Tensor:
        nb = -(-n_out // k)  # output blocks; one more input block holds the windows' tails
        x, _, trail = window_input(e, x, (nb + 1) * k)
        z = pad(e, x, max(-off, 0), trail)
        z3 = e.op("Reshape", [z, e.ints([-1, k, inner])])
        ex = e.op("CumSum", [z3, e.ints(1)], {"exclusive": 1})  # E: in-block exclusive prefix sums
        tot = e.op("ReduceSum", [z3, e.ints([1])], {"keepdims": 1})  # T: block sums
        ex4 = e.op("Reshape", [ex, e.ints([outer, nb + 1, k, inner])])
        tot4 = e.op("Reshape", [tot, e.ints([outer, nb + 1, 1, inner])])
        nxt = e.op("Slice", [ex4, e.ints([1]), e.ints([nb + 1]), e.ints([1])])
        cur = e.op("Slice", [ex4, e.ints([0]), e.ints([nb]), e.ints([1])])
        tot_cur = e.op("Slice", [tot4, e.ints([0]), e.ints([nb]), e.ints([1])])
        # Window at block b, offset t: suffix of block b (T_b - E_b[t]) + prefix of block b+1 (E_{b+1}[t]).
        y = e.op("Add", [e.op("Sub", [nxt, cur]), tot_cur])
        y = e.op("Reshape", [y, e.ints([outer, nb * k, inner])])
        if nb * k != n_out:
            y = e.op("Slice", [y, e.ints([0]), e.ints([n_out]), e.ints([1])])
        return finish(e, y)

    def prefix(e: Emitter, x: gs.Tensor) -> gs.Tensor:
        need = n_out + k - 1
        x, _, trail = window_input(e, x, need)
        z = pad(e, x, max(-off, 0) + 1, trail)  # one more leading zero: P[j] = sum of the first j
        p = e.op("CumSum", [e.op("Reshape", [z, e.ints([outer, need + 1, inner])]), e.ints(1)])
        hi = e.op("Slice", [p, e.ints([k]), e.ints([k + n_out]), e.ints([1])])
        lo = e.op("Slice", [p, e.ints([0]), e.ints([n_out]), e.ints([1])])
        return finish(e, e.op("Sub", [hi, lo]))

    def pool(e: Emitter, x: gs.Tensor) -> gs.Tensor:
        x, used, trail = window_input(e, x, n_out + k - 1)
        lead = max(-off, 0)
        x4 = e.op("Reshape", [x, e.ints([outer, 1, used, inner])])
        if lead >= k or trail >= k:  # ONNX Runtime wants pool pads smaller than the kernel
            pads4 = [0, 0, lead, 0, 0, 0, trail, 0]
            x4 = e.op("Pad", [x4, e.ints(pads4), e.const(np.float32(0.0))], {"mode": "constant"})
            lead = trail = 0
        y = e.op("AveragePool", [x4], {"kernel_shape": [k, 1], "pads": [lead, 0, trail, 0],
                                       "strides": [1, 1], "count_include_pad": 1})
        return finish(e, y)

    return {"blocked": blocked, "prefix": prefix, "pool": pool}[form]


def _input_absmax(x: gs.Tensor, ctx: PassContext) -> float:
    absmax = ctx.tensor_absmax()
    if x.name in absmax:
        return absmax[x.name]
    values = [np.abs(f[x.name]).max() for f in ctx.feeds if x.name in f and np.size(f[x.name])]
    return float(max(values)) if values else math.inf
