"""Canonicalisation, run by every entry point before diagnosis and rewrites.

Real exporters do not emit the clean graphs rewrites match: TorchScript computes ``F.pad``'s pads
with ConstantOfShape/Concat/Reshape/Slice/Transpose, divides attention by a scale built from
``Shape``, builds ``ones_like`` count images from shapes, keeps ``.to(torch.float32)`` as a no-op
Cast; Paddle declares ``-1`` dims. ``canonicalize(model, feeds)`` returns a model with

1. dims that are not sizes made unknown (``-1`` anywhere, ``0`` in graph inputs), so no shape
   arithmetic ever sees -1 as a size;
2. unique node names (surviving nodes keep theirs: the precision plan and ``--layerPrecisions``
   refer to them);
3. everything constant *for every accepted input shape* folded (onnx-graphsurgeon's
   ``fold_constants`` with symbolic shape inference, iterated), and no-op Casts removed;
4. when shape arithmetic on dynamic dims remains (and all feeds share one shape): the model
   *specialised* to the feeds' shape, every Shape/Size folded with the shapes traced from an ORT
   run, so the analysis and the rewrites see literals everywhere.

Why graphsurgeon: on a TorchScript ``F.pad`` + ``ones_like`` + ``v.size(-1) ** 0.5`` export it
folds the pads chain and the scale (42 -> 11 nodes) and leaves every other node, name and bit as
it was; the onnxscript optimizer (0.7.2) left the pads chain and the scale unfolded (23 nodes);
onnxslim folds as well but also fuses (Conv+BN, GELU ...), which renames nodes and changes FP32
rounding: not a canonicalisation we can promise is the identity.

The emitted model keeps its dynamic dims. Analysis and rewrites run on the specialised model;
``restore_dynamic`` then puts the dynamic graph's shape arithmetic back in place of the constants
specialisation made (same tensor names) and restores the declared dims, and proves the result on
a second input shape against the original (``restore.py``). When that fails — a rewrite baked a
shape in — the emitted model stays specialised and the report says so (the CLI on stderr).

Every result is validated like a pass: ORT outputs against the original's within rtol/atol 1e-5
(the float64 rule of ``Validator`` included); a canonical form that fails is not used. A step that
only folded exact shape arithmetic and removed no-op Casts is proved instead, without a run: it
computes every float value as the original does, bit for bit (``same_computation``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import onnx

from onnx_fp16_rewrite.canonical.casts import remove_noop_casts
from onnx_fp16_rewrite.canonical.dependence import shape_dependent
from onnx_fp16_rewrite.canonical.fold import fold_dynamic, sanitize_dims, specialise as _specialise
from onnx_fp16_rewrite.canonical.restore import reattach, verify_dynamic
from onnx_fp16_rewrite.canonical.same_computation import different_computation
from onnx_fp16_rewrite.canonical.shared import fresh_tensor_name, unshare_constant
from onnx_fp16_rewrite.canonical.trace import feed_signature, trace_shapes
from onnx_fp16_rewrite.errors import one_line
from onnx_fp16_rewrite.io.model_io import check_model, past_proto_limit
from onnx_fp16_rewrite.io.ort_runner import Feed, infer_types, run_model
from onnx_fp16_rewrite.pipeline.validate import Tolerance, Validator

__all__ = ["CanonReport", "canonicalize", "computes_as_given", "confirm", "fresh_tensor_name", "unconfirmed", "restore_dynamic", "trace_shapes",
           "unshare_constant"]

logger = logging.getLogger(__name__)

MARK_KEY = "onnx_fp16_rewrite.canonical"

Specialise = Literal["auto", "never", "always"]


@dataclass
class CanonReport:
    """What canonicalisation did. ``specialised``: the analysed model has the feeds' concrete input
    shapes; ``emitted_dynamic``: whether the emitted model got its dynamic dims back (None until
    ``restore_dynamic`` ran, or when nothing was specialised)."""

    nodes_before: int = 0
    nodes_after: int = 0
    folded: int = 0
    constant_nodes: int = 0
    casts_removed: list[str] = field(default_factory=list)
    casts_kept: list[str] = field(default_factory=list)
    renamed_nodes: int = 0
    unknown_dims: int = 0
    shape_nodes_dynamic: int = 0
    specialised: bool = False
    specialised_shapes: dict[str, list[int]] = field(default_factory=dict)
    specialised_reason: str = ""
    emitted_dynamic: bool | None = None
    notes: list[str] = field(default_factory=list)
    validation: str = ""
    skipped: bool = False

    def changed(self) -> bool:
        """Whether canonicalisation changed anything a user would want to hear about."""
        return not self.skipped and bool(self.nodes_before != self.nodes_after or self.casts_removed
                                         or self.renamed_nodes or self.unknown_dims or self.specialised)

    def summary(self) -> str:
        if self.skipped:
            return "canonical: already canonical"
        text = (f"canonical: {self.nodes_before} -> {self.nodes_after} nodes ({self.folded} folded, "
                f"{len(self.casts_removed)} no-op Casts removed, {self.renamed_nodes} renamed"
                f"{f', {self.unknown_dims} -1/0 dims made dynamic' if self.unknown_dims else ''})")
        if self.specialised:
            text += f"; analysed specialised to {_shapes_text(self.specialised_shapes)}"
            if self.emitted_dynamic is True:
                text += ", emitted with its dynamic dims"
            elif self.emitted_dynamic is False:
                text += ", EMITTED SPECIALISED"
        return text

    def specialised_warning(self) -> str | None:
        """The line the CLI prints on stderr when the emitted model lost its dynamic dims."""
        if self.specialised and self.emitted_dynamic is False:
            return (f"the emitted model is specialised to {_shapes_text(self.specialised_shapes)} "
                    f"(it no longer accepts other input shapes): {self.notes[-1] if self.notes else ''}")
        return None


def canonicalize(model: onnx.ModelProto, feeds: Sequence[Feed], *, specialise: Specialise = "auto",
                 tolerance: Tolerance = Tolerance(), confirm_later: bool = False,
                 known_outputs: Sequence[Feed] = ()) -> tuple[onnx.ModelProto, CanonReport]:
    """The canonical form of ``model`` for analysis and rewrites (see the module docstring).
    ``specialise``: ``auto`` when dynamic shape arithmetic remains, ``never``, or ``always``.
    ``confirm_later``: the result's FP32 validation waits for ``confirm(report, result, outputs)``
    with its outputs from a run the caller makes anyway (the fixer's first diagnosis: one FP32
    run fewer); if that fails, the caller canonicalises again without it (each step validated).
    ``known_outputs``: the original's FP32 outputs on the first feeds, already computed (the
    CLI's preflight run; ORT with optimizations off, as the validation's own run)."""
    from onnx_fp16_rewrite.pipeline.pass_manager import name_nodes

    if any(p.key == MARK_KEY for p in model.metadata_props):
        report = CanonReport(nodes_before=len(model.graph.node), nodes_after=len(model.graph.node), skipped=True)
        object.__setattr__(report, "_as_given", True)
        return model, report
    report = CanonReport(nodes_before=len(model.graph.node))
    report.constant_nodes = sum(n.op_type == "Constant" for n in model.graph.node)
    work = _copy(model)
    report.unknown_dims = sanitize_dims(work)
    report.renamed_nodes = name_nodes(work)
    # The reference is the original with only its dims relaxed (ORT refuses a feed for a declared 0 dim);
    # it runs only when something changed.
    validator = _LazyValidator(work, feeds, tolerance, confirm_later, known_outputs)
    if past_proto_limit(work):
        report.notes.append("model past 2 GiB: not folded")
        candidate = work
    else:
        try:
            candidate = fold_dynamic(work)
        except Exception as exc:  # graphsurgeon or ORT cannot fold this graph: leave it as it is
            report.notes.append(f"not folded: {type(exc).__name__}: {one_line(exc)}")
            candidate = work
        if len(candidate.graph.node) == len(work.graph.node):
            candidate = work  # nothing folded: keep the graph as it was, no graphsurgeon round trip
    candidate, removed, kept = remove_noop_casts(_copy(candidate))
    dynamic = work
    if len(candidate.graph.node) != len(work.graph.node):
        dynamic = _checked(candidate, work, validator, report, "folding and no-op Cast removal")
    if dynamic is not work:
        report.casts_removed, report.casts_kept = removed, kept
    try:
        types, _ = infer_types(dynamic)
    except Exception:  # types only refine the report
        types = {}
    dependent, floats = shape_dependent(dynamic, types)
    report.shape_nodes_dynamic = len(dependent)
    result = dynamic
    signature = feed_signature(feeds)
    wanted = specialise == "always" or (specialise == "auto" and bool(dependent))
    if wanted and signature is None:
        report.notes.append("not specialised: the feeds have different shapes")
    elif wanted and not past_proto_limit(dynamic):
        try:
            traced = trace_shapes(dynamic, feeds[0])
            spec = _specialise(dynamic, signature, traced)
            spec, removed2, _ = remove_noop_casts(spec)
            report.casts_removed += removed2
            spec = _checked(spec, dynamic, validator, report, "specialisation")
            if spec is not dynamic:
                result = spec
                report.specialised = True
                report.specialised_shapes = {k: list(v) for k, v in signature.items()}
                report.specialised_reason = (f"{len(dependent)} node(s) compute from dynamic dims"
                                             + (f", float values {', '.join(floats[:3])}" if floats else ""))
                dyn_inits = {i.name for i in dynamic.graph.initializer}
                _attach(report, dynamic, {i.name for i in spec.graph.initializer} - dyn_inits, feeds)
        except Exception as exc:  # specialisation is an aid; the dynamic canonical form stands
            report.notes.append(f"not specialised: {type(exc).__name__}: {one_line(exc)}")
    name_nodes(result)
    used = [step for step, done in (("folding and no-op Cast removal", dynamic is not work),
                                    ("specialisation", result is not dynamic)) if done]
    # Not a field: the JSON report carries none.
    object.__setattr__(report, "_as_given", all(step in validator.proved for step in used))
    if validator.deferred and result is not work:
        object.__setattr__(report, "_deferred", validator)  # not a field: asdict must not carry it
    elif not report.validation:
        report.validation = "unchanged" if len(result.graph.node) == len(work.graph.node) else "no feeds: not validated"
    report.nodes_after = len(result.graph.node)
    report.folded = report.nodes_before - report.nodes_after - len(report.casts_removed)
    _mark(result, report)
    logger.info("%s", report.summary())
    return result, report


def restore_dynamic(model: onnx.ModelProto, report: CanonReport, *,
                    tolerance: Tolerance = Tolerance()) -> onnx.ModelProto:
    """The fixed ``model`` with the dynamic dims of the original back, when ``report`` says it was
    specialised and the restoration is proven (``restore.py``); else ``model`` itself, with
    ``report.emitted_dynamic`` False and the reason in ``report.notes``."""
    state = getattr(report, "_state", None)
    if not report.specialised or state is None:
        return _unmark(model)
    dynamic, folded, feeds = state
    candidate, detail = reattach(model, dynamic, folded)
    if candidate is not None:
        try:
            check_model(candidate, "the restored model")
            ok, detail = verify_dynamic(candidate, dynamic, feeds, tolerance)
        except Exception as exc:  # a broken restoration is not used
            ok, detail = False, f"restored graph invalid: {one_line(exc)}"
        if ok:
            report.emitted_dynamic = True
            report.notes.append(f"dynamic dims restored: {detail}")
            return _unmark(candidate)
    report.emitted_dynamic = False
    report.notes.append(f"dynamic dims not restored: {detail}")
    logger.warning("%s", report.specialised_warning())
    return _unmark(model)


def _attach(report: CanonReport, dynamic: onnx.ModelProto, folded: set[str], feeds: Sequence[Feed]) -> None:
    # Not a dataclass field: asdict (the JSON report) must not carry a model.
    object.__setattr__(report, "_state", (dynamic, folded, list(feeds)))


def computes_as_given(report: CanonReport) -> bool:
    """Whether ``report``'s canonical form computes what the model given does, node for node
    (names and declared dims changed, exact shape arithmetic folded and no-op Casts removed at
    most: ``same_computation``), so the given model's FP32 outputs are the canonical form's bit for bit."""
    return getattr(report, "_as_given", False)


def unconfirmed(report: CanonReport) -> bool:
    """Whether ``report``'s canonical form waits for ``confirm`` (a failure to run it is then a
    reason to canonicalise again, step by step, not an error)."""
    return getattr(report, "_deferred", None) is not None


def confirm(report: CanonReport, model: onnx.ModelProto, outputs: Sequence[Feed] | None) -> bool:
    """Validate the result of ``canonicalize(confirm_later=True)`` (``model``) as canonicalize
    itself would have, with its FP32 ``outputs`` on the feeds (None: run it here). False: it is
    not the original's equal (or the original does not run): canonicalise again without
    ``confirm_later``, which falls back step by step. True also when nothing was deferred."""
    lazy = getattr(report, "_deferred", None)
    if lazy is None:
        return True
    object.__setattr__(report, "_deferred", None)
    try:
        validator = lazy.get()
    except Exception:  # ORT's errors are many types: canonicalize proper says which
        return False
    result = validator.validate(model, outputs_of=(lambda _m: outputs) if outputs is not None else None)
    if not result.ok:
        return False
    worst = max((o.max_abs_error for o in result.outputs), default=0.0)
    report.validation = f"FP32 outputs match the original (max abs error {worst:.3g})"
    return True


PROVED = "FP32 computation proved the original's, node for node (exact shape arithmetic folded, no-op Casts removed)"


class _LazyValidator:
    """The original's reference outputs, computed on first use (None without feeds).
    ``deferred``: ``_checked`` leaves the comparison to ``confirm`` and records what it skipped."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[Feed], tolerance: Tolerance,
                 defer: bool = False, known: Sequence[Feed] = ()) -> None:
        self.model, self.feeds, self.tolerance = model, list(feeds), tolerance
        self._known = known  # read only when a run-validation needs it (the CLI's preflight may still run)
        self._validator: Validator | None = None
        self.defer = defer and bool(self.feeds)
        self.deferred: list[str] = []
        self.proved: list[str] = []  # steps proved to compute what they were given (same_computation)

    def get(self) -> Validator | None:
        if self._validator is None and self.feeds:
            reference = None
            known = list(self._known)[:len(self.feeds)]
            if known:
                names = [o.name for o in self.model.graph.output]
                rest = run_model(self.model, self.feeds[len(known):], names) if len(known) < len(self.feeds) else []
                reference = [{n: k[n] for n in names} for k in known] + rest
            self._validator = Validator(self.model, self.feeds, default=self.tolerance, reference=reference)
        return self._validator


