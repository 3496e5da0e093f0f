"""Validation of what the user gives the CLI, before any work: numeric options (finite, in range),
pass options, node names, and the feeds (finite, non-empty). Each failure is a one-line
BadInputError naming the option, node or input (exit 2)."""

from __future__ import annotations

import argparse
import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.fp16_limits import FP16_MAX


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def nonnegative_float(text: str) -> float:
    """argparse ``type=``: a finite number >= 0 (tolerances)."""
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0 (error limits)."""
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text!r}")
    return value


def check_tolerance(spec: str, rtol: float, atol: float) -> None:
    """``--tolerance OUTPUT:RTOL,ATOL``: both finite and >= 0."""
    for what, v in (("rtol", rtol), ("atol", atol)):
        if not math.isfinite(v) or v < 0:
            raise BadInputError(f"bad --tolerance {spec!r}: {what} must be a finite number >= 0")


# Pass options by keyword: (low, high, low inclusive, what it means). Any other float option must
# be finite and >= 0; any other int option in [0, 2**31).
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "target_absmax": (0, FP16_MAX, False, "a magnitude FP16 can hold"),
    "trigger_absmax": (0, math.inf, False, "a magnitude"),
    "exit_absmax": (0, FP16_MAX, False, "a magnitude FP16 can hold"),
    "max_partial": (0, FP16_MAX, False, "a magnitude FP16 can hold"),
    "margin": (0, FP16_MAX, True, "below 65504"),
    "max_rel_l2": (0, math.inf, False, "an error limit"),
    "max_underflow_share": (0, 1, True, "a share"),
    "max_flop_ratio": (0, math.inf, False, "a ratio"),
    "max_growth": (0, math.inf, False, "a ratio"),
    "block_size": (1, 1 << 20, True, "a block length"),
    "min_length": (1, 1 << 31, True, "a length"),
    "max_matmul_length": (1, 1 << 16, True, "a length"),
}


def check_pass_options(pass_name: str, options: Mapping[str, Any]) -> None:
    """Every numeric option of a pass finite and in its range; regexes compile."""
    for key, value in options.items():
        spelling = f"{pass_name}.{key}"
        if isinstance(value, bool) or value is None:
            continue
        if key == "opset" and isinstance(value, int):
            import onnx

            newest = onnx.defs.onnx_opset_version()
            if not 7 <= value <= newest:
                raise BadInputError(f"{spelling}={value}: opset must be between 7 and {newest}")
            continue
        if key == "match" and isinstance(value, str):
            import re

            try:
                re.compile(value)
            except re.error as exc:
                raise BadInputError(f"{spelling}={value!r}: not a regular expression ({exc})") from None
            continue
        if isinstance(value, (int, float)):
            _check_number(spelling, key, value)


def _check_number(spelling: str, key: str, value: float) -> None:
    if not math.isfinite(value):
        raise BadInputError(f"{spelling}={value}: must be a finite number")
    low, high, inclusive, meaning = _RANGES.get(key, (0, math.inf if isinstance(value, float) else 1 << 31, True, "a non-negative value"))
    ok = (value >= low if inclusive else value > low) and value <= high
    if not ok:
        bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise BadInputError(f"{spelling}={value}: must be {bound} ({meaning})")


def check_node_names(passes: Iterable[Any], model) -> None:
    """A node name given to a pass (``nodes``) must be in the model; else 'did you mean'."""
    known = [n.name for n in model.graph.node if n.name]
    names = set(known)
    for p in passes:
        opts = p.options() if hasattr(p, "options") else {}
        for name in opts.get("nodes") or ():
            if name not in names:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise BadInputError(f"{p.name}: --nodes {name!r} is not a node of the model{hint}")


def check_feeds(feeds: Sequence[Mapping[str, np.ndarray]], source: str) -> None:
    """Calibration data must be finite and non-empty: NaN/Inf inputs hide the very overflows the
    check looks for (everything downstream is non-finite anyway), and an empty input runs nothing."""
    for i, feed in enumerate(feeds):
        where = source if len(feeds) == 1 else f"{source} (feed {i})"
        for name, arr in feed.items():
            arr = np.asarray(arr)
            if arr.size == 0:
                raise BadInputError(f"{where}: input {name!r} has shape {list(arr.shape)}, no values to run on")
            if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
                nan = int(np.isnan(arr).sum())
                inf = int(np.isinf(arr).sum())
                if nan or inf:
                    raise BadInputError(f"{where}: input {name!r} holds {nan} NaN and {inf} Inf values; "
                                        "calibration data must be finite")
