"""onnx-fp16-rewrite: rewrite ONNX graphs so that FP16 inference stays finite and accurate.

The public API is what this module exports; the stages live in sub-packages named for what they do
(``io``, ``pipeline``, ``emulation``, ``analysis``, ``patterns``, ``emit``, ``tensorrt``, ``report``).
"""

from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.emit.mixed_precision import to_mixed_precision
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.fix import FixReport, FixResult, fix_model
from onnx_fp16_rewrite.io.inputs import load_feeds
from onnx_fp16_rewrite.io.model_io import load_model, save_model
from onnx_fp16_rewrite.passes import (
    ALL_PASSES,
    BoxFilter,
    ClampFp16,
    FuseNormalization,
    PrescaleAttention,
    ProtectFp32,
    RescaleAccumulation,
    RescaleResidual,
    SplitCumSum,
)
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager

__version__ = "0.2.0"

__all__ = [
    "ALL_PASSES",
    "BoxFilter",
    "ClampFp16",
    "FixReport",
    "FixResult",
    "FuseNormalization",
    "Pass",
    "PassManager",
    "PassResult",
    "PrecisionPlan",
    "PrescaleAttention",
    "ProtectFp32",
    "RescaleAccumulation",
    "RescaleResidual",
    "SplitCumSum",
    "__version__",
    "check_fp16",
    "fix_model",
    "load_feeds",
    "load_model",
    "save_model",
    "to_mixed_precision",
]
