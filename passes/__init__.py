"""All rewrite passes, in the order a pipeline should usually apply them: range-safe rewrites
that keep the graph in FP16 first, FP32 pinning last.

The list is explicit: importing a pass module registers nothing.
"""

from passes.box_filter import BoxFilter
from passes.protect_fp32 import ProtectFp32
from passes.rescale_accumulation import RescaleAccumulation
from passes.split_cumsum import SplitCumSum

ALL_PASSES = [BoxFilter, RescaleAccumulation, SplitCumSum, ProtectFp32]

__all__ = ["ALL_PASSES", "BoxFilter", "ProtectFp32", "RescaleAccumulation", "SplitCumSum"]
