"""FP32 range profiling: per float tensor, how large, how small and how sane its values are.

One FP32 run per sample. Nothing large leaves the graph: every float tensor a node produces is
reduced in the graph to its max, min and sum, plus a fixed-size random sample of its values
(Gather at random flat indices), so memory stays that of one inference however many
intermediates the model has. From these:
- ``absmax`` exactly (max and min), unless the tensor holds inf/NaN or mask sentinels, where
  it comes from the sample's clean values;
- ``p999`` and the FP16-subnormal share from the sample;
- ``fp32_nonfinite`` exactly (a non-finite max, min or sum), ``sentinels`` from max/min.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.io.ort_runner import Feed, infer_types, make_session
from onnx_fp16_rewrite.emit.schema_types import inline_constants
from onnx_fp16_rewrite.emulation.control_flow import BodySite, ControlFlowEmulator, body_types
from onnx_fp16_rewrite.emulation.fp16_graph_edits import subgraphs, weights_not_inputs
from onnx_fp16_rewrite.fp16_limits import FP16_MAX, FP16_MIN_NORMAL
from onnx_fp16_rewrite.emulation.new_initializers import NewInitializers, find

logger = logging.getLogger(__name__)

# |x| at or beyond this is a mask sentinel (finfo(float32).min fills, -1e38 style), not data.
SENTINEL_ABS = 1e30
SAMPLE = 16384  # values drawn per tensor and sample for the percentile and subnormal share
_NO_SAMPLE = np.zeros(0, np.float32)
_FLAT, _FRAC = "__prof_flat", "__prof_frac"


@dataclass
class TensorRange:
    """FP32 statistics of one tensor over all samples. ``absmax`` ignores sentinels and
    non-finite values; ``fp32_nonfinite`` says FP32 itself had inf/NaN there (e.g. a masked
    ``log(0)``), which is no FP16 overflow."""

    tensor: str
    node: str
    op: str
    absmax: float = 0.0
    p999: float = 0.0
    subnormal_fraction: float = 0.0
    fp32_nonfinite: bool = False
    sentinels: int = 0

    @property
    def overflows_fp16(self) -> bool:
        return self.absmax > FP16_MAX


@dataclass
class RangeProfile:
    ranges: dict[str, TensorRange]
    runs: int
    outputs: list[Feed] = field(default_factory=list)

    def absmax(self) -> dict[str, float]:
        return {name: r.absmax for name, r in self.ranges.items()}

    def refreshed(self, errors) -> "RangeProfile":
        """The profile of a rewritten model, from the FP32 shadow of an emulation run
        (``TensorError.fp32_absmax``) instead of another profiling run; what only a profiling
        run sees (FP32 inf/NaN, sentinels, subnormals) carries over for tensors that kept
        their name and their range."""
        ranges = {}
        for e in errors:
            old = self.ranges.get(e.tensor)
            absmax = e.fp32_absmax if math.isfinite(e.fp32_absmax) else 0.0
            if old is not None and old.op == e.op and (old.fp32_nonfinite or old.sentinels or old.absmax == absmax):
                ranges[e.tensor] = old
            else:
                ranges[e.tensor] = TensorRange(e.tensor, e.node, e.op, absmax=absmax)
        return RangeProfile(ranges, runs=0, outputs=self.outputs)


def profile_ranges(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    *,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
    into: "ProfileAccumulator | None" = None,
) -> RangeProfile:
    """Profile every float tensor a node produces over ``feeds`` (one run each); the graph
    outputs of each run come back too, as the FP32 reference. ``progress(done, total)`` is
    called after each run (the CLI draws a counter with it). ``into``: statistics of earlier
    runs (the fixer's first emulation run) that these runs add to."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights_not_inputs(m)
    inline_constants(m.graph)
    sizes: dict[str, int] = {}
    types, ranks = infer_types(m, sizes)
    producers = {o: n for n in m.graph.node for o in n.output if o and types.get(o) == TensorProto.FLOAT}
    out_names = [o.name for o in m.graph.output]
    opset = next((i.version for i in m.opset_import if i.domain in ("", "ai.onnx")), 17)
    stats = _add_statistics(m, list(producers), np.random.default_rng(seed), ranks, opset, sizes)
    body = _add_body_statistics(m)
    session = make_session(m)
    acc = into or ProfileAccumulator({t: (producers[t].name, producers[t].op_type) for t in producers},
                                     {s.tensor: (s.node, s.op) for s in body}, runs_expected=len(feeds))
    outputs: list[Feed] = []
    for done, feed in enumerate(feeds, 1):
        values = dict(zip([o.name for o in m.graph.output], session.run(None, feed)))
        outputs.append({o: values[o] for o in out_names})
        acc.add_run(values, stats, {s.tensor: tuple(s.outs[k] for k in ("max", "min", "sum")) for s in body})
        if progress:
            progress(done, len(feeds))
    return acc.profile(outputs)


class ProfileAccumulator:
    """Turns per-run statistics (max, min, sum and the random sample of each tensor) into
    TensorRanges; shared by ``profile_ranges`` and the fixer's first emulation run, whose FP32
    twin carries the same statistics (so both give the same profile, bit for bit)."""

    def __init__(self, tensors: dict[str, tuple[str, str]], body: dict[str, tuple[str, str]] | None = None,
                 *, runs_expected: int | None = None) -> None:
        """``runs_expected``: the most runs ``add_run`` will get. Then each tensor keeps, of its
        samples' clean values, only their count, their FP16-subnormal count and the largest
        ``ceil(0.001 * SAMPLE * runs) + 2``: the 99.9th percentile lies among those, so the
        profile is the one every sample kept would give, bit for bit (tests), for a few dozen
        values instead of SAMPLE per tensor and run (28 MB a run on NAFNet-9)."""
        self.ranges = {t: TensorRange(t, node, op) for t, (node, op) in tensors.items()}
        self.body = set(body or {})
        self.ranges.update({t: TensorRange(t, node, op) for t, (node, op) in (body or {}).items()})
        self.samples: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
        self.runs = 0
        self.runs_expected = runs_expected
        self.keep = None if runs_expected is None else math.ceil(1e-3 * SAMPLE * runs_expected) + 2
        self.counts: dict[str, list[int]] = {t: [0, 0] for t in tensors}  # clean values, FP16-subnormal ones
        self.top: dict[str, np.ndarray] = {t: _NO_SAMPLE for t in tensors}

    def add_run(self, values: dict[str, np.ndarray], stats: dict[str, tuple[str, ...]],
                body_stats: dict[str, tuple[str, ...]] | None = None) -> None:
        """``stats``: tensor -> names of its (max, min, sum, sample) outputs in ``values``."""
        self.runs += 1
        if self.keep is not None and self.runs > self.runs_expected:
            raise RuntimeError(f"range profile: run {self.runs} of {self.runs_expected} expected")
        for t, (hi, lo, total, sample) in stats.items():
            _accumulate(self.ranges[t], float(values[hi]), float(values[lo]), float(values[total]), values[sample])
            if self.keep is None:
                self.samples[t].append(np.abs(values[sample]))
                continue
            clean = _clean(np.abs(values[sample]))
            counts = self.counts[t]
            counts[0] += clean.size
            counts[1] += int(np.count_nonzero((clean < FP16_MIN_NORMAL) & (clean > 0)))
            top = np.concatenate([self.top[t], clean])
            self.top[t] = np.partition(top, top.size - self.keep)[-self.keep:] if top.size > self.keep else top
        for t, names in (body_stats or {}).items():
            _accumulate(self.ranges[t], *(float(values[n]) for n in names), _NO_SAMPLE)

    def profile(self, outputs: list[Feed]) -> RangeProfile:
        for t, r in self.ranges.items():
            if self.keep is None:
                clean = _clean(np.concatenate(self.samples[t])) if self.samples.get(t) else _NO_SAMPLE
                size = clean.size
                subnormal = np.count_nonzero((clean < FP16_MIN_NORMAL) & (clean > 0)) if size else 0
            elif t in self.counts:
                size, subnormal = self.counts[t]
                # The values below the kept ones, as zeros: the percentile's neighbours are kept.
                clean = np.concatenate([np.zeros(size - self.top[t].size, np.float32), self.top[t]]) if size else _NO_SAMPLE
            else:
                size = 0
            if size:
                r.p999 = float(np.quantile(clean, 0.999))
                r.subnormal_fraction = float(subnormal / size)
                if r.fp32_nonfinite or r.sentinels:
                    r.absmax = max(r.absmax, float(clean.max()))
        for t in self.body:  # no sample inside bodies: the percentile is bounded by the absmax
            self.ranges[t].p999 = self.ranges[t].absmax
        return RangeProfile(self.ranges, runs=self.runs, outputs=outputs)


def profile_absmax(model: onnx.ModelProto, feeds: Sequence[Feed]) -> dict[str, float]:
    """FP32 absmax of every float tensor a node produces (sentinels and inf/NaN ignored)."""
    return profile_ranges(model, feeds).absmax()


def _accumulate(r: TensorRange, hi: float, lo: float, total: float, sample: np.ndarray) -> None:
    if not (math.isfinite(hi) and math.isfinite(lo) and math.isfinite(total)):
        r.fp32_nonfinite = True
    a = np.abs(sample)
    finite = a[np.isfinite(a)]
    r.sentinels += int(np.count_nonzero(finite >= SENTINEL_ABS)) or int(max(abs(hi), abs(lo)) >= SENTINEL_ABS and
                                                                         math.isfinite(max(abs(hi), abs(lo))))
    if not (r.fp32_nonfinite or r.sentinels):
        r.absmax = max(r.absmax, abs(hi), abs(lo))


def _add_body_statistics(m: onnx.ModelProto) -> list[BodySite]:
    """Max/min/sum of every float tensor inside If/Loop/Scan bodies, wired out of the bodies as
    the FP16 emulation does (emulation.control_flow), as graph outputs."""
    g = m.graph
    if not any(subgraphs(n) for n in g.node):
        return []
    opset = next((i.version for i in m.opset_import if i.domain in ("", "ai.onnx")), 17)
    cf = ControlFlowEmulator(body_types(m), strong=False, fp16_tensors=set(), pinned=set(), round_fp16=False,
                             with_stats=True, fp32_shadow=False, opset=opset, weights={}, new_inits=[])
    nodes, sites = [], []
    for node in g.node:
        nodes.append(node)
        if subgraphs(node):
            done = cf.emulate(node, set())
            nodes += done.after
            sites += done.sites
    del g.node[:]
    g.node.extend(nodes)
    g.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for s in sites for n in s.outs.values())
    return sites


