"""CPU emulation of an FP16 engine: FP16 storage, FP32 compute, at ONNX Runtime speed.

ORT CPU cannot answer "is this graph FP16-safe?" by itself: it runs chains of FP16 ops in FP32
(its InsertCastTransformer), so an FP16 model that overflows on a GPU passes on ORT. We instead
rewrite the model into an FP32 graph in which every tensor an FP16 engine would store in FP16 is
rounded through FP16 (Cast→FLOAT16→FLOAT) right where it is produced, and every FP32 tensor read by
an FP16 layer is rounded on that edge. Compute inside a node stays FP32, which is what TensorRT's
FP16 kernels do for their accumulators. Per-tensor absmax and non-finite counts are reduced to
scalars inside the graph, so memory stays that of one inference.

Two modes, chosen from the model:
- ``weak``: an FP32 graph plus a precision plan (a weakly typed ``--fp16`` build with
  ``--layerPrecisions``): nodes pinned to FP32 store FP32, all others FP16.
- ``strong``: a mixed-precision graph (``--stronglyTyped`` / TensorRT 11): tensors typed FLOAT16
  are FP16, FLOAT tensors FP32, exactly as typed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_fp16_rewrite.emulation.control_flow import ControlFlowEmulator, body_types
from onnx_fp16_rewrite.emulation.fp16_graph_edits import (
    copy_node,
    names_read_by_subgraphs,
    retype_fp16_as_fp32,
    SHADOW,
    round_nodes,
    rounded_edge,
    shadow_nodes,
    strict_cumsum_nodes,
    subgraphs,
    weights_not_inputs,
)
from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.io.ort_runner import Feed, infer_types, run_model
from onnx_fp16_rewrite.io.sessions import run_cached
from onnx_fp16_rewrite.emulation.reductions import two_step
from onnx_fp16_rewrite.emulation.shadow_errors import shadow_statistics
from onnx_fp16_rewrite.emulation.stat_sites import BODY_STATS, StatSite, alias_site, site_stat_nodes, sum_node
# The report side lives in fp16_report; its names are re-exported here for existing importers.
from onnx_fp16_rewrite.emulation.fp16_report import (  # noqa: F401
    FP16_MAX,
    Fp16Report,
    OutputCheck,
    TensorFinding,
    compare_output,
    findings as _findings,
    site_stats,
)
from onnx_fp16_rewrite.emit.index_arithmetic import index_arithmetic_nodes
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emit.schema_types import fixed_type_inputs, inline_constants
from onnx_fp16_rewrite.emulation.new_initializers import NewInitializers

logger = logging.getLogger(__name__)

_FLOAT = TensorProto.FLOAT
_FLOAT16 = TensorProto.FLOAT16
# Ops whose output values are some of their inputs' values (moved, selected, negated): an FP16
# node reads FP16 values (rounded where produced or on the edge, FP16 weights, rounded inputs), so
# its output is FP16 already and its rounding Casts would change nothing: they are left out.
EXACT_IN_FP16 = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "GatherElements",
    "GatherND", "Split", "Concat", "Pad", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Relu", "Neg", "Abs",
    "Max", "Min", "Where", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin",
})


@dataclass
class EmulationModel:
    """The rewritten FP32 graph plus what its extra (statistics) outputs mean."""

    model: onnx.ModelProto
    mode: str
    sites: list[StatSite]
    fp16_inputs: set[str]
    fp16_nodes: int
    fp32_nodes: int
    notes: list[str]
    unhandled_bodies: list[str] = field(default_factory=list)  # control flow not emulated: no PASS
    # With an FP32 shadow: graph output -> the graph output carrying its FP32 value (the reference).
    twin_outputs: dict[str, str] = field(default_factory=dict)
    # A weakly typed screen: each FP32 tensor rounded on an edge into FP16 layers -> its sum.
    edge_sums: dict[str, str] = field(default_factory=dict)


def build_emulation(
    model: onnx.ModelProto,
    plan: PrecisionPlan | None = None,
    *,
    strict_cumsum: bool = False,
    round_fp16: bool = True,
    with_stats: bool = True,
    fp32_shadow: bool | Literal["strong"] = False,
    shadow_ranges: Container[str] | None = None,
    shadow_errors: bool = True,
    twin_profile: bool = False,
    nonfinite_only: bool = False,
) -> EmulationModel:
    """Rewrite ``model`` into the emulation graph (see the module docstring).

    ``round_fp16=False`` keeps everything FP32 (the model's own FP32 outputs, for a
    mixed-precision graph too). ``strict_cumsum`` makes FP16 CumSums accumulate in FP16 (a Scan
    that rounds its running sum each step), as TensorRT <= 10.7 builds them (an ILoop whose
    running sum has the tensor's type). ``fp32_shadow`` adds an untouched FP32 copy of the graph
    and, per tensor, its FP16 error against it (``onnx_fp16_rewrite.emulation.error_attribution`` reads them): where along the
    graph the FP16 result departs from FP32, precision failures included. With a shadow and
    ``with_stats=False`` a tensor gets only its error reductions (the squared error's sum is
    non-finite exactly when the FP16 value or its twin is), and the twin's max/min only where
    ``shadow_ranges`` (None: every tensor) names it: three reductions a tensor instead of eight;
    large tensors get sampled error statistics (emulation.shadow_errors). A shadow also returns
    the FP32 values of the graph outputs (``twin_outputs``: the reference, no separate FP32 run);
    ``shadow_errors=False`` leaves out the error statistics (the twin gives only the reference),
    ``twin_profile`` adds the range profile's statistics of every twin tensor
    (``profile_outs``: the profile comes from this run). ``nonfinite_only``: a main-graph
    tensor's statistics are one sum of its stored (FP16-rounded) value, non-finite exactly when
    it holds inf/NaN, an FP16 overflow included (a screen: no absmax). ``fp32_shadow="strong"``: only if strongly typed.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights_not_inputs(m)
    inline_constants(m.graph)
    sizes: dict[str, int] = {}
    types, ranks = infer_types(m, sizes)
    sub_types = body_types(m)  # If/Loop/Scan bodies: emulated like the main graph (control_flow)
    mode = "strong" if any(t == _FLOAT16 for t in (*types.values(), *sub_types.values())) else "weak"
    if fp32_shadow == "strong":
        fp32_shadow = mode == "strong"
    notes: list[str] = []
    g = m.graph
    if mode == "strong":
        fp16_tensors = {name for name, t in (*types.items(), *sub_types.items()) if t == _FLOAT16}
        retype_fp16_as_fp32(m)
        types = {k: (_FLOAT if v == _FLOAT16 else v) for k, v in types.items()}
        pinned: set[str] = set()
    else:
        fp16_tensors = set()
        pinned = set(plan.fp32_nodes) if plan else set()
        # Index arithmetic (bucket math ending in an int Cast) stays FP32, as --emit mixed types it.
        pinned |= {g.node[k].name for k in index_arithmetic_nodes(g, types) if g.node[k].name}
    is_float = {k for k, v in types.items() if v == _FLOAT}
    shadows = shadow_nodes([copy_node(n) for n in g.node]) if fp32_shadow else []
    opset = default_opset(m)

    new_nodes: list[onnx.NodeProto] = []
    sites: list[StatSite] = []
    rounded_edges: dict[str, str] = {}
    new_inits: list[onnx.TensorProto] = NewInitializers()
    init_by_name = {i.name: i for i in g.initializer}
    fp16_inputs = {i.name for i in g.input if i.name in fp16_tensors} if round_fp16 else set()
    fp16_nodes = fp32_nodes = 0
    cf = ControlFlowEmulator(
        {**sub_types, **types}, strong=mode == "strong", fp16_tensors=fp16_tensors, pinned=pinned,
        round_fp16=round_fp16, with_stats=with_stats, fp32_shadow=fp32_shadow, opset=opset,
        weights=init_by_name, new_inits=new_inits,
    ) if sub_types or any(subgraphs(n) for n in g.node) else None
    produced = {o for n in g.node for o in n.output if o} if fp32_shadow else set()
    # Statistics that read a tensor and its twin together (control flow's body statistics may).
    paired = shadow_errors or twin_profile or cf is not None
    late_twin: list[onnx.NodeProto] = []
    unhandled: list[str] = []
    fp16_valued: set[str] = set()  # weakly typed: tensors an emulated (FP16) node produced
    edge_sums: dict[str, str] = {}
    site_of: dict[str, StatSite] = {}  # main-graph tensor -> its own site
    aliases: set[int] = set()  # sites that read another's outputs (no outputs of their own)

    for i, node in enumerate(g.node):
        float_outs = [o for o in node.output if o and o in is_float]
        if mode == "strong":
            node_fp16 = any(o in fp16_tensors for o in float_outs)
        else:
            node_fp16 = node.name not in pinned
        if float_outs:
            fp16_nodes += node_fp16
            fp32_nodes += not node_fp16
        emulate = round_fp16 and node_fp16
        data_rank = ranks.get(node.input[0]) if node.input else None
        # Weakly typed: an FP16 layer reads FP16 inputs, so an FP32 tensor is rounded on the edge;
        # one an emulated node produced is FP16 already (rounding it again would change no bit).
        if emulate and mode == "weak":
            fixed = fixed_type_inputs(node, opset)
            for idx, name in enumerate(node.input):
                if not name or name not in is_float or idx in fixed or name in fp16_valued:
                    continue
                rounded = node.input[idx] = rounded_edge(name, init_by_name, rounded_edges, new_inits, new_nodes)
                if nonfinite_only and with_stats and name not in init_by_name and rounded not in edge_sums:
                    # A screen also sums what an FP16 layer reads of an FP32 tensor (emulation.same_values).
                    edge_sums[rounded] = rounded + "__edge_sum"
                    new_nodes += two_step([sum_node(rounded, edge_sums[rounded])], {rounded: ranks.get(name)},
                                          opset, new_inits, sizes.get(name))
        renamed = {}
        if emulate and not (node.op_type in EXACT_IN_FP16 and node.domain in ("", "ai.onnx")):
            for idx, out in enumerate(node.output):
                if out in is_float:
                    renamed[out] = out + "__raw"
                    node.output[idx] = out + "__raw"
        if emulate and strict_cumsum and node.op_type == "CumSum" and node.domain in ("", "ai.onnx"):
            scan = strict_cumsum_nodes(node, init_by_name, data_rank, new_inits)
            if scan is None:
                notes.append(f"strict CumSum not applied to {node.name!r}: axis or rank unknown")
                new_nodes.append(node)
            else:
                new_nodes.extend(scan)
        else:
            new_nodes.append(node)
        if cf is not None and subgraphs(node):
            body = cf.emulate(node, produced)
            new_nodes.extend(body.after)
            fp16_nodes, fp32_nodes = fp16_nodes + body.fp16_nodes, fp32_nodes + body.fp32_nodes
            unhandled += body.unhandled
            sites += [StatSite(b.tensor, b.node, b.op, b.fp16, *(b.outs.get(k) for k in BODY_STATS))
                      for b in body.sites]
        if emulate and mode == "weak":
            fp16_valued.update(float_outs)  # rounded below, or exact: values of FP16 inputs
        own = []  # outputs with statistics of their own (the others alias their input's: stat_sites)
        for out in float_outs:
            raw = renamed.get(out, out)
            if raw != out:
                new_nodes.extend(round_nodes(raw, out))
            ranged = shadow_ranges is None or out in shadow_ranges
            alias = alias_site(node, out, site_of, emulate, sizes, bool(fp32_shadow) and shadow_errors and ranged
                               and not twin_profile) if nonfinite_only or not with_stats else None
            if alias is not None:
                sites.append(alias)
                aliases.add(id(alias))
                continue
            own.append(out)
            if with_stats:
                stats: list[onnx.NodeProto] = []
                site_of[out] = site_stat_nodes(out, raw, node, emulate, stats, nonfinite_only)
                sites.append(site_of[out])
                new_nodes += two_step(stats, {raw: ranks.get(out), out: ranks.get(out)}, opset, new_inits, sizes.get(out))
        if fp32_shadow:
            # The FP32 twin right after its node, and the error reductions right after it, so
            # each pair of tensors is freed early (all at the end kept every activation alive).
            # Without statistics of pairs the twin runs after the emulation instead: each half's
            # working set alone in cache (NAFNet-9's check run 1.86 -> 1.70 s; the same bits).
            (new_nodes if paired else late_twin).append(shadows[i])
            for out in own:
                if with_stats:
                    site = site_of[out]
                else:
                    site = site_of[out] = StatSite(out, node.name, node.op_type, emulate, None, None, None)
                    sites.append(site)
                new_nodes.extend(shadow_statistics(site, ranks.get(out), sizes.get(out), opset, new_inits,
                                                   errors=shadow_errors, profile=twin_profile,
                                                   ranged=shadow_ranges is None or out in shadow_ranges))
    del g.node[:]
    g.node.extend(new_nodes + late_twin)
    g.initializer.extend(new_inits)
    # Weights now read only through their FP16-rounded copies would sit in memory twice.
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    used |= names_read_by_subgraphs(g)
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]
    for site in (s for s in sites if id(s) not in aliases):
        g.output.extend(helper.make_tensor_value_info(name, _FLOAT, []) for name in site.outputs()
                        if name not in site.profile_outs[3:])
        g.output.extend(helper.make_tensor_value_info(name, _FLOAT, None) for name in site.profile_outs[3:])
    g.output.extend(helper.make_tensor_value_info(name, _FLOAT, []) for name in edge_sums.values())
    twin_outputs = {}
    if fp32_shadow:
        for o in list(g.output[:len(model.graph.output)]):
            twin_outputs[o.name] = o.name + SHADOW if o.name in produced else o.name
            if o.name in produced:
                twin = g.output.add()
                twin.CopyFrom(o)
                twin.name = o.name + SHADOW
    for why in unhandled:
        logger.warning("FP16 emulation incomplete: %s", why)
    return EmulationModel(m, mode, sites, fp16_inputs, fp16_nodes, fp32_nodes, notes + unhandled, unhandled,
                          twin_outputs, edge_sums)


