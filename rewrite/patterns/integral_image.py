"""Recognising integral-image window sums in a graph (used by the box-filter pass).

The recogniser works on meaning, not on one exporter's node order: a chain of zero-Pads and plain
CumSums over distinct axes makes prefix sums of a zero-padded ``x``; it must be read only by
constant step-1 Slices, and those slices must be combined by Add/Sub/Neg into exactly the
inclusion-exclusion of a box's corners (``+`` where the slice starts at the far corner on an even
number of axes). That covers NAFNet's TLC pooling (CumSum W, CumSum H, Pad, ``s4 + s1 - s2 - s3``),
guided filters (Pad, CumSum W, CumSum H, ``A - B - C + D``), 1-D window sums and reassociated forms.
Anything else comes back as a reason string, never as a guess.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.pipeline.graph_edit import const_value, cumsum_attrs, single_consumer

__all__ = ["IntegralWindow", "WindowAxis", "match_integral_window"]

@dataclass
class WindowAxis:
    """Output ``o`` along ``axis`` sums ``x[o + offset : o + offset + window]`` (zero outside x)."""

    axis: int
    length: int
    window: int
    offset: int
    n_out: int


@dataclass
class IntegralWindow:
    x: gs.Variable
    shape: list[int]
    axes: list[WindowAxis]
    out: gs.Variable  # the box sum, or the output of the constant Div/Mul folded into it
    fold: np.ndarray | None  # the multiplier folded in (1 / divisor), float64; None without one
    nodes: list[gs.Node]  # every node of the pattern (all replaced)
    pads_after: bool  # zero padding after the prefix sums (NAFNet's TLC form)
    padded: bool

    def describe(self) -> str:
        dims = "x".join(str(a.window) for a in self.axes)
        pads = ("zero-pad after the sums, NAFNet TLC form" if self.pads_after
                else "zero-pad before the sums, guided-filter form" if self.padded else "no padding")
        fold = ", constant divide folded in" if self.fold is not None else ""
        return f"{len(self.axes)}-D {dims} window sum ({pads}{fold})"


def _optional(node: gs.Node, i: int) -> tuple[np.ndarray | None, bool]:
    """(value, ok) of optional input ``i``: (None, True) when absent, (None, False) when not constant."""
    if len(node.inputs) <= i or node.inputs[i] is None or not node.inputs[i].name:
        return None, True
    value = const_value(node.inputs[i])
    return value, value is not None


def _zero_pad(node: gs.Node) -> bool:
    if node.op != "Pad" or node.attrs.get("mode", "constant") != "constant":
        return False
    value, ok = _optional(node, 2)
    return ok and (value is None or value.size == 0 or (value.size == 1 and float(value.reshape(-1)[0]) == 0.0))


def _pads(node: gs.Node, rank: int) -> list[int] | None:
    """The Pad's pads as [begin per axis..., end per axis...] (opset 18 ``axes`` expanded)."""
    pads, ok = _optional(node, 1)
    axes, axes_ok = _optional(node, 3)
    if pads is None or not ok or not axes_ok:
        return None
    pads = [int(p) for p in pads.reshape(-1)]
    if axes is None:
        return pads if len(pads) == 2 * rank else None
    axes = [int(a) % rank for a in axes.reshape(-1)]
    if len(pads) != 2 * len(axes):
        return None
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        full[a], full[rank + a] = pads[i], pads[len(axes) + i]
    return full


