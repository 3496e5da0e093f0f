"""All rewrite passes, in the order a pipeline should usually apply them.

The list is explicit: importing a pass module registers nothing.
"""

from passes.protect_fp32 import ProtectFp32

ALL_PASSES = [ProtectFp32]

__all__ = ["ALL_PASSES", "ProtectFp32"]