@weights.shares_model  # each weight held once by the emulation and its sessions (io.weights)
def check_fp16(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    reference: Sequence[Feed] | None = None,
    *,
    plan: PrecisionPlan | None = None,
    strict_cumsum: bool = False,
    rel_l2_tolerance: float = 1e-2,
    max_findings: int = 5,
    cache: bool = False,
    screen: bool = False,
    exact_findings: bool = True,
    fp32_outputs: list[Feed] | None = None,
    fp32_run: Sequence[Feed] | None = None,
    before_run: Callable[[], None] | None = None,
) -> Fp16Report:
    """Emulate an FP16 engine on ``feeds`` and compare every output with ``reference``
    (``cache``: through ``onnx_fp16_rewrite.io.sessions``, for a graph that will run again).

    ``reference`` should be the FP32 outputs of the original FP32 model; when it is None the
    model itself is run in FP32 (for a mixed-precision model that means FP32 compute with its
    FP16-rounded weights). A model with no precision plan given uses the plan stored in it.
    ``screen``: per tensor only one sum of its stored value (``build_emulation(nonfinite_only=)``,
    a third of the statistics); when that shows a failure, ``exact_findings`` runs the full
    statistics for the report's findings (callers that only ask "clean?" skip that run). Clean
    means the same either way, but for values in (65504, 65520), which FP16 rounds to 65504:
    the full statistics count them as overflow, the screen does not. ``fp32_outputs``: a list
    that receives the FP32 outputs compared against, one dict per feed (the FP32 twin's when
    no ``reference`` is given: the model's own FP32 run). ``fp32_run``: the model's outputs from a
    plain FP32 run of it on ``feeds`` (ORT, optimizations off: the CLI's preflight), one dict per
    feed; where the FP32 twin would compute exactly that (no ``reference``, an FP32 model without
    control flow) they stand in for it: the same report, without the twin's half of the run.
    ``before_run``: called after the graph's build, before any ORT run (the CLI's preflight ends there).
    """
    start = time.perf_counter()
    if plan is None:
        plan = PrecisionPlan.from_model(model)
    # Without a reference, the FP32 model runs as a twin in the emulation graph (one session, one run a feed),
    # unless control flow would need its bodies twinned, or an FP16-typed input is fed FP32 values (rounded for both).
    half_in = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == _FLOAT16]
    twin = (reference is None and not any(subgraphs(n) for n in model.graph.node)
            and all(np.asarray(f[n]).dtype == np.float16 for f in feeds for n in half_in if n in f))
    given = twin and fp32_run is not None and len(fp32_run) == len(feeds)
    # FP16 tensors ("strong"): the twin computes them in FP32, a plain run in FP16, so only it will do.
    emu = build_emulation(model, plan, strict_cumsum=strict_cumsum, fp32_shadow="strong" if given else twin,
                          shadow_errors=False, nonfinite_only=screen)
    given = given and emu.mode == "weak"
    if before_run is not None:
        before_run()
    if reference is None and not twin:
        reference = _fp32_outputs(model, feeds)
    out_names = [o.name for o in model.graph.output]
    # Cached: the fixer's last accepted plan and the final verification run the same graph.
    # Optimizations off beside the twin (its outputs must be a plain FP32 run's), and where a plain
    # run stands in for it (the FP16 values as with the twin, bit for bit).
    runs = run_cached(emu.model, [emu_feed(f, emu.fp16_inputs) for f in feeds], optimize=not twin, cache=cache)
    if given:
        reference = [{n: np.asarray(r[n]) for n in out_names} for r in fp32_run]
    elif twin:
        reference = [{k: r[t] for k, t in emu.twin_outputs.items()} for r in runs]
    if fp32_outputs is not None:
        fp32_outputs[:] = [{n: ref[n] for n in out_names} for ref in reference]
    outputs = [
        compare_output(name, [r[name] for r in runs], [ref[name] for ref in reference], rel_l2_tolerance)
        for name in out_names
    ]
    findings = _findings(emu.sites, runs)
    if screen and exact_findings and (findings or not all(o.ok for o in outputs)):
        # The screen failed: the full statistics name the failing tensors with their absmax.
        return check_fp16(model, feeds, reference, plan=plan, strict_cumsum=strict_cumsum,
                          rel_l2_tolerance=rel_l2_tolerance, max_findings=max_findings, cache=cache,
                          fp32_outputs=fp32_outputs, fp32_run=fp32_run)
    report = Fp16Report(
        mode=emu.mode,
        strict_cumsum=strict_cumsum,
        fp16_nodes=emu.fp16_nodes,
        fp32_nodes=emu.fp32_nodes,
        outputs=outputs,
        first_failures=findings[:max_findings],
        failing_tensors=len(findings),
        rel_l2_tolerance=rel_l2_tolerance,
        passed=all(o.ok for o in outputs) and not emu.unhandled_bodies,
        seconds=round(time.perf_counter() - start, 3),
        notes=emu.notes,
        edges_finite=all(np.isfinite(float(r[o])) for r in runs for o in emu.edge_sums.values())
        if emu.edge_sums else None,
    )
    logger.info("FP16 emulation (%s): %s, %d failing tensors", emu.mode, "passed" if report.passed else "FAILED",
                len(findings))
    return report


def _fp32_outputs(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[Feed]:
    emu = build_emulation(model, None, round_fp16=False, with_stats=False)
    names = [o.name for o in model.graph.output]
    return run_model(emu.model, [emu_feed(f, set()) for f in feeds], names)


def emu_feed(feed: Feed, fp16_inputs: set[str]) -> Feed:
    out = {}
    for name, value in feed.items():
        arr = np.asarray(value)
        if arr.dtype == np.float16 or name in fp16_inputs:
            with np.errstate(over="ignore"):
                arr = arr.astype(np.float16).astype(np.float32)
        out[name] = arr
    return out


def default_opset(m: onnx.ModelProto) -> int:
    """The model's default-domain opset (17 when it imports none)."""
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 17
