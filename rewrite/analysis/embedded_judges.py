"""Cut-out judges that run inside a candidate's own diagnosis run (fix --auto: no FP32 run of their own).

``cutout_judge.judge_cutouts`` fetches every site's FP32 entry and exit values with a run of the
model (NAFNet-9: 385 of its 408 nodes, a plain inference) and emulates the cut-outs beside it. A
pass whose rewrite leaves those values bit for bit (rescale-accumulation: powers of two; its exits
keep their names) leaves them in its candidate's FP32 twin, which the candidate's diagnosis
computes anyway. So fix --auto lets the pass rewrite every site first (``auto_fix``'s speculation),
and this module puts each site's cut-out, emulated before and after its edit, into that
diagnosis graph, fed from the twin's entries and compared with the twin's exits; only scalars
leave the run. The cut-outs' nodes sit right after the twin tensors they read, so nothing is kept
alive for long (memory stays that of the diagnosis).

The scores are ``judge_cutouts``' definition: per exit the relative L2 of the emulated exit
against FP32, worst over a cut-out's exits, inf where the emulated exit is non-finite, and the L1
mass of the entries with the part of it below a threshold (the pass's underflow share). Sums of
squares are taken in float32 over a tensor's last axis and in float64 over the rows (numpy's are
float64 dot products): the same numbers to ~1e-6 relative, which the tests bound. A reference
(twin) exit that is itself non-finite makes the judgement unknown (``read`` returns None): the
caller judges the usual way then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.analysis.cutout_judge import Cutout, Score
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation, default_opset
from onnx_fp16_rewrite.emulation.fp16_graph_edits import subgraphs
from onnx_fp16_rewrite.emulation.new_initializers import NewInitializers, find

_PREFIX = "__judge"
_LAST = "__judge_last_axis"
_CHUNK = 1 << 19  # elements a chunk of the underflow sums reads (2 MB of FP32)


class EmbeddedJudges:
    """The cut-outs of one pass run, emulated before and after their edits, ready to embed.

    Raises where a cut-out cannot be extracted, edited or emulated, or where the model is not
    one the embedding handles (control flow, functions, non-FLOAT entries or exits): the caller
    then judges the usual way (judge_cutouts), which gives such a site its own reason."""

    def __init__(self, model: onnx.ModelProto, cutouts: Sequence[Cutout], l1_below: Mapping[str, float]) -> None:
        if model.functions or any(subgraphs(n) for n in model.graph.node):
            raise ValueError("control flow or functions: cut-outs are judged on their own")
        inferred = onnx.shape_inference.infer_shapes(model)
        extractor = onnx.utils.Extractor(inferred)
        info = {v.name: v.type.tensor_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                     *inferred.graph.output)}
        self.cutouts = list(cutouts)
        self.opset = default_opset(model)
        self.l1_below = {k: float(v) for k, v in l1_below.items()}
        self.ranks: dict[str, int | None] = {}
        self.dims: dict[str, list[int | None] | None] = {}
        for name in {n for c in self.cutouts for n in c.entries + c.exits}:
            t = info.get(name)
            if t is None or t.elem_type != TensorProto.FLOAT:
                raise ValueError(f"{name}: not a FLOAT tensor of known type")
            self.ranks[name] = len(t.shape.dim) if t.HasField("shape") else None
            self.dims[name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] \
                if t.HasField("shape") else None
        self.emulated: list[tuple[onnx.ModelProto, onnx.ModelProto]] = []
        for c in self.cutouts:
            sub = extractor.extract_model(c.entries, c.exits)
            graph = gs.import_onnx(sub)
            c.edit(graph)
            graph.cleanup().toposort()
            pair = tuple(build_emulation(m, PrecisionPlan(), with_stats=False) for m in (sub, gs.export_onnx(graph)))
            if any(e.fp16_inputs or e.unhandled_bodies for e in pair):
                raise ValueError(f"{c.key}: its cut-out is not emulated as a plain FP16 graph")
            self.emulated.append((pair[0].model, pair[1].model))

    def embed(self, graph: onnx.GraphProto, twin: Callable[[str], str]) -> None:
        """Add every cut-out to ``graph`` (a diagnosis graph), reading ``twin(name)`` for an entry
        or exit, each right after the last node that makes what it reads."""
        opset = self.opset
        position = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
        inits: list[onnx.TensorProto] = NewInitializers()
        at: dict[int, list[onnx.NodeProto]] = {}
        for j, (c, pair) in enumerate(zip(self.cutouts, self.emulated)):
            nodes: list[onnx.NodeProto] = []
            for v, emu in enumerate(pair):
                nodes += _renamed(emu.graph, f"{_PREFIX}{j}{'ba'[v]}/", {e: twin(e) for e in c.entries}, inits)
            for x in c.exits:
                ref = twin(x)
                nodes += _rows_then_double("ReduceSumSquare", ref, _out(j, "ref", x), self.ranks[x], opset, inits)
                for v in range(2):
                    diff = f"{_PREFIX}{j}{'ba'[v]}/{x}__diff"
                    nodes.append(helper.make_node("Sub", [f"{_PREFIX}{j}{'ba'[v]}/{x}", ref], [diff], name=diff))
                    nodes += _rows_then_double("ReduceSumSquare", diff, _out(j, "ba"[v], x), self.ranks[x], opset,
                                               inits)
            below = self.l1_below.get(c.key)
            if below is not None:
                thr = f"{_PREFIX}{j}_below"
                inits.append(numpy_helper.from_array(np.array(below, np.float32), thr))
                if find(inits, _PREFIX + "_zero") is None:
                    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), _PREFIX + "_zero"))
                for i, e in enumerate(c.entries):
                    # Right after the entry's twin is made: its temporaries are not alive beside the cut-outs'.
                    p = f"{_PREFIX}{j}_l1_{i}"
                    sums = _rows_then_double("ReduceL1", twin(e), _out(j, "mass", str(i)), self.ranks[e], opset, inits)
                    sums += _lost(twin(e), thr, _out(j, "lost", str(i)), self.dims[e], opset, inits)
                    at.setdefault(position.get(twin(e), -1), []).extend(sums)
            reads = [twin(n) for n in c.entries + c.exits]
            at.setdefault(max((position.get(r, -1) for r in reads), default=-1), []).extend(nodes)
        merged = list(at.pop(-1, []))
        for k, node in enumerate(graph.node):
            merged.append(node)
            merged += at.get(k, [])
        del graph.node[:]
        graph.node.extend(merged)
        graph.initializer.extend(inits)
        graph.output.extend(helper.make_tensor_value_info(n, TensorProto.DOUBLE, []) for n in self.outputs())

    def outputs(self) -> list[str]:
        names = []
        for j, c in enumerate(self.cutouts):
            names += [_out(j, kind, x) for x in c.exits for kind in ("ref", "b", "a")]
            if c.key in self.l1_below:
                names += [_out(j, kind, str(i)) for i in range(len(c.entries)) for kind in ("mass", "lost")]
        return names

    def read(self, runs: Sequence[Mapping[str, float]]) -> tuple[dict[str, Score], dict[str, tuple[float, float]]] | None:
        """(scores, L1 sums) from the runs' scalars, as the pass's judge returns them; None when
        a reference exit was non-finite (the scores would not be judge_cutouts')."""
        scores, l1 = {}, {}
        for j, c in enumerate(self.cutouts):
            worst = [0.0, 0.0]
            for x in c.exits:
                ref = sum(float(r[_out(j, "ref", x)]) for r in runs)
                if not math.isfinite(ref):
                    return None
                for v in range(2):
                    err = sum(float(r[_out(j, "ba"[v], x)]) for r in runs)
                    rel = float("inf") if not math.isfinite(err) else math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
                    worst[v] = max(worst[v], rel)
            scores[c.key] = (worst[0], worst[1])
            if c.key in self.l1_below:
                l1[c.key] = tuple(sum(float(r[_out(j, kind, str(i))]) for r in runs for i in range(len(c.entries)))
                                  for kind in ("mass", "lost"))
        return scores, l1


def _out(j: int, kind: str, name: str) -> str:
    return f"{_PREFIX}{j}_{kind}/{name}"


def _renamed(g: onnx.GraphProto, prefix: str, inputs: Mapping[str, str], inits: list[onnx.TensorProto]
             ) -> list[onnx.NodeProto]:
    """``g``'s nodes with every name prefixed (onnx.compose: nodes, tensors, initializers, outputs)
    and its graph inputs read from ``inputs``; its initializers go to ``inits``."""
    named = onnx.compose.add_prefix_graph(g, prefix)
    fed = {prefix + name: source for name, source in inputs.items()}
    for node in named.node:
        node.input[:] = [fed.get(i, i) for i in node.input]
    inits.extend(named.initializer)
    return list(named.node)


def _lost(x: str, below: str, out: str, dims: list[int | None] | None, opset: int, inits: list) -> list[onnx.NodeProto]:
    """The sum of |x| over the elements with |x| < ``below`` (a scalar initializer), as row sums
    in float32 added in float64. A large tensor of known shape goes in chunks of rows: its
    temporaries (|x|, the mask, the kept values) are a chunk's, not three tensors the size of x
    beside the diagnosis' own (NAFNet-9: 36 MB more at the run's peak)."""
    rank = len(dims) if dims is not None else None
    rows = math.prod(dims[:-1]) if dims and all(d for d in dims) else None
    chunks = min(rows, -(-math.prod(dims) // _CHUNK)) if rows else 1
    if chunks <= 1 or opset < 13:
        return _masked_abs_sum(x, below, out, rank, opset, inits)
    flat = out + "__2d"
    shape = out + "__2d_shape"
    inits.append(numpy_helper.from_array(np.array([rows, dims[-1]], np.int64), shape))
    nodes = [helper.make_node("Reshape", [x, shape], [flat], name=flat)]
    parts = []
    for c in range(chunks):
        lo, hi = rows * c // chunks, rows * (c + 1) // chunks
        name = f"{out}__chunk{c}"
        bounds = [numpy_helper.from_array(np.array([v], np.int64), f"{name}_{k}") for k, v in
                  (("lo", lo), ("hi", hi), ("axis", 0))]
        inits += bounds
        nodes.append(helper.make_node("Slice", [flat, *(b.name for b in bounds)], [name], name=name))
        nodes += _masked_abs_sum(name, below, name + "_lost", 2, opset, inits)
        parts.append(name + "_lost")
    return nodes + [helper.make_node("Sum", parts, [out], name=out)]


def _masked_abs_sum(x: str, below: str, out: str, rank: int | None, opset: int, inits: list) -> list[onnx.NodeProto]:
    return [helper.make_node("Abs", [x], [out + "_abs"], name=out + "_abs"),
            helper.make_node("Less", [out + "_abs", below], [out + "_small"], name=out + "_small"),
            helper.make_node("Where", [out + "_small", out + "_abs", _PREFIX + "_zero"], [out + "_kept"],
                             name=out + "_kept"),
            *_rows_then_double("ReduceSum", out + "_kept", out, rank, opset, inits)]


def _rows_then_double(op: str, x: str, out: str, rank: int | None, opset: int, inits: list) -> list[onnx.NodeProto]:
    """``op`` over ``x``'s last axis in float32 (rows spread over ORT's threads), the rows cast to
    float64 and summed there: a scalar, with float32 rounding only within a row."""
    axes_input = opset >= (13 if op == "ReduceSum" else 18)
    if not rank:  # a scalar or unknown rank: all of it in float64
        return [helper.make_node("Cast", [x], [out + "__d"], name=out + "__d", to=TensorProto.DOUBLE),
                helper.make_node(op, [out + "__d"], [out], name=out, keepdims=0)]
    first = helper.make_node(op, [x], [out + "__rows"], name=out + "__rows", keepdims=0)
    if axes_input:
        if find(inits, _LAST) is None:
            inits.append(numpy_helper.from_array(np.array([-1], np.int64), _LAST))
        first.input.append(_LAST)
    else:
        first.attribute.append(helper.make_attribute("axes", [rank - 1]))
    return [first,
            helper.make_node("Cast", [out + "__rows"], [out + "__d"], name=out + "__d", to=TensorProto.DOUBLE),
            helper.make_node("ReduceSum", [out + "__d"], [out], name=out, keepdims=0)]


__all__ = ["EmbeddedJudges"]
