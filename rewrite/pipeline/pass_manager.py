"""The pass manager: snapshot -> run a pass -> check -> validate -> keep or roll back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.errors import one_line
from onnx_fp16_rewrite.io.model_io import check_model
from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.pipeline.pass_base import Pass, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.pipeline.validate import Tolerance, ValidationResult, Validator
from onnx_fp16_rewrite.report.graph_diff import NodeChanges, node_changes

logger = logging.getLogger(__name__)

HISTORY_KEY = "onnx_fp16_rewrite.passes"


@dataclass
class PassRecord:
    """What happened to one pass. ``status``: kept, unchanged, rolled-back, or refused (the
    caller's ``refuse`` turned the rewritten model down before validation; ``error`` says why)."""

    name: str
    options: dict[str, object]
    status: str
    rewritten: list[Site] = field(default_factory=list)
    skipped: list[Site] = field(default_factory=list)
    validation: ValidationResult | None = None
    error: str | None = None
    seconds: float = 0.0
    # Nodes the kept pass added, removed, changed or pinned (onnx_fp16_rewrite.report.graph_diff);
    # the fixer's annotations and the reports' diff sections read it.
    changes: NodeChanges | None = None
    values_changed: list[str] | None = None  # the pass's PassResult.values_changed
    rounding_only: bool = False  # the pass's PassResult.rounding_only


@dataclass
class RunReport:
    passes: list[PassRecord]
    renamed_nodes: int
    fp32_nodes: dict[str, str]

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status == "rolled-back"]

    def to_dict(self) -> dict:
        return asdict(self)


