"""Inputs that stress prefix-sum rewrites: random, large dynamic range, constant, a single hot pixel."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fp16_rewrite.models.nafnet import demo_inputs


def adversarial_feeds(model: onnx.ModelProto, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """U(0,1); 10^U(-3,3) (six decades); a constant 0.7 image; zeros with one 1000 off-centre."""
    rng = np.random.default_rng(seed)
    base = demo_inputs(model, seed=seed)
    wide = {k: (10.0 ** rng.uniform(-3, 3, v.shape)).astype(np.float32) for k, v in base.items()}
    constant = {k: np.full_like(v, 0.7) for k, v in base.items()}
    hot = {}
    for k, v in base.items():
        h = np.zeros_like(v)
        h.flat[v.size // 2 + v.shape[-1] // 3] = 1000.0
        hot[k] = h
    return [base, wide, constant, hot]
