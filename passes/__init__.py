"""All rewrite passes, in the order a pipeline should usually apply them: range-safe rewrites
that keep the graph in FP16 first (prescale-attention before rescale-residual before
fuse-normalization, which would otherwise hide the residual stream behind a pre-scale), the
approximate clamp and FP32 pinning last.

The list is explicit: importing a pass module registers nothing.
"""

from onnx_fp16_rewrite.passes.balance_conv_bn import BalanceConvBn
from onnx_fp16_rewrite.passes.box_filter import BoxFilter
from onnx_fp16_rewrite.passes.clamp_fp16 import ClampFp16
from onnx_fp16_rewrite.passes.fuse_normalization import FuseNormalization
from onnx_fp16_rewrite.passes.prescale_attention import PrescaleAttention
from onnx_fp16_rewrite.passes.protect_fp32 import ProtectFp32
from onnx_fp16_rewrite.passes.rescale_accumulation import RescaleAccumulation
from onnx_fp16_rewrite.passes.rescale_residual import RescaleResidual
from onnx_fp16_rewrite.passes.split_cumsum import SplitCumSum

ALL_PASSES = [
    BoxFilter,
    RescaleAccumulation,
    SplitCumSum,
    PrescaleAttention,
    RescaleResidual,
    BalanceConvBn,
    FuseNormalization,
    ClampFp16,
    ProtectFp32,
]

__all__ = [
    "ALL_PASSES",
    "BalanceConvBn",
    "BoxFilter",
    "ClampFp16",
    "FuseNormalization",
    "PrescaleAttention",
    "ProtectFp32",
    "RescaleAccumulation",
    "RescaleResidual",
    "SplitCumSum",
]
