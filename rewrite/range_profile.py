"""FP32 range profiling: per float tensor, how large, how small and how sane its values are.

One FP32 run per sample exposes the intermediate tensors as extra outputs; when they would not
fit the memory budget they are exposed in batches (a run per batch), so a model whose
intermediates exceed memory still profiles. Statistics are reduced in numpy right away and the
arrays dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from rewrite.ort_runner import Feed, infer_types, make_session
from rewrite.schema_types import inline_constants

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
# |x| at or beyond this is a mask sentinel (finfo(float32).min fills, -1e38 style), not data.
SENTINEL_ABS = 1e30
_SAMPLE = 65536  # values drawn per tensor for the percentile estimate


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
    size: int = 0

    @property
    def overflows_fp16(self) -> bool:
        return self.absmax > FP16_MAX


@dataclass
class RangeProfile:
    ranges: dict[str, TensorRange]
    runs: int
    batches: int
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
        return RangeProfile(ranges, runs=0, batches=0, outputs=self.outputs)


def profile_ranges(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    *,
    memory_budget_mb: float = 8192.0,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> RangeProfile:
    """Profile every float tensor a node produces; ``progress(done, total)`` is called after
    each run (the CLI draws a bar with it)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inline_constants(m.graph)
    types, _ = infer_types(m)
    shapes = _static_sizes(m)
    producers: dict[str, onnx.NodeProto] = {}
    for node in m.graph.node:
        for out in node.output:
            if out and types.get(out) == onnx.TensorProto.FLOAT:
                producers[out] = node
    graph_outputs = {o.name for o in m.graph.output}
    batches = _batches(list(producers), shapes, feeds, memory_budget_mb)
    ranges = {t: TensorRange(t, producers[t].name, producers[t].op_type) for t in producers}
    rng = np.random.default_rng(seed)
    total, done = len(batches) * len(feeds), 0
    samples: dict[str, list[np.ndarray]] = {t: [] for t in producers}
    # The graph outputs ride along with the first batch: they are the FP32 reference.
    out_names = [o.name for o in m.graph.output]
    outputs: list[Feed] = []
    for b, batch in enumerate(batches):
        session = make_session(_exposing(m, [t for t in batch if t not in graph_outputs]))
        fetch = batch + [o for o in out_names if o not in batch] if b == 0 else batch
        for feed in feeds:
            values = dict(zip(fetch, session.run(fetch, feed)))
            if b == 0:
                outputs.append({o: values[o] for o in out_names})
            for name in batch:
                _accumulate(ranges[name], np.asarray(values[name]), samples[name], rng)
            done += 1
            if progress:
                progress(done, total)
    for name, r in ranges.items():
        if samples[name]:
            r.p999 = float(np.quantile(np.concatenate(samples[name]), 0.999))
    if len(batches) > 1:
        logger.info("profiled %d tensors in %d batches (memory budget %.0f MB)", len(ranges), len(batches), memory_budget_mb)
    return RangeProfile(ranges, runs=total, batches=len(batches), outputs=outputs)


def _accumulate(r: TensorRange, value: np.ndarray, samples: list[np.ndarray], rng: np.random.Generator) -> None:
    a = np.abs(value.astype(np.float32, copy=False)).ravel()
    if a.size == 0:
        return
    finite = np.isfinite(a)
    if not finite.all():
        r.fp32_nonfinite = True
        a = a[finite]
    sentinel = a >= SENTINEL_ABS
    if sentinel.any():
        r.sentinels += int(sentinel.sum())
        a = a[~sentinel]
    if a.size == 0:
        return
    r.absmax = max(r.absmax, float(a.max()))
    tiny = int(np.count_nonzero((a < FP16_MIN_NORMAL) & (a > 0)))
    r.subnormal_fraction = (r.subnormal_fraction * r.size + tiny) / (r.size + a.size)
    r.size += a.size
    samples.append(a if a.size <= _SAMPLE else rng.choice(a, _SAMPLE, replace=False))


def _exposing(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in tensors:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def _static_sizes(m: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # sizes only steer batching; unknown sizes fall back to an estimate
        return {}
    sizes = {}
    for vi in inferred.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            sizes[vi.name] = math.prod(d.dim_value for d in dims)
    return sizes


def _batches(tensors: list[str], sizes: dict[str, int], feeds: Sequence[Feed], budget_mb: float) -> list[list[str]]:
    """Group tensors so each run exposes at most ``budget_mb`` of FP32 values."""
    # Unknown sizes: assume as large as the largest input (a fair guess for activations).
    fallback = max((int(np.asarray(v).size) for f in feeds for v in f.values()), default=1)
    budget = budget_mb * 2**20 / 4
    batches: list[list[str]] = [[]]
    used = 0.0
    for t in tensors:
        size = sizes.get(t, fallback)
        if batches[-1] and used + size > budget:
            batches.append([])
            used = 0.0
        batches[-1].append(t)
        used += size
    return batches