def _clean(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a) & (a < SENTINEL_ABS)]


def _add_statistics(m: onnx.ModelProto, tensors: list[str], rng: np.random.Generator,
                    ranks: dict[str, int], opset: int, sizes: dict[str, int]) -> dict[str, tuple[str, ...]]:
    """Per tensor, max/min/sum reductions and a random sample as graph outputs, placed right
    after the tensor's producer so the tensor can be freed early (at the end of the graph they
    kept every activation alive: 1.2 GB instead of 0.2 GB on the 512x512 NAFNet demo). The
    reductions run in two steps (emulation.reductions: spread over threads; max and min exact)."""
    from onnx_fp16_rewrite.emulation.reductions import two_step

    g = m.graph
    wanted = set(tensors)
    empty_safe = opset >= 10
    new_inits = NewInitializers(stat_initializers(rng, empty_safe))
    known = {k: v for k, v in sizes.items() if k in wanted}
    stats = {}
    nodes = []
    for node in g.node:
        nodes.append(node)
        for t in node.output:
            if t in wanted:
                added: list[onnx.NodeProto] = []
                stats[t] = stat_nodes(t, added, empty_safe, known.get(t), new_inits)
                nodes += two_step(added, {t: ranks.get(t)}, opset, new_inits, known.get(t))
    g.initializer.extend(new_inits)
    del g.node[:]
    g.node.extend(nodes)
    for names in stats.values():
        g.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return stats


