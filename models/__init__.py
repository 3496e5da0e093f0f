"""Builders of small, realistic test models (seeded numpy weights, deterministic, opset 17 by default).

Every builder returns an ``onnx.ModelProto`` that passes ``onnx.checker`` and strict shape inference and runs in
ONNX Runtime CPU. Node names follow the PyTorch exporter (``/encoders.0/encoders.0.0/sca/sca.0/CumSum``).
``DEMO_MODELS`` maps the CLI's ``--demo`` names to zero-argument builders; ``demo_inputs`` makes U(0,1) feeds.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx

from onnx_fp16_rewrite.models.box_filter import build_integral_box_filter
from onnx_fp16_rewrite.models.nafnet import build_nafnet, demo_inputs
from onnx_fp16_rewrite.models.residual_norm import build_residual_groupnorm
from onnx_fp16_rewrite.models.small import GraphBuilder, build_cumsum_chain, build_mlp

__all__ = [
    "DEMO_MODELS",
    "GraphBuilder",
    "build_cumsum_chain",
    "build_integral_box_filter",
    "build_mlp",
    "build_nafnet",
    "build_residual_groupnorm",
    "demo_inputs",
]

DEMO_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "nafnet": build_nafnet,
    "residual-groupnorm": build_residual_groupnorm,
    "box-filter": build_integral_box_filter,
}
