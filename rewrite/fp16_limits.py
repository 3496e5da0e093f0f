"""FP16's range, the numbers every part of the tool compares values with (IEEE 754 binary16)."""

FP16_MAX = 65504.0  # largest finite FP16 value; FP32 values from 65520 on round to inf
FP16_MIN_NORMAL = 2.0**-14  # smallest normal FP16 value; below it FP16 loses precision (subnormals)

__all__ = ["FP16_MAX", "FP16_MIN_NORMAL"]