def stat_initializers(rng: np.random.Generator, empty_safe: bool = True) -> list[onnx.TensorProto]:
    """The constants ``stat_nodes`` reads (added once per graph)."""
    flat = numpy_helper.from_array(np.array([-1], np.int64), _FLAT)
    # Sample positions as fractions of the size: floor(u * size) needs only Cast/Mul/Floor,
    # legal from opset 7 (Mod is opset >= 10, Max on int64 >= 12). u < 1 - 1e-9 keeps the
    # double product below size for any size under 2**40.
    # Sorted, so the Gather reads memory in order (the hardware prefetches it): the sample is the
    # same set of values, and everything read from it (percentile, subnormal share) ignores order.
    frac = numpy_helper.from_array(np.sort(rng.uniform(0.0, 1.0 - 1e-9, SAMPLE)), _FRAC)
    inits = [flat, frac]
    if empty_safe:  # a [1] shape and a cap for the sample length (see stat_nodes)
        inits += [numpy_helper.from_array(np.array([1], np.int64), "__prof_one_d"),
                  numpy_helper.from_array(np.array(1.0), "__prof_one"),
                  numpy_helper.from_array(np.array([0], np.int64), "__prof_zero_d"),
                  numpy_helper.from_array(np.array(float(SAMPLE)), "__prof_n")]
    return inits