def _checked(candidate: onnx.ModelProto, fallback: onnx.ModelProto, lazy: _LazyValidator,
             report: CanonReport, what: str) -> onnx.ModelProto:
    """``candidate`` when it computes what the original does (rtol/atol as a pass), else ``fallback``."""
    try:
        check_model(candidate, f"the model after {what}")
    except Exception as exc:  # a fold that breaks the checker is not used
        report.notes.append(f"{what} not used: the checker rejects it ({one_line(exc)})")
        return fallback
    why = different_computation(fallback, candidate)
    if why is None:  # the same FP32 computation, bit for bit: no run can tell them apart
        lazy.proved.append(what)
        report.validation = report.validation or PROVED
        return candidate
    logger.debug("%s: validated by a run (%s)", what, why)
    if lazy.defer:
        lazy.deferred.append(what)
        return candidate
    try:
        validator = lazy.get()
    except Exception as exc:  # the original itself does not run here: nothing can be proven
        report.notes.append(f"{what} not used: the original does not run in ONNX Runtime ({one_line(exc)})")
        return fallback
    if validator is None:
        return candidate
    result = validator.validate(candidate)
    if not result.ok:
        report.notes.append(f"{what} not used: FP32 outputs moved ({result.summary()})")
        return fallback
    worst = max((o.max_abs_error for o in result.outputs), default=0.0)
    report.validation = f"FP32 outputs match the original (max abs error {worst:.3g})"
    return candidate


def _mark(model: onnx.ModelProto, report: CanonReport) -> None:
    _unmark(model)
    model.metadata_props.add(key=MARK_KEY, value=json.dumps({"specialised": report.specialised_shapes}))


def _unmark(model: onnx.ModelProto) -> onnx.ModelProto:
    kept = [p for p in model.metadata_props if p.key != MARK_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model


def _shapes_text(shapes: dict[str, list[int]]) -> str:
    return ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
