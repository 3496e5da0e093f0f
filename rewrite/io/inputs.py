"""Model inputs: load them (.npz, a folder of .npz, Polygraphy JSON) or generate them.

Polygraphy's ``--load-inputs`` JSON is a list of feed dicts (one per iteration); each array is
``{"array": base64(np.save(arr)), "polygraphy_class": "ndarray"}``. We read it without
Polygraphy and never unpickle (``allow_pickle=False``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_fp16_rewrite.errors import BadInputError, one_line
from onnx_fp16_rewrite.io.ort_runner import Feed

logger = logging.getLogger(__name__)

_SHAPE_RE = re.compile(r"^(?P<name>.+):(?P<dims>\d+(x\d+)*)$")


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["input:1x3x512x512"]`` -> ``{"input": (1, 3, 512, 512)}`` (trtexec's ``--shapes`` style)."""
    shapes = {}
    for spec in specs:
        for part in filter(None, spec.split(",")):
            m = _SHAPE_RE.match(part.strip())
            if not m:
                raise BadInputError(f"bad --shape {part!r}: expected NAME:DxDx... e.g. input:1x3x512x512")
            shapes[m["name"]] = tuple(int(d) for d in m["dims"].split("x"))
    return shapes


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs by old exporters)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def generate_feeds(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]] | None = None, *, seed: int = 0,
    val_range: Mapping[str, tuple[float, float]] | None = None,
) -> list[Feed]:
    """One feed of U(0,1) floats (Polygraphy's default range) and small positive integers;
    dynamic dims must be given in ``shapes``. ``val_range`` (Polygraphy's ``--val-range``):
    ``{input: (min, max)}``, the key ``""`` for every other input; integers are drawn from [min, max]."""
    shapes = dict(shapes or {})
    ranges = dict(val_range or {})
    rng = np.random.default_rng(seed)
    feed: Feed = {}
    inputs = model_inputs(model)
    _reject_unknown(shapes, inputs, "--shape")
    _reject_unknown({k: v for k, v in ranges.items() if k}, inputs, "--val-range")
    feed_dims: dict[str, int] = {}
    for vi in inputs:
        dtype = _np_dtype(vi)
        shape = shapes.get(vi.name) or _static_shape(vi)
        if shape is None:
            raise BadInputError(
                f"input {vi.name!r} has dynamic dims {_dims_text(vi)}: give --shape {shape_hint(inputs)} (for example)"
            )
        _check_shape(vi, tuple(shape), "--shape")
        feed_dims = _bind_params(vi, tuple(shape), feed_dims, "--shape")
        lo_hi = ranges.get(vi.name, ranges.get(""))
        if np.issubdtype(dtype, np.floating):
            sample = rng.random(shape, dtype=np.float32)  # the same draws as before val_range existed
            feed[vi.name] = (sample if lo_hi is None else lo_hi[0] + (lo_hi[1] - lo_hi[0]) * sample.astype(np.float64)).astype(dtype)
        elif dtype == np.bool_:
            feed[vi.name] = rng.random(shape) < 0.5
        elif lo_hi is not None:
            lo, hi = int(np.ceil(lo_hi[0])), int(np.floor(lo_hi[1]))
            if lo > hi:
                raise BadInputError(f"--val-range for integer input {vi.name!r} holds no integer: {list(lo_hi)}")
            feed[vi.name] = rng.integers(lo, hi + 1, size=shape).astype(dtype)
        else:
            feed[vi.name] = rng.integers(1, 25, size=shape).astype(dtype)
    return [feed]


