"""What the CLI's input flags mean: shapes in trtexec's and Polygraphy's spellings, Polygraphy's
``--val-range``, several ``--inputs`` chained, ``--save-inputs``.

Loading and generating feeds is ``onnx_fp16_rewrite.io.inputs``; this module only reads flags.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.io.ort_runner import Feed

_SHAPE_HELP = "expected NAME:1x3x512x512 (trtexec) or NAME:[1,3,512,512] (Polygraphy)"
_NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
_RANGE_RE = re.compile(rf"^\[\s*(?P<lo>{_NUMBER})\s*,\s*(?P<hi>{_NUMBER})\s*\]$")


def _split_entries(token: str) -> list[str]:
    """Split on the commas that separate inputs (trtexec's ``a:1x2,b:3``), not those inside ``[...]``."""
    entries, depth, start = [], 0, 0
    for i, ch in enumerate(token):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            entries.append(token[start:i])
            start = i + 1
    entries.append(token[start:])
    return [e.strip() for e in entries if e.strip()]


def _dims(text: str, entry: str) -> tuple[int, ...]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        parts = [p.strip() for p in text[1:-1].split(",") if p.strip()]
    else:
        parts = text.split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInputError(f"bad --shape {entry!r}: {_SHAPE_HELP}") from None
    if any(d < 0 for d in dims) or (not dims and not text.startswith("[")):
        raise BadInputError(f"bad --shape {entry!r}: dims must be concrete, >= 0 ({_SHAPE_HELP})")
    return dims


def parse_shape_specs(tokens: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["x:[2,32,16]", "y:1x3,z:4"]`` -> ``{"x": (2, 32, 16), "y": (1, 3), "z": (4,)}``.
    The name is everything before the last ``':'`` (names may hold ``':'``); trtexec's quotes
    around a name are dropped. An input given twice with two shapes is an error."""
    shapes: dict[str, tuple[int, ...]] = {}
    for token in tokens:
        for entry in _split_entries(token):
            name, sep, dims = entry.rpartition(":")
            name = name.strip().strip("'")
            if not sep or not name:
                raise BadInputError(f"bad --shape {entry!r}: {_SHAPE_HELP}")
            shape = _dims(dims, entry)
            if name in shapes and shapes[name] != shape:
                raise BadInputError(f"--shape gives input {name!r} two shapes: {list(shapes[name])} and {list(shape)}")
            shapes[name] = shape
    return shapes


def parse_val_ranges(tokens: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Polygraphy's ``--val-range``: ``[0,1]`` (every input not named) and ``x:[-1,1]``;
    key ``""`` is the default."""
    ranges: dict[str, tuple[float, float]] = {}
    for token in tokens:
        name, _, text = token.rpartition(":") if not token.strip().startswith("[") else ("", "", token)
        match = _RANGE_RE.match(text.strip())
        if not match:
            raise BadInputError(f"bad --val-range {token!r}: expected [MIN,MAX] or NAME:[MIN,MAX], e.g. x:[0,1]")
        lo, hi = float(match["lo"]), float(match["hi"])
        if lo > hi:
            raise BadInputError(f"bad --val-range {token!r}: MIN is larger than MAX")
        ranges[name.strip()] = (lo, hi)
    return ranges


def feeds_from_args(args, model: onnx.ModelProto) -> list[Feed]:
    """The feeds the flags ask for: loaded (``--inputs`` / ``--load-inputs``, chained) or generated
    (``--shape``, ``--seed``, ``--val-range``)."""
    from onnx_fp16_rewrite.io.inputs import generate_feeds, load_feeds

    shapes = parse_shape_specs(args.shape)
    ranges = parse_val_ranges(args.val_range)
    if args.inputs:
        given = [flag for flag, value in (("--shape", shapes), ("--seed", args.seed is not None),
                                          ("--val-range", ranges)) if value]
        if given:
            raise BadInputError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for generated inputs; "
                                "not with --inputs")
        # Shapes, dtypes and named dims shared by several inputs are checked by load_feeds.
        return [feed for path in args.inputs for feed in load_feeds(path, model)]
    return generate_feeds(model, shapes, seed=args.seed or 0, val_range=ranges)


def save_inputs(feeds: Sequence[Feed], path: str | os.PathLike) -> None:
    """``--save-inputs``: the feeds as Polygraphy JSON (``polygraphy run --load-inputs`` reads it),
    written atomically."""
    from onnx_fp16_rewrite.io.inputs import save_polygraphy_json

    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".inputs-", suffix=".json", dir=out.parent)
    os.close(fd)
    try:
        save_polygraphy_json(feeds, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