def stat_nodes(t: str, nodes: list[onnx.NodeProto], empty_safe: bool, size: int | None = None,
               inits: list[onnx.TensorProto] | None = None) -> tuple[str, ...]:
    """Appends to ``nodes`` the statistics of ``t``; returns the names of its (max, min, sum,
    sample) outputs. Reductions over all axes (no ``axes`` given: the same form at every opset).
    With ``empty_safe`` (Slice with input bounds: opset >= 10) an empty tensor gets an empty
    sample (SAMPLE * min(size, 1) positions) instead of a Gather out of bounds. A ``size`` known
    when the graph is built gets its sample positions as a constant in ``inits`` (shared per
    size; the same positions the graph would compute: float64 floor(u * size)), so a tensor costs
    five nodes instead of fifteen (session set-up time grows with the node count)."""
    flat, frac = _FLAT, _FRAC
    p = t + "__prof"
    names = (p + "_max", p + "_min", p + "_sum", p + "_sample")
    nodes.extend([
        helper.make_node("ReduceMax", [t], [names[0]], name=names[0], keepdims=0),
        helper.make_node("ReduceMin", [t], [names[1]], name=names[1], keepdims=0),
        helper.make_node("ReduceSum", [t], [names[2]], name=names[2], keepdims=0),
        helper.make_node("Reshape", [t, flat], [p + "_flat"], name=p + "_flat"),
    ])
    if size is not None and inits is not None:
        idx = f"__prof_idx_{size}"
        if find(inits, idx) is None:
            u = numpy_helper.to_array(find(inits, frac))
            positions = np.floor(u * float(size)).astype(np.int64) if size else np.zeros(0, np.int64)
            inits.append(numpy_helper.from_array(positions, idx))
        nodes.append(helper.make_node("Gather", [p + "_flat", idx], [names[3]], name=names[3], axis=0))
        return names
    nodes.extend([
        helper.make_node("Size", [t], [p + "_size"], name=p + "_size"),
        helper.make_node("Cast", [p + "_size"], [p + "_nf"], name=p + "_nf", to=TensorProto.DOUBLE),
        helper.make_node("Mul", [frac, p + "_nf"], [p + "_pos"], name=p + "_pos"),
        helper.make_node("Floor", [p + "_pos"], [p + "_floor"], name=p + "_floor"),
        helper.make_node("Cast", [p + "_floor"], [p + "_idx"], name=p + "_idx", to=TensorProto.INT64),
    ])
    idx = p + "_idx"
    if empty_safe:
        idx = p + "_idx_kept"
        nodes.extend([
            helper.make_node("Min", [p + "_nf", "__prof_one"], [p + "_any"], name=p + "_any"),
            helper.make_node("Mul", [p + "_any", "__prof_n"], [p + "_keepf"], name=p + "_keepf"),
            helper.make_node("Cast", [p + "_keepf"], [p + "_keep0"], name=p + "_keep0", to=TensorProto.INT64),
            helper.make_node("Reshape", [p + "_keep0", "__prof_one_d"], [p + "_keep"], name=p + "_keep"),
            helper.make_node("Slice", [p + "_idx", "__prof_zero_d", p + "_keep"], [idx], name=idx),
        ])
    # Without it an empty tensor gives index 0, and its Gather fails loudly.
    nodes.append(helper.make_node("Gather", [p + "_flat", idx], [names[3]], name=names[3], axis=0))
    return names
