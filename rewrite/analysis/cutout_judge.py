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
emulated (each then fails, or not, with its own reason).
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
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation, check_fp16, compare_output, emu_feed
from onnx_fp16_rewrite.io.ort_runner import Feed, run_model
from onnx_fp16_rewrite.io.sessions import run_cached

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


def fetch_values(model: onnx.ModelProto, feeds: Sequence[Feed], names: Sequence[str]) -> list[Feed]:
    """FP32 values of ``names`` (graph inputs or node outputs), one dict per feed, from one run of
    just the nodes they depend on (optimizations off, as every FP32 run here)."""
    inputs = {i.name for i in model.graph.input}
    inner = [n for n in dict.fromkeys(names) if n not in inputs]
    runs = run_model(_cone_model(model, inner), feeds, inner) if inner else [{} for _ in feeds]
    return [{**{n: np.asarray(f[n]) for n in names if n in inputs}, **r} for f, r in zip(feeds, runs)]


def judge_cutouts(model: onnx.ModelProto, cutouts: Sequence[Cutout],
                  values: Sequence[Feed]) -> dict[str, Score | Exception]:
    """Each cut-out's (before, after) score, or the exception that kept it from being judged.
    ``values``: ``fetch_values`` of every entry and exit, per feed."""
    if not cutouts:
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
    out: dict[str, Score | Exception] = {}
    if len(together) > 1:
        try:
            out.update(_judge_together(extractor, together, values))
        except Exception as exc:  # one bad site must not refuse the others: judge each alone
            logger.debug("judging %d cut-outs together failed (%s); judging each alone", len(together), exc)
            alone = together + alone
    else:
        alone = together + alone
    for c in alone:
        try:
            out[c.key] = judge_alone(extractor, c, values)
        except Exception as exc:  # the caller refuses the site with this reason
            out[c.key] = exc
    return out


def judge_alone(extractor: onnx.utils.Extractor, cutout: Cutout, values: Sequence[Feed]) -> Score:
    """One site judged by itself, as every site was before they were judged together: its own
    cut-out, its own FP32 reference run, ``check_fp16`` before and after."""
    sub = extractor.extract_model(cutout.entries, cutout.exits)
    feeds = [{n: v[n] for n in cutout.entries} for v in values]
    reference = run_model(sub, feeds)
    graph = gs.import_onnx(sub)
    cutout.edit(graph)
    graph.cleanup().toposort()
    scores = [max(o.rel_l2 for o in check_fp16(candidate, feeds, reference, plan=PrecisionPlan()).outputs)
              for candidate in (sub, gs.export_onnx(graph))]
    return scores[0], scores[1]


def _judge_together(extractor: onnx.utils.Extractor, cutouts: Sequence[Cutout], values: Sequence[Feed]) -> dict[str, Score]:
    entries = list(dict.fromkeys(n for c in cutouts for n in c.entries))
    exits = list(dict.fromkeys(n for c in cutouts for n in c.exits))
    sub = extractor.extract_model(entries, exits)
    feeds = [{n: v[n] for n in entries} for v in values]
    reference = [{n: v[n] for n in exits} for v in values]
    before = _rel_l2(sub, feeds, reference, exits)
    graph = gs.import_onnx(sub)
    for c in cutouts:
        c.edit(graph)
    graph.cleanup().toposort()
    after = _rel_l2(gs.export_onnx(graph), feeds, reference, exits)
    # max over the exits in the cut-out's own order: what a report over its outputs gives
    return {c.key: (max(before[n] for n in c.exits), max(after[n] for n in c.exits)) for c in cutouts}


def _rel_l2(model: onnx.ModelProto, feeds: list[Feed], reference: list[Feed], names: list[str]) -> dict[str, float]:
    """check_fp16's per-output relative L2 with every tensor FP16 (an empty plan), without its
    per-tensor statistics (three reductions per tensor that only its findings read)."""
    emu = build_emulation(model, PrecisionPlan(), with_stats=False)
    runs = run_cached(emu.model, [emu_feed(f, emu.fp16_inputs) for f in feeds], names, optimize=True, cache=False)
    return {n: compare_output(n, [r[n] for r in runs], [ref[n] for ref in reference], 1e-2).rel_l2 for n in names}


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
