"""Judge small cut-outs of a model (entries -> exits) in the FP16 emulation, before and after an edit.

A pass that rewrites a few local sites (rescale-accumulation's chains) wants each site's FP16 error
with and without its rewrite. Judging each site alone costs a cut-out, an FP32 run and two
emulation sessions per site; here every site of a pass is judged together: the model runs once in
FP32 for the sites' entry *and* exit values (the exits are the reference: the same ORT kernels on
the same inputs, graph optimizations off, give the same bits in the cut-out), then one cut-out
holds every site and is emulated once before and once after all edits. A site's score is the worst
relative L2 over its own exits, bit-identical to judging it alone (tests/test_rescale_accumulation.py
compares the two), provided the union is the disjoint union of the cut-outs: a site whose cone
(walking back from its exits to its entries) meets another site's entry would lose nodes there,
and one sharing a node with an earlier site's cone would be emulated with that site's consumers
around it, so each is judged alone, as is every site of a union that cannot be extracted or
emulated (each then fails, or not, with its own reason). Samples stream through one at a time:
only one sample's entry and exit values are in memory (NAFNet-9: 149 MB a sample), and each exit
keeps sums of squares.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation, check_fp16, emu_feed
from onnx_fp16_rewrite.emulation.fp16_report import sample_masks
from onnx_fp16_rewrite.io.ort_runner import Feed, make_session, run_model, trim_heap

logger = logging.getLogger(__name__)


@dataclass
class Cutout:
    """One site: the tensors it reads from outside, the tensors it hands on, and its rewrite
    (``edit(graph)`` applies it to any graph holding the site's nodes, looked up by name)."""

    key: str
    entries: list[str]
    exits: list[str]
    edit: Callable[[gs.Graph], None]


Score = tuple[float, float]  # worst FP16 rel L2 over the exits, (before, after) the edit


class _Fetcher:
    """FP32 values of ``names`` (graph inputs or node outputs) from a session of just the nodes
    they depend on (optimizations off, as every FP32 run here), one sample at a time."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str]) -> None:
        inputs = {i.name for i in model.graph.input}
        self.given = [n for n in dict.fromkeys(names) if n in inputs]
        self.inner = [n for n in dict.fromkeys(names) if n not in inputs]
        self.session = make_session(_cone_model(model, self.inner)) if self.inner else None

    def values(self, feed: Feed) -> Feed:
        got = dict(zip(self.inner, self.session.run(self.inner, feed))) if self.session is not None else {}
        return {**{n: np.asarray(feed[n]) for n in self.given}, **got}


def fetch_values(model: onnx.ModelProto, feeds: Sequence[Feed], names: Sequence[str]) -> list[Feed]:
    """FP32 values of ``names`` (graph inputs or node outputs), one dict per feed, from one
    session of just the nodes they depend on."""
    fetcher = _Fetcher(model, names)
    out = [fetcher.values(f) for f in feeds]
    del fetcher
    trim_heap()
    return out


def judge_cutouts(model: onnx.ModelProto, cutouts: Sequence[Cutout], feeds: Sequence[Feed], *,
                  fetch: Sequence[str] = (), on_values: Callable[[Feed], None] | None = None,
                  ) -> dict[str, Score | Exception]:
    """Each cut-out's (before, after) score, or the exception that kept it from being judged.

    One sample at a time (memory: one sample's entry and exit values, not all of them): its FP32
    values of every entry and exit (and of ``fetch``) are fetched, handed to ``on_values`` (the
    caller's own per-sample sums), and every judge runs on them and keeps only sums of squares.
    The scores are ``judge_alone``'s: bit for bit with one sample; with more, the relative L2's
    sums add up per sample instead of over the concatenated samples (a last-bit difference)."""
    if not cutouts and on_values is None:
        return {}
    inferred = onnx.shape_inference.infer_shapes(model)  # the extractor needs every tensor's type
    extractor = onnx.utils.Extractor(inferred)
    # The union is the disjoint union of the cut-outs (and so emulates each as alone) when no
    # cone passes another cut-out's entry and no two share a node (Constants aside: inlined).
    producer = {o: k for k, node in enumerate(inferred.graph.node) for o in node.output if o}
    entries = {n for c in cutouts for n in c.entries}
    together, alone, claimed = [], [], set()
    for c in cutouts:
        cone = _cone(inferred.graph, producer, c, entries)
        if cone is None or cone & claimed:
            alone.append(c)
        else:
            together.append(c)
            claimed |= cone
    if len(together) <= 1:
        alone, together = together + alone, []
    names = [*fetch, *(n for c in cutouts for n in c.entries + c.exits)]
    fetcher = _Fetcher(model, names)
    out: dict[str, Score | Exception] = {}
    judges: list[_Judge] = []
    if together:
        try:
            judges.append(_Judge(extractor, together, own_reference=False))
        except Exception as exc:  # one bad site must not refuse the others: judge each alone
            logger.debug("judging %d cut-outs together failed (%s); judging each alone", len(together), exc)
            alone, together = together + alone, []
    judges += _alone(extractor, alone, out)
    seen = [0]  # samples on_values has had (a second pass hands it only the rest)
    try:
        _stream(fetcher, feeds, judges, out, on_values, seen)
    except _TogetherFailed as failed:
        # The union failed on a sample: each of its sites is judged alone, over every sample again.
        logger.debug("judging %d cut-outs together failed (%s); judging each alone", len(together), failed.cause)
        out = {}
        _stream(fetcher, feeds, _alone(extractor, together + alone, out), out, on_values, seen)
    del fetcher, judges
    trim_heap()
    return out


def judge_with_l1(model: onnx.ModelProto, cutouts: Sequence[Cutout], feeds: Sequence[Feed],
                  l1_below: dict[str, float]) -> tuple[dict[str, Score | Exception], dict[str, tuple[float, float]]]:
    """``judge_cutouts``' scores, and for each cut-out keyed in ``l1_below`` the L1 mass of its
    entries' FP32 values over every feed with the part of it below the threshold given (float64
    sums, from the same stream of values): a pass's judge (PassContext.judge has this signature
    without the feeds)."""
    by_key = {c.key: c for c in cutouts}
    sums = {key: [0.0, 0.0] for key in l1_below}

    def add(values: Feed) -> None:
        for key, below in l1_below.items():
            for name in by_key[key].entries:
                v = values[name].astype(np.float64)
                np.abs(v, out=v)
                sums[key][0] += float(v.sum())
                sums[key][1] += float(v[v < below].sum())

    scores = judge_cutouts(model, cutouts, feeds, on_values=add)
    return scores, {key: (mass, lost) for key, (mass, lost) in sums.items()}


class _TogetherFailed(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _alone(extractor: onnx.utils.Extractor, cutouts: Sequence[Cutout], out: dict) -> list[_Judge]:
    judges = []
    for c in cutouts:
        try:
            judges.append(_Judge(extractor, [c], own_reference=True))
        except Exception as exc:  # the caller refuses the site with this reason
            out[c.key] = exc
    return judges


def _stream(fetcher: _Fetcher, feeds: Sequence[Feed], judges: list[_Judge], out: dict, on_values,
            seen: list[int]) -> None:
    """Every judge over every sample, one sample's values in memory at a time; a judge of one
    site that fails is dropped with its exception, one of several raises ``_TogetherFailed``.
    ``on_values`` gets each sample from index ``seen[0]`` on, once."""
    live = list(judges)
    for i, feed in enumerate(feeds):
        values = fetcher.values(feed)
        if on_values is not None and i >= seen[0]:
            on_values(values)
            seen[0] = i + 1
        for judge in list(live):
            try:
                judge.add(values)
            except Exception as exc:
                if not judge.own_reference:
                    raise _TogetherFailed(exc) from exc
                out[judge.cutouts[0].key] = exc
                live.remove(judge)
        del values
    for judge in live:
        out.update(judge.scores())


class _Judge:
    """Cut-outs in one extracted model, emulated (every tensor FP16) before and after their
    edits; ``add`` runs one sample and keeps, per exit, what ``compare_output`` reads.
    ``own_reference``: the exits' reference comes from this cut-out's own FP32 run (a site
    judged alone, as ``judge_alone``); else from the fetched values (the whole model's run)."""

    def __init__(self, extractor: onnx.utils.Extractor, cutouts: Sequence[Cutout], own_reference: bool) -> None:
        self.cutouts, self.own_reference = list(cutouts), own_reference
        self.entries = list(dict.fromkeys(n for c in cutouts for n in c.entries))
        self.exits = list(dict.fromkeys(n for c in cutouts for n in c.exits))
        sub = extractor.extract_model(self.entries, self.exits)
        self.reference = make_session(sub) if own_reference else None
        graph = gs.import_onnx(sub)
        for c in cutouts:
            c.edit(graph)
        graph.cleanup().toposort()
        self.emulated = [_Emulated(sub), _Emulated(gs.export_onnx(graph))]
        self.errors = [{n: _Error() for n in self.exits} for _ in self.emulated]

    def add(self, values: Feed) -> None:
        feed = {n: values[n] for n in self.entries}
        if self.reference is not None:
            ref = dict(zip(self.exits, self.reference.run(self.exits, feed)))
        else:
            ref = {n: values[n] for n in self.exits}
        for emulated, errors in zip(self.emulated, self.errors):
            got = emulated.run(feed, self.exits)
            for n in self.exits:
                errors[n].add(got[n], ref[n])
            del got  # not alive through the next run (NAFNet-9: 75 MB of exits)

    def scores(self) -> dict[str, Score]:
        # max over the exits in the cut-out's own order: what a report over its outputs gives
        before, after = ({n: e.rel_l2() for n, e in errors.items()} for errors in self.errors)
        return {c.key: (max(before[n] for n in c.exits), max(after[n] for n in c.exits)) for c in self.cutouts}


class _Emulated:
    """A cut-out's emulation graph with every tensor FP16 (an empty plan) and without its
    per-tensor statistics (three reductions per tensor that only check_fp16's findings read)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        emu = build_emulation(model, PrecisionPlan(), with_stats=False)
        self.fp16_inputs = emu.fp16_inputs
        self.session = make_session(emu.model, optimize=True)

    def run(self, feed: Feed, names: list[str]) -> Feed:
        return dict(zip(names, self.session.run(names, emu_feed(feed, self.fp16_inputs))))


class _Error:
    """``compare_output``'s relative L2 of one exit, summed over samples: its sums of squares
    (float64 dot products, as np.linalg.norm takes them) and NaN/inf counts, not the samples."""

    def __init__(self) -> None:
        self.diff_sq = self.ref_sq = 0.0
        self.nan = self.inf = 0  # the FP16 result's count minus the reference's, as compare_output takes them
        self.unequal = False  # a non-float exit that differs

    def add(self, got: np.ndarray, ref: np.ndarray) -> None:
        g, r = np.asarray(got).ravel(), np.asarray(ref).ravel()
        if not np.issubdtype(r.dtype, np.floating):
            self.unequal |= not np.array_equal(g, r)
            return
        nan, inf, both, finite = sample_masks(g, r)
        self.nan, self.inf = self.nan + nan, self.inf + inf
        diff = np.abs(g[both].astype(np.float64) - r[both].astype(np.float64))
        kept = r[finite].astype(np.float64)
        self.diff_sq += diff.dot(diff)
        self.ref_sq += kept.dot(kept)

    def rel_l2(self) -> float:
        if self.unequal or self.nan > 0 or self.inf > 0:
            return float("inf")
        diff, ref = np.sqrt(self.diff_sq), np.sqrt(self.ref_sq)
        return float(diff / ref) if ref > 0 else float(diff)


def judge_alone(extractor: onnx.utils.Extractor, cutout: Cutout, values: Sequence[Feed]) -> Score:
    """One site judged by itself, the definition the streamed judges keep to (tests compare
    them): its own cut-out, its own FP32 reference run, ``check_fp16`` before and after, on
    ``values`` (``fetch_values`` of its entries, per feed)."""
    sub = extractor.extract_model(cutout.entries, cutout.exits)
    feeds = [{n: v[n] for n in cutout.entries} for v in values]
    reference = run_model(sub, feeds)
    graph = gs.import_onnx(sub)
    cutout.edit(graph)
    graph.cleanup().toposort()
    scores = [max(o.rel_l2 for o in check_fp16(candidate, feeds, reference, plan=PrecisionPlan()).outputs)
              for candidate in (sub, gs.export_onnx(graph))]
    return scores[0], scores[1]


def _cone(graph: onnx.GraphProto, producer: dict[str, int], cutout: Cutout, entries: set[str]) -> set[int] | None:
    """The nodes (indices, Constants aside) the extractor takes for ``cutout``, walking back from
    its exits to its entries; None when the walk passes another cut-out's entry or a node with a
    subgraph (whose outer-scope reads the walk cannot see)."""
    own = set(cutout.entries)
    stack, seen, cone = list(cutout.exits), set(), set()
    while stack:
        name = stack.pop()
        if name in own or name in seen:
            continue
        seen.add(name)
        if name in entries:
            return None
        k = producer.get(name)
        if k is None:
            continue
        node = graph.node[k]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        if node.op_type != "Constant":
            cone.add(k)
        stack += [i for i in node.input if i]
    return cone


def _cone_model(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` reduced to the nodes ``names`` depend on, with ``names`` as its outputs (every
    graph input kept, so the same feeds run it). A model with subgraphs is kept whole (their
    outer-scope reads are not node inputs)."""
    g = model.graph
    whole = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute)
    keep = set(range(len(g.node)))
    if not whole:
        producer = {o: k for k, node in enumerate(g.node) for o in node.output if o}
        keep, stack = set(), list(names)
        while stack:
            k = producer.get(stack.pop())
            if k is not None and k not in keep:
                keep.add(k)
                stack += [i for i in g.node[k].input if i]
    nodes = [g.node[k] for k in sorted(keep)]
    used = {i for n in nodes for i in n.input} if not whole else {i.name for i in g.initializer}
    declared = {i.name for i in g.input}  # an initializer listed as an input (IR < 4) keeps its default
    known = {o.name: o for o in g.output}
    outputs = [known.get(n) or helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names]
    graph = helper.make_graph(nodes, g.name, list(g.input), outputs,
                              initializer=[t for t in g.initializer if t.name in used or t.name in declared])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m