def _slice_box(node: gs.Node, shape: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(start, length) per axis of a constant step-1 Slice of a tensor of ``shape``; None otherwise."""
    (starts, ok0), (ends, ok1), (axes, ok2), (steps, ok3) = (_optional(node, i) for i in range(1, 5))
    if starts is None or ends is None or not (ok0 and ok1 and ok2 and ok3):
        return None
    if steps is not None and np.any(steps != 1):
        return None
    rank = len(shape)
    starts, ends = starts.reshape(-1), ends.reshape(-1)
    axes = axes.reshape(-1) if axes is not None else np.arange(len(starts))
    start, length = [0] * rank, list(shape)
    for s, e, a in zip(starts, ends, axes):
        a = int(a) % rank
        dim = shape[a]
        s, e = int(s), int(e)
        s = min(max(s + dim if s < 0 else s, 0), dim)
        e = min(max(e + dim if e < 0 else e, 0), dim)
        start[a], length[a] = s, max(e - s, 0)
    return tuple(start), tuple(length)


def match_integral_window(first: gs.Node, graph: gs.Graph, shapes: dict, seen: set[str]) -> IntegralWindow | str:
    """The integral-image window sum starting at CumSum ``first``, or why there is none. Adds the
    CumSum/Pad chain it walked to ``seen`` (so later CumSums of the same chain are not re-reported)."""
    outs = graph.outputs
    chain = [first]
    x = first.inputs[0]
    while x.inputs and _zero_pad(x.inputs[0]) and single_consumer(x, outs) is chain[0]:
        chain.insert(0, x.inputs[0])
        x = x.inputs[0].inputs[0]
    cur = first.outputs[0]
    while (nxt := single_consumer(cur, outs)) is not None and (nxt.op == "CumSum" or _zero_pad(nxt)):
        chain.append(nxt)
        cur = nxt.outputs[0]
    seen.update(n.name for n in chain)
    xs = shapes.get(x.name)
    if xs is None or any(d is None for d in xs):
        return f"input {x.name} has an unknown or dynamic shape {xs}: window sizes must be static"
    rank = len(xs)
    lead, trail, summed, pads_after = [0] * rank, [0] * rank, [False] * rank, False
    for n in chain:
        if n.op == "Pad":
            pads = _pads(n, rank)
            if pads is None or min(pads) < 0:
                return f"Pad {n.name}: pads not constant or negative"
            for a in range(rank):
                if summed[a] and pads[rank + a] > 0:
                    return f"Pad {n.name} appends zeros on axis {a} after its prefix sum: not an integral image"
                pads_after |= summed[a] and pads[a] > 0
                lead[a] += pads[a]
                trail[a] += pads[rank + a]
            continue
        axis, exclusive, reverse = cumsum_attrs(n)
        if axis is None:
            return f"CumSum {n.name}: axis computed at run time"
        if exclusive or reverse:
            return f"CumSum {n.name} has exclusive={exclusive}, reverse={reverse}: not the integral-image form"
        if not -rank <= axis < rank or summed[axis % rank]:
            return f"CumSum {n.name}: axis {axis} out of range or summed twice"
        summed[axis % rank] = True
    for a in range(rank):
        if not summed[a] and (lead[a] or trail[a]):
            return f"zero padding on axis {a}, which is not summed"
    shape_s = [d + lead[a] + trail[a] for a, d in enumerate(xs)]
    if any(cur is o for o in outs) or not cur.outputs:
        return f"prefix sums {cur.name} are a graph output or unused"
    slices = list(cur.outputs)
    if len(slices) < 2 or any(s.op != "Slice" for s in slices):
        other = next((s for s in slices if s.op != "Slice"), None)
        return f"prefix sums {cur.name} read by {other.op} {other.name}, not only by Slices" if other \
            else f"prefix sums {cur.name} read by a single Slice: a prefix, not a window"
    # Exporters slice one axis at a time (c[:, :, r:][:, :, :, r:]) and share the first Slice between corners:
    # a Slice read only by Slices composes with them into one box per leaf.
    boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    leaves: list[gs.Node] = []
    inner: list[gs.Node] = []
    work = [(s, (0,) * rank, tuple(shape_s)) for s in slices]
    while work:
        s, base, within = work.pop()
        box = _slice_box(s, list(within))
        if box is None:
            return f"Slice {s.name}: starts/ends/axes not constant, or a step other than 1"
        start, length = tuple(b + o for b, o in zip(base, box[0])), box[1]
        readers = list(s.outputs[0].outputs)
        if readers and all(r.op == "Slice" and r.inputs[0] is s.outputs[0] for r in readers) and \
                not any(s.outputs[0] is o for o in outs):
            inner.append(s)
            work += [(r, start, length) for r in readers]
        else:
            leaves.append(s)
            boxes[s.outputs[0].name] = (start, length)
    chain = list(chain) + inner
    slices = leaves
    padded = any(lead) or any(trail)
    return _combination(x, xs, slices, boxes, summed, lead, chain, (pads_after, padded), outs)


def _combination(x, xs, slices, boxes, summed, lead, chain, padding, outs) -> IntegralWindow | str:
    rank = len(xs)
    forms: dict[str, dict[str, int]] = {name: {name: 1} for name in boxes}
    tensors = {s.outputs[0].name: s.outputs[0] for s in slices}
    combo: dict[str, gs.Node] = {}
    changed = True
    while changed:  # close over Add/Sub/Neg nodes whose inputs all have a linear form
        changed = False
        for name in list(forms):
            for c in tensors[name].outputs:
                if c.name in combo or c.op not in ("Add", "Sub", "Neg"):
                    continue
                if not all(i.name in forms for i in c.inputs):
                    continue
                f = defaultdict(int)
                for i, t in enumerate(c.inputs):
                    sign = -1 if (c.op == "Neg" or (c.op == "Sub" and i == 1)) else 1
                    for k, v in forms[t.name].items():
                        f[k] += sign * v
                forms[c.outputs[0].name] = dict(f)
                tensors[c.outputs[0].name] = c.outputs[0]
                combo[c.name] = c
                changed = True
    escaping = [t for t in tensors.values() if any(c.name not in combo for c in t.outputs)
                or any(t is o for o in outs)]
    if len(escaping) != 1:
        return (f"the slices' Add/Sub/Neg combination ends in {len(escaping)} tensors "
                f"({', '.join(t.name for t in escaping[:3])}), not one window sum")
    root = escaping[0]
    used = {k: v for k, v in forms[root.name].items() if v}
    if len({boxes[k][1] for k in used}) != 1:
        return "the combined slices differ in size"
    starts = [boxes[k][0] for k in used]
    length = boxes[next(iter(used))][1]
    corners: dict[int, tuple[int, int]] = {}
    for a in range(rank):
        values = sorted({s[a] for s in starts})
        if not summed[a]:
            if values != [0] or length[a] != xs[a]:
                return f"the slices crop axis {a}, which is not summed"
        elif len(values) != 2:
            return f"the slices start at {values} on summed axis {a}: not the two corners of a window"
        else:
            corners[a] = (values[0], values[1])
    got: dict[tuple[int, ...], int] = defaultdict(int)
    for k, v in used.items():
        got[tuple(boxes[k][0][a] for a in corners)] += v
    want = {}
    for pick in itertools.product((0, 1), repeat=len(corners)):
        key = tuple(corners[a][p] for a, p in zip(corners, pick))
        want[key] = int(np.prod([1 if p else -1 for p in pick]))
    if {k: v for k, v in got.items() if v} != want:
        return f"corner coefficients {dict(got)} are not a box's inclusion-exclusion {want}"
    axes = [WindowAxis(a, xs[a], hi - lo, lo + 1 - lead[a], length[a]) for a, (lo, hi) in corners.items()]
    nodes = list(chain) + list(slices) + list(combo.values())
    out, fold = root, None
    consumer = single_consumer(root, outs)
    if consumer is not None and consumer.op in ("Div", "Mul") and len(consumer.inputs) == 2:
        is_div = consumer.op == "Div"
        other = consumer.inputs[1] if consumer.inputs[0] is root else consumer.inputs[0]
        value = const_value(other) if not (is_div and consumer.inputs[1] is root) else None
        if (value is not None and np.issubdtype(value.dtype, np.floating) and np.all(np.isfinite(value))
                and np.all(value != 0) and value.ndim <= rank
                and np.broadcast_shapes(value.shape, tuple(length)) == tuple(length)):
            fold = 1.0 / value.astype(np.float64) if is_div else value.astype(np.float64)
            out = consumer.outputs[0]
            nodes.append(consumer)
    return IntegralWindow(x, list(xs), axes, out, fold, nodes, *padding)
