"""What an FP16 emulation run reports: per-output comparison with FP32, failing tensors.

The report side of ``emulation.fp16_emulation`` (which builds and runs the emulation graph):
the dataclasses a check returns and the functions that read a run's outputs and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_fp16_rewrite.io.ort_runner import Feed
from onnx_fp16_rewrite.fp16_limits import FP16_MAX


@dataclass
class TensorFinding:
    """A tensor that overflows FP16 (``overflow``) or holds inf/NaN (``non-finite``)."""

    tensor: str
    node: str
    op: str
    absmax: float
    kind: str


@dataclass
class OutputCheck:
    """One graph output of the emulated FP16 run compared with the FP32 reference."""

    name: str
    nan: int
    inf: int
    max_abs_error: float
    rel_l2: float
    reference_absmax: float
    ok: bool


@dataclass
class Fp16Report:
    mode: str
    strict_cumsum: bool
    fp16_nodes: int
    fp32_nodes: int
    outputs: list[OutputCheck]
    first_failures: list[TensorFinding]
    failing_tensors: int
    rel_l2_tolerance: float
    passed: bool
    seconds: float
    notes: list[str] = field(default_factory=list)
    # TensorRT backend only: why a built engine could not be run here (then nothing was verified).
    not_verified: str | None = None
    # A screen of a plan with FP32 islands: every FP32 value rounded for an FP16 layer was finite
    # (the FP16 copy a weakly typed engine hands on; no tensor of the graph, so no finding).
    edges_finite: bool | None = None


def compare_output(name: str, got: list[np.ndarray], ref: list[np.ndarray], tol: float) -> OutputCheck:
    got = [np.asarray(a).ravel() for a in got]
    ref = [np.asarray(a).ravel() for a in ref]
    if not np.issubdtype(np.result_type(*ref), np.floating) or len(got) != len(ref) or \
            any(g.size != r.size for g, r in zip(got, ref)):
        g, r = np.concatenate(got), np.concatenate(ref)
        if not np.issubdtype(r.dtype, np.floating):
            same = bool(np.array_equal(g, r))
            return OutputCheck(name, 0, 0, 0.0 if same else float("inf"), 0.0 if same else float("inf"), 0.0, same)
        got, ref = [g], [r]
    # Sample by sample into one float64 vector of the differences and one of the finite reference
    # values, the same vectors (and norms, bit for bit) as over the joined samples: 16 NAFNet
    # samples held ~0.5 GB of float64 temporaries at once that way.
    nan = inf = 0
    both, finite = [], []
    for g, r in zip(got, ref):
        n_nan, n_inf, b, f = sample_masks(g, r)
        nan, inf = nan + n_nan, inf + n_inf
        both.append(b)
        finite.append(f)
    diff = np.empty(sum(int(b.sum()) for b in both), np.float64)
    pos = 0
    for g, r, b in zip(got, ref, both):
        n = int(b.sum())
        np.abs(g[b].astype(np.float64) - r[b].astype(np.float64), out=diff[pos:pos + n])
        pos += n
    max_abs = float(diff.max()) if diff.size else 0.0
    diff_norm = np.linalg.norm(diff)
    del diff
    kept = np.empty(sum(int(f.sum()) for f in finite), np.float64)
    pos = 0
    for r, f in zip(ref, finite):
        n = int(f.sum())
        kept[pos:pos + n] = r[f]
        pos += n
    ref_norm = float(np.linalg.norm(kept))
    if nan > 0 or inf > 0:
        rel = float("inf")
    else:
        rel = float(diff_norm / ref_norm) if ref_norm > 0 else float(diff_norm)
    ref_absmax = float(np.abs(kept).max()) if kept.size else 0.0
    ok = nan <= 0 and inf <= 0 and rel <= tol
    return OutputCheck(name, max(nan, 0), max(inf, 0), max_abs, rel, ref_absmax, ok)


def sample_masks(got: np.ndarray, ref: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
    """One sample of one float output as compare_output reads it: its NaN and inf counts (the
    FP16 result's minus the reference's), where both are finite, and where the reference is."""
    g64, r64 = got.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(r64)
    return (int(np.isnan(g64).sum() - np.isnan(r64).sum()), int(np.isinf(g64).sum() - np.isinf(r64).sum()),
            np.isfinite(g64) & finite, finite)


def site_stats(site, runs: list[Feed]) -> tuple[float, bool]:
    """(absmax, non-finite) of a site over all runs; absmax ignores NaN where it can."""
    absmax, nonfinite = 0.0, False
    for r in runs:
        if site.max_out is None:  # a screen: the sum alone
            nonfinite |= not np.isfinite(float(r[site.sum_out]))
            continue
        hi, lo, total = (float(r[name]) for name in (site.max_out, site.min_out, site.sum_out))
        nonfinite |= not np.isfinite(total)
        absmax = max(absmax, float(np.nan_to_num(max(abs(hi), abs(lo)), nan=0.0, posinf=np.inf)))
    return absmax, nonfinite


def findings(sites: list, runs: list[Feed]) -> list[TensorFinding]:
    found = []
    for s in sites:
        absmax, nonfinite = site_stats(s, runs)
        if s.fp16 and absmax > FP16_MAX:
            kind = "overflow"
        elif nonfinite:
            kind = "non-finite"
        else:
            continue
        found.append(TensorFinding(s.tensor, s.node, s.op, absmax, kind))
    return found


__all__ = ["FP16_MAX", "Fp16Report", "OutputCheck", "TensorFinding", "compare_output", "findings", "site_stats"]
