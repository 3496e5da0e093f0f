"""Choosing a scale region and its k: the search over the closure's choice points, and the range checks.

``find_region`` runs the closure of ``scale_region`` under forced choices, depth first (the latest choice flipped
first), until the closure, the consistency check and ``choose_k``'s range checks all accept a region.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.patterns.scale_region import FP16_MAX, Refused, Region, close, finish
from onnx_fp16_rewrite.pipeline.graph_edit import const_value

__all__ = ["choose_k", "find_region"]


def choose_k(region: Region, absmax: dict[str, float], target: float) -> int:
    """The smallest k >= 1 that brings every shrinking tensor to ``target``; refuses a region whose growing tensors
    (negative powers) or constants would leave FP16 range, or whose constants would sink into subnormals."""
    need = [math.log2(absmax[name] / target) / p for name, p in region.powers.items()
            if p > 0 and absmax.get(name, 0.0) > target]
    if any(not math.isfinite(v) for v in need):
        raise Refused("non-finite range in FP32", region)
    k = max([1] + [math.ceil(v) for v in need])
    for name, p in region.powers.items():
        if p < 0 and absmax.get(name, 0.0) * 2.0 ** (-p * k) > target:
            raise Refused(f"{name} is divided by a scaled tensor and would grow past {target:g}", region)
    for node, idx, p in region.consts.values():
        scale = 2.0 ** (-p * k)
        largest, before, after = _fp16_errors(const_value(node.inputs[idx]), scale)
        if largest * scale > FP16_MAX / 2:
            raise Refused(f"constant {node.inputs[idx].name} of {node.name} would pass FP16 range", region)
        if after > max(2 * before, 1e-3):
            raise Refused(f"{node.inputs[idx].name} ({node.name}) would sink into FP16 subnormals at 2^-{p * k} "
                          f"(FP16 rounding error {before:.2g} -> {after:.2g} relative L2)", region)
    return k


def find_region(graph: gs.Graph, seed: gs.Tensor, readers: dict, types: dict[str, int], absmax: dict[str, float],
                target: float, budget: int = 12) -> tuple[Region, int]:
    """The first region (and its k) that the closure, the consistency check and the range check accept, trying
    the alternatives at each choice point depth first (at most ``budget`` closures); raises the first refusal."""
    stack: list[dict[int, int]] = [{}]
    first: Refused | None = None
    tried = 0
    while stack and tried < budget:
        forced = stack.pop()
        tried += 1
        region: Region | None = None
        try:
            region = close(graph, seed, readers, types, absmax, forced)
            finish(region)
            return region, choose_k(region, absmax, target)
        except Refused as exc:
            first = first or exc
            met = exc.region.choices if exc.region is not None else (region.choices if region else [])
            fresh = list({c[0]: c for c in met if c[0] not in forced}.values())
            for node_id, options in fresh:  # the latest choice's alternatives on top: flipped first
                stack += [{**forced, node_id: o} for o in range(options - 1, 0, -1)]
    assert first is not None
    raise first


# Elements a constant is read in: float64 temporaries of 512 KiB stay in cache, and a 64 MB embedding
# table no longer costs five full-size float64 copies (TorchScript T5: 1.6 s and ~0.4 GB a region).
_CHUNK = 1 << 16


def _fp16_errors(values: np.ndarray, scale: float) -> tuple[float, float, float]:
    """Of a constant: its largest magnitude (NaN if it holds one), and the relative L2 error of
    storing its magnitudes in FP16 as they are and scaled by ``scale`` (0 where its norm is 0 or not
    finite). Each element is rounded as a float64 (numpy rounds float64 to FP16 once); the sums of
    squares are taken chunk by chunk, so they differ from one whole-array dot in the last bits only."""
    flat = np.asarray(values).reshape(-1)
    largest, sq, err, err_scaled = [], 0.0, 0.0, 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # past FP16 range: inf, as the whole-array norm gave
        for start in range(0, flat.size, _CHUNK):
            x = np.abs(flat[start:start + _CHUNK].astype(np.float64))
            largest.append(x.max())
            sq += float(x.dot(x))
            d = x.astype(np.float16).astype(np.float64) - x
            err += float(d.dot(d))
            x *= scale  # a power of two: exact
            d = x.astype(np.float16).astype(np.float64) - x
            err_scaled += float(d.dot(d))
    norm = math.sqrt(sq)
    return (float(np.max(largest)) if largest else 0.0, _ratio(err, norm), _ratio(err_scaled, norm * scale))


def _ratio(err_sq: float, norm: float) -> float:
    return 0.0 if norm == 0 or not math.isfinite(norm) else math.sqrt(err_sq) / norm
