"""FP32 validation of a rewritten model against the original's reference outputs.

The reference outputs of the *original* model are computed once (ORT CPU, optimizations off);
every rewritten model is compared with them, so errors cannot creep from pass to pass. Where a
rewrite misses the FP32 tolerance, the original's own FP32 result may be the noisy one (an
integral image over 1024x1024 loses digits to cancellation): the model is then evaluated in
float64 and the rewrite is accepted when its error is no worse than the original's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_fp16_rewrite.errors import BadInputError, one_line
from onnx_fp16_rewrite.io.ort_runner import Feed, run_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Elementwise |got - ref| <= atol + rtol * |ref| (numpy.allclose semantics)."""

    rtol: float = 1e-5
    atol: float = 1e-5


@dataclass
class OutputValidation:
    name: str
    ok: bool
    max_abs_error: float
    worst_excess: float
    judged_against: str
    detail: str


@dataclass
class ValidationResult:
    ok: bool
    outputs: list[OutputValidation] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        if self.error:
            return self.error
        bad = [o for o in self.outputs if not o.ok]
        return "; ".join(f"{o.name}: {o.detail}" for o in bad) if bad else "all outputs within tolerance"


class Validator:
    """Compares models with the FP32 outputs of ``original`` on ``feeds``."""

    def __init__(
        self,
        original: onnx.ModelProto,
        feeds: Sequence[Feed],
        *,
        default: Tolerance = Tolerance(),
        per_output: Mapping[str, Tolerance] | None = None,
        reference: Sequence[Feed] | None = None,
    ) -> None:
        """``reference``: the FP32 outputs of ``original`` on ``feeds`` when already computed (the
        fixer's range profile has them: ORT, optimizations off, the same values), else one run per feed."""
        self.original = original
        self.feeds = list(feeds)
        self.default = default
        self.per_output = dict(per_output or {})
        unknown = set(self.per_output) - {o.name for o in original.graph.output}
        if unknown:
            raise BadInputError(f"tolerance given for unknown output(s): {', '.join(sorted(unknown))}")
        self.output_names = [o.name for o in original.graph.output]
        self.reference = (run_model(original, self.feeds, self.output_names) if reference is None
                          else [{n: r[n] for n in self.output_names} for r in reference])
        # The FP32 outputs of the last model validated (a kept rewrite's become the next reference).
        self.last_outputs: list[Feed] | None = None
        self._reference64: list[Feed] | None = None

    def reference64(self) -> list[Feed]:
        """The original model evaluated in float64 (computed on first use)."""
        if self._reference64 is None:
            from onnx_fp16_rewrite.pipeline.float64_reference import run_float64

            self._reference64 = [run_float64(self.original, feed) for feed in self.feeds]
        return self._reference64

    def validate(self, model: onnx.ModelProto, outputs_of=None) -> ValidationResult:
        """``outputs_of(model)``: the model's FP32 outputs on the feeds when something else
        computes them (then no run here)."""
        try:
            got = list(outputs_of(model)) if outputs_of is not None else run_model(model, self.feeds, self.output_names)
            got = [{n: g[n] for n in self.output_names} for g in got]
            self.last_outputs = got
        except Exception as exc:  # ORT's errors are many types; the message is what matters
            return ValidationResult(False, error=f"ONNX Runtime cannot run the model: {one_line(exc)}")
        outputs = [self._judge(name, [g[name] for g in got]) for name in self.output_names]
        return ValidationResult(all(o.ok for o in outputs), outputs)

    def _judge(self, name: str, got: list[np.ndarray]) -> OutputValidation:
        tol = self.per_output.get(name, self.default)
        ref = [r[name] for r in self.reference]
        for g, r in zip(got, ref):
            if np.shape(g) != np.shape(r):
                return OutputValidation(name, False, float("inf"), float("inf"), "fp32",
                                        f"shape {np.shape(g)} != reference {np.shape(r)}")
        g, r = _flat(got), _flat(ref)
        if not np.issubdtype(r.dtype, np.floating):
            same = bool(np.array_equal(g, r))
            return OutputValidation(name, same, 0.0 if same else float("inf"), 0.0, "fp32",
                                    "identical" if same else "integer output differs")
        max_abs, excess = _errors(g, r, tol)
        if excess <= 0:
            return OutputValidation(name, True, max_abs, excess, "fp32", f"max abs error {max_abs:.3g}")
        # Outside the FP32 tolerance: is the original's own FP32 result the inaccurate one?
        try:
            r64 = _flat([x[name] for x in self.reference64()])
        except Exception as exc:  # no float64 evaluation possible: the FP32 verdict stands
            return OutputValidation(name, False, max_abs, excess, "fp32",
                                    f"max abs error {max_abs:.3g} vs FP32 reference; float64 reference "
                                    f"unavailable ({one_line(exc)})")
        new_abs, new_excess = _errors(g, r64, tol)
        orig_abs, _ = _errors(r, r64, tol)
        ok = new_excess <= 0 or new_abs <= orig_abs
        detail = (
            f"max abs error {max_abs:.3g} vs FP32 reference (atol {tol.atol:g}, rtol {tol.rtol:g}); "
            f"vs float64: {new_abs:.3g}, the original FP32 model's {orig_abs:.3g}"
            + (" -> accepted (no worse than the original)" if ok else "")
        )
        return OutputValidation(name, ok, new_abs, new_excess, "float64", detail)


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def _errors(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> tuple[float, float]:
    """Max abs error and the worst excess over the tolerance (<= 0 means within it).
    Non-finite values must match exactly (same NaN positions, same infinities)."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    same_nonfinite = (np.isnan(g) & np.isnan(r)) | (np.isinf(g) & (g == r))
    if not np.array_equal(~np.isfinite(g), ~np.isfinite(r)) or not same_nonfinite[~np.isfinite(r)].all():
        return float("inf"), float("inf")
    fin = np.isfinite(r)
    diff = np.abs(g[fin] - r[fin])
    if diff.size == 0:
        return 0.0, -1.0
    excess = diff - (tol.atol + tol.rtol * np.abs(r[fin]))
    return float(diff.max()), float(excess.max())