class PassManager:
    """Runs passes in order on a model, validating each against the original's FP32 outputs.

    A pass that raises, breaks the ONNX checker or shape inference, or fails validation is
    rolled back from a snapshot taken before it ran; the run goes on with the next pass.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        feeds: Sequence[Feed],
        *,
        tolerance: Tolerance = Tolerance(),
        per_output: Mapping[str, Tolerance] | None = None,
        initial_absmax: Mapping[str, float] | None = None,
        reference: Sequence[Feed] | None = None,
        outputs_of: Callable[[onnx.ModelProto, PassRecord], Sequence[Feed]] | None = None,
        refuse: Callable[[onnx.ModelProto, PassRecord], str | None] | None = None,
        judge: Callable | None = None,
    ) -> None:
        """``initial_absmax``: FP32 ranges already measured on ``feeds`` for the model ``run``
        will get, so the first pass need not measure them again; ``reference``: that model's FP32
        outputs on ``feeds``, likewise (the validator then runs only the rewritten models);
        ``outputs_of(model, record)``: gives a rewritten model's FP32 outputs on ``feeds`` instead
        of a validation run (the fixer's candidate diagnosis computes them anyway; the pass's
        record says which values it changed); ``refuse(model, record)``: a reason to drop a
        rewritten model before its validation (the fixer: it cannot fix any failure site), or None;
        ``judge``: every pass's ``PassContext.judge`` (the fixer's cut-out judge)."""
        self.reference = reference
        self.judge = judge
        self.refuse = refuse
        self.outputs_of = outputs_of
        self.passes = list(passes)
        self.initial_absmax = dict(initial_absmax) if initial_absmax is not None else None
        self.feeds = list(feeds)
        self.tolerance = tolerance
        self.per_output = dict(per_output or {})
        self.validator: Validator | None = None

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, RunReport]:
        current = onnx.ModelProto()
        current.CopyFrom(model)
        renamed = name_nodes(current)
        self.validator = Validator(current, self.feeds, default=self.tolerance, per_output=self.per_output,
                                   reference=self.reference)
        records = []
        absmax = self.initial_absmax
        for p in self.passes:
            record, current = self._run_one(p, current, absmax)
            records.append(record)
            absmax = absmax if record.status != "kept" else None
        plan = PrecisionPlan.from_model(current)
        return current, RunReport(records, renamed, dict(plan.fp32_nodes))

    def _run_one(
        self, p: Pass, model: onnx.ModelProto, absmax: dict[str, float] | None
    ) -> tuple[PassRecord, onnx.ModelProto]:
        assert self.validator is not None
        start = time.perf_counter()
        record = PassRecord(p.name, p.options(), "unchanged")
        quick = p.nothing_to_do(model)
        if quick is not None:  # what run would return: no copy, no import
            assert not quick.modified, f"{p.name}.nothing_to_do returned a modified result"
            record.rewritten, record.skipped, record.values_changed = quick.rewritten, quick.skipped, quick.values_changed
            record.seconds = _since(start)
            return record, model
        # A protobuf copy is deep: unlike gs.Graph.copy() it shares no weights with the pass's graph.
        snapshot = onnx.ModelProto()
        snapshot.CopyFrom(model)
        ctx = PassContext(model=snapshot, feeds=self.feeds, plan=PrecisionPlan.from_model(model), _absmax=absmax,
                          judge=self.judge)
        try:
            graph = weights.import_graph(model)  # large weights readable, kept as references
            result = p.run(graph, ctx)
            record.rewritten, record.skipped = result.rewritten, result.skipped
            record.values_changed, record.rounding_only = result.values_changed, result.rounding_only
            if not result.modified:
                record.seconds = _since(start)
                logger.info("%s: nothing to do (%d sites skipped)", p.name, len(result.skipped))
                return record, snapshot
            candidate = _export(graph, snapshot, ctx.plan, p.name)
            check_model(candidate, f"the model after {p.name}", strict_shapes=True)
        except Exception as exc:  # any failure inside a pass must roll back, whatever its type
            record.status, record.error = "rolled-back", f"{p.name} failed: {type(exc).__name__}: {one_line(exc)}"
            record.seconds = _since(start)
            logger.warning("%s rolled back: %s", p.name, record.error)
            return record, snapshot
        # Outside the pass's try: a failing ``refuse`` is the caller's bug, not the pass's.
        reason = self.refuse(candidate, record) if self.refuse is not None else None
        if reason:
            record.status, record.error, record.seconds = "refused", reason, _since(start)
            logger.info("%s refused: %s", p.name, reason)
            return record, snapshot
        outputs_of = (lambda m: self.outputs_of(m, record)) if self.outputs_of is not None else None
        record.validation = self.validator.validate(candidate, outputs_of=outputs_of)
        record.seconds = _since(start)
        if not record.validation.ok:
            record.status = "rolled-back"
            record.error = f"{p.name} failed FP32 validation: {record.validation.summary()}"
            logger.warning("%s rolled back: %s", p.name, record.error)
            return record, snapshot
        record.status = "kept"
        record.changes = node_changes(snapshot, candidate, types=False)
        logger.info("%s: kept (%d sites rewritten)", p.name, len(record.rewritten))
        return record, candidate


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed or duplicate-named node a unique name (the plan is keyed by names,
    and TensorRT names its layers after them); returns how many were renamed."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 0
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        node.name = name
        seen.add(name)
        renamed += 1
    return renamed


def _export(graph: gs.Graph, before: onnx.ModelProto, plan: PrecisionPlan, pass_name: str) -> onnx.ModelProto:
    graph.cleanup().toposort()
    weights.keep_refs(graph)
    out = gs.export_onnx(graph)
    # graphsurgeon rebuilds the ModelProto: carry over what it does not know about.
    # Keep the input's IR version unless a pass raised the opset past what it can carry.
    needed = onnx.helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True)
    out.ir_version = max(before.ir_version, needed)
    out.producer_name, out.producer_version = before.producer_name, before.producer_version
    out.doc_string = before.doc_string
    out.metadata_props.extend(p for p in before.metadata_props if p.key != HISTORY_KEY)
    history = next((p.value for p in before.metadata_props if p.key == HISTORY_KEY), "")
    out.metadata_props.add(key=HISTORY_KEY, value=",".join(filter(None, [history, pass_name])))
    name_nodes(out)
    plan.store_in(out)
    return out


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)