def load_feeds(path: str | Path, model: onnx.ModelProto) -> list[Feed]:
    """Feeds from an .npz, a folder of .npz (one feed each, sorted by name) or Polygraphy JSON,
    checked against the model's input names, dtypes and shapes."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"inputs file not found: {p}")
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise BadInputError(f"no .npz files in inputs folder: {p}")
        feeds = [_load_npz(f) for f in files]
    elif p.suffix == ".npz":
        feeds = [_load_npz(p)]
    elif p.suffix == ".json":
        feeds = _load_polygraphy_json(p)
    else:
        raise BadInputError(f"inputs file must be .npz, a folder of .npz or Polygraphy .json: {p}")
    for feed in feeds:
        check_feed(feed, model, str(p))
    return feeds


def check_feed(feed: Feed, model: onnx.ModelProto, source: str) -> None:
    inputs = model_inputs(model)
    _reject_unknown(feed, inputs, source)
    bound: dict[str, int] = {}
    for vi in inputs:
        if vi.name not in feed:
            raise BadInputError(f"{source}: missing input {vi.name!r}")
        arr = feed[vi.name]
        want = _np_dtype(vi)
        if arr.dtype != want:
            raise BadInputError(f"{source}: input {vi.name!r} has dtype {arr.dtype}, the model wants {np.dtype(want)}")
        _check_shape(vi, arr.shape, source)
        bound = _bind_params(vi, arr.shape, bound, source)


def _load_npz(path: Path) -> Feed:
    try:
        with np.load(path, allow_pickle=False) as data:
            feed = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise BadInputError(f"cannot read inputs file {path}: {one_line(exc)}") from None
    for k, v in feed.items():  # np.load hands back members that are not .npy as raw bytes
        if not isinstance(v, np.ndarray):
            raise BadInputError(f"cannot read inputs file {path}: member {k!r} is not a .npy array")
    return feed


def _load_polygraphy_json(path: Path) -> list[Feed]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise BadInputError(f"cannot read inputs file {path}: {one_line(exc)}") from None
    if isinstance(data, dict) and (data.get("polygraphy_class") == "RunResults" or "lst" in data):
        raise BadInputError(f"{path} is a Polygraphy outputs file (polygraphy run --save-outputs), not inputs: "
                            "give the file written by --save-inputs")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise BadInputError(f"{path}: expected a list of {{input name: array}} dicts (Polygraphy inputs JSON)")
    return [{name: _decode_array(value, path, name) for name, value in feed.items()} for feed in data]


def _decode_array(value: object, path: Path, name: str) -> np.ndarray:
    if not isinstance(value, dict) or "array" not in value:
        raise BadInputError(f"{path}: input {name!r} is not a Polygraphy-encoded array")
    try:
        raw = base64.b64decode(value["array"], validate=True)
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (binascii.Error, ValueError, OSError) as exc:
        raise BadInputError(f"{path}: input {name!r} cannot be decoded: {one_line(exc)}") from None


def save_polygraphy_json(feeds: Sequence[Feed], path: str | Path) -> None:
    """Write feeds in Polygraphy's inputs JSON format (readable by ``polygraphy run --load-inputs``)."""
    def enc(arr: np.ndarray) -> dict:
        buf = io.BytesIO()
        np.save(buf, np.asarray(arr), allow_pickle=False)
        return {"array": base64.b64encode(buf.getvalue()).decode(), "polygraphy_class": "ndarray"}

    Path(path).write_text(json.dumps([{k: enc(v) for k, v in f.items()} for f in feeds]))


def _reject_unknown(given: Mapping, inputs: list[onnx.ValueInfoProto], source: str) -> None:
    names = [vi.name for vi in inputs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise BadInputError(f"{source}: unknown input {unknown[0]!r} (model inputs: {', '.join(names)})")


def _np_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))


def _known(d) -> bool:
    """A dim that is a size: ``-1`` (Paddle) and ``0`` (older exporters) in a graph input mean unknown."""
    return d.HasField("dim_value") and d.dim_value > 0


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    dims = vi.type.tensor_type.shape.dim
    if not vi.type.tensor_type.HasField("shape") or any(not _known(d) for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _dims_text(vi: onnx.ValueInfoProto) -> str:
    if not vi.type.tensor_type.HasField("shape"):
        return "[any shape]"
    return "[" + ",".join(str(d.dim_value) if _known(d) else (d.dim_param or "?")
                          for d in vi.type.tensor_type.shape.dim) + "]"


def shape_hint(inputs: Sequence[onnx.ValueInfoProto]) -> str:
    """A ``--shape`` value the model accepts, for every input with dynamic dims: static dims as
    declared, 1 for a dynamic first dim, 64 elsewhere, one size per dim name (``batch``, ``seq``).
    An input without a declared rank cannot be hinted: it is shown as NAME:<dims>."""
    params: dict[str, int] = {}
    parts = []
    for vi in inputs:
        if _static_shape(vi) is not None:
            continue
        if not vi.type.tensor_type.HasField("shape"):
            parts.append(f"{vi.name}:<dims>")
            continue
        values = []
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            value = d.dim_value if _known(d) else (1 if axis == 0 else 64)
            if not _known(d) and d.dim_param:
                value = params.setdefault(d.dim_param, value)
            values.append(str(value))
        parts.append(f"{vi.name}:{'x'.join(values)}")
    return ",".join(parts)


def _check_shape(vi: onnx.ValueInfoProto, shape: tuple[int, ...], source: str) -> None:
    if not vi.type.tensor_type.HasField("shape"):
        return  # no declared rank: any shape
    dims = vi.type.tensor_type.shape.dim
    ok = len(dims) == len(shape) and all(not _known(d) or d.dim_value == s for d, s in zip(dims, shape))
    if not ok:
        raise BadInputError(f"{source}: input {vi.name!r} has shape {list(shape)}, the model wants {_dims_text(vi)}")


def _bind_params(vi: onnx.ValueInfoProto, shape: tuple[int, ...], bound: dict[str, int], source: str) -> dict[str, int]:
    """Dims that share a name (``batch``, ``seq``) must have one size across the inputs of a feed."""
    if not vi.type.tensor_type.HasField("shape"):
        return bound
    for d, size in zip(vi.type.tensor_type.shape.dim, shape):
        if _known(d) or not d.dim_param:
            continue
        if bound.setdefault(d.dim_param, int(size)) != int(size):
            raise BadInputError(f"{source}: input {vi.name!r} has {d.dim_param}={int(size)} where another input "
                                f"has {d.dim_param}={bound[d.dim_param]}")
    return bound
