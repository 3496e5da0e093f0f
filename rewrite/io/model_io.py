"""Loading and saving ONNX models: external data, atomic writes, never overwriting the input."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from onnx_fp16_rewrite.errors import BadInputError, one_line
from onnx_fp16_rewrite.io import weights

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message past 2 GiB; above this we write weights as external data.
_PROTO_LIMIT = 2**31 - 1
# Initializers at least this large go to the external data file when one is written.
_EXTERNAL_THRESHOLD = 1024


def load_model(
    model: str | os.PathLike | onnx.ModelProto, *, large_tensor_bytes: int | None = None
) -> onnx.ModelProto:
    """Load a model from a path (external data included) or pass a ModelProto through.

    Weights of at least ``large_tensor_bytes`` (default ``weights.LARGE_TENSOR_BYTES``) are not
    read: they stay references to the model's data file (or, in a single-file model, move to
    the in-process store), so the proto stays small whatever the model's size.
    Raises BadInputError with a one-line message for a missing file, a file that is not ONNX,
    a truncated protobuf or missing / escaping / short external data.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.exists():
        raise BadInputError(f"model file not found: {path}")
    if not path.is_file():
        raise BadInputError(f"model path is not a file: {path}")
    try:
        proto = _parse(path, keep=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage input
        raise BadInputError(f"not a valid ONNX model: {path} ({one_line(exc)})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0 and len(proto.graph.output) == 0:
        raise BadInputError(f"not a valid ONNX model: {path} (no graph)")
    if not proto.opset_import:
        raise BadInputError(f"not a valid ONNX model: {path} (no opset_import)")
    limit = weights.LARGE_TENSOR_BYTES if large_tensor_bytes is None else large_tensor_bytes
    _resolve_external_data(proto, path, limit)
    weights.detach_large(proto, large_bytes=limit)
    return proto


# Inside ``parsed_once``: the last model file external_data_files parsed, which load_model of the
# same file takes.
_parsed: tuple[tuple, onnx.ModelProto] | None = None
_keep_parsed = False


@contextlib.contextmanager
def parsed_once() -> Iterator[None]:
    """Within it, a model file parsed to list its external data is not parsed again by
    ``load_model`` (the CLI checks its output paths, then loads: 0.1 s of T5's 62 MB)."""
    global _keep_parsed, _parsed
    _keep_parsed = True
    try:
        yield
    finally:
        _keep_parsed, _parsed = False, None


def _parse(path: Path, *, keep: bool) -> onnx.ModelProto:
    """``path`` parsed without its external data; ``keep`` (inside ``parsed_once``): kept for the
    next call on the same file, unchanged since (its size, mtime and inode), which takes it."""
    global _parsed
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    cached, _parsed = _parsed, None
    proto = cached[1] if cached is not None and cached[0] == key else onnx.load(str(path), load_external_data=False)
    if keep and _keep_parsed:
        _parsed = (key, proto)
    return proto


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX model file reads (those that exist)."""
    try:
        proto = _parse(Path(path), keep=True)
    except Exception:  # not a model: load_model reports it
        return []
    base = Path(path).parent
    files = {}
    for t in weights.all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            p = base / loc
            if loc and p.is_file():
                files[os.path.realpath(p)] = p
    return list(files.values())


# Small external tensors are read into the proto up to this total (passes read small weights).
_INLINE_BUDGET = 1 << 30


def _resolve_external_data(proto: onnx.ModelProto, path: Path, limit: int) -> None:
    """Check every external-data entry (relative, inside the model's folder, a regular file,
    long enough); read small tensors in, keep large ones as references."""
    base = Path(os.path.realpath(path.parent))
    inlined = 0
    for t in weights.all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"cannot load external data of {path}: tensor {t.name!r}"
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts or "\\" in loc:
            raise BadInputError(f"{where}: location {loc!r} must be a relative path inside the model's folder")
        real = Path(os.path.realpath(base / loc))
        if not real.is_relative_to(base):
            raise BadInputError(f"{where}: {loc!r} escapes the model's folder (symlink?)")
        if not real.is_file():
            raise BadInputError(f"{where}: {loc!r} is missing or not a regular file")
        try:
            offset = int(info.get("offset", 0))
            size = real.stat().st_size
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise BadInputError(f"{where}: bad offset/length {info}") from None
        want = _expected_bytes(t)
        if offset < 0 or length < 0 or offset + length > size:
            raise BadInputError(f"{where}: {loc!r} is too short (needs bytes {offset}..{offset + length}, has {size})")
        if want is not None and want != length:
            raise BadInputError(f"{where}: {length} bytes for shape {list(t.dims)} needs {want}")
        if length < limit and inlined + length <= _INLINE_BUDGET:
            with open(real, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
            inlined += length
        else:
            weights.file_ref(t, str(real), offset, length)


def _expected_bytes(t: onnx.TensorProto) -> int | None:
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        return None
    if t.data_type in weights._PACKED:
        return None
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def check_model(model: onnx.ModelProto, what: str = "model", *, strict_shapes: bool = False) -> None:
    """Run the ONNX checker (and, with ``strict_shapes``, strict shape and type inference);
    a failure becomes a BadInputError naming ``what``."""
    try:
        run_checker(model)
        if strict_shapes:
            skel = weights.skeleton(model)[0] if weights.has_refs(model) else model
            onnx.shape_inference.infer_shapes(skel, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BadInputError(f"{what} fails the ONNX checker: {one_line(exc)}") from None


MIN_OPSET = 7  # the oldest default-domain opset ONNX Runtime runs (and opsets tests cover: 7 to 23)
# Domains ORT CPU has kernels for (model-local functions are checked separately).
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.training", "ai.onnx.preview.training"}


def check_input_model(model: onnx.ModelProto, what: str = "model"):
    """What a user's model must be for the tool to analyse it, each failure one line naming the
    node, input or opset (exit 2): the ONNX checker; at least one output; tensor inputs with no
    zero dims; opsets and op domains that exist; and ONNX Runtime CPU able to load it. Returns
    the model with its float weights shared (``weights.share``, once the checker has seen them
    whole: the session and all analysis read one copy of them; ``weights.release(model, None)``
    frees it) and that ORT session (``ort_runner.preflight`` runs it: one session, not two)."""
    from onnx_fp16_rewrite.io.ort_runner import make_session, ort_reason

    g = model.graph
    if not g.output:
        raise BadInputError(f"{what} has no graph outputs: nothing to compare")
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise BadInputError(f"{what} uses opset {op.version}; onnx {onnx.__version__} knows opsets up to {newest}")
        if op.domain in ("", "ai.onnx") and op.version < MIN_OPSET:  # ORT has no kernels for older ops
            raise BadInputError(f"{what} uses opset {op.version}; opsets {MIN_OPSET} and newer are supported: "
                                "upgrade it first, e.g. onnx.version_converter.convert_version(model, 13)")
    inits = {t.name for t in g.initializer}
    for vi in g.input:
        if vi.name in inits:
            continue
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            raise BadInputError(f"{what}: input {vi.name!r} is a {(kind or 'untyped').replace('_type', '')}, "
                                "only tensor inputs can be fed")
        dims = vi.type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            raise BadInputError(f"{what}: input {vi.name!r} has a dimension of size 0: no values to run on")
    local = {(f.domain, f.name) for f in model.functions}
    for node in g.node:
        if node.domain not in _KNOWN_DOMAINS and (node.domain, node.op_type) not in local:
            raise BadInputError(f"{what}: node {node.name or node.op_type!r} is {node.domain}::{node.op_type}, "
                                "an op of a domain ONNX Runtime does not know")
    check_model(model, what)
    # Shared before the session: built from the proto, it copied every in-proto weight out of it
    # (t5-base's 420 MB: 1.1 s), and the analysis then shared them in a copy of its own.
    shared = weights.share(model)
    try:
        return shared, make_session(shared)
    except Exception as exc:  # ORT raises its own exception types
        weights.release(shared, model)
        raise BadInputError(f"ONNX Runtime cannot load {what}: {ort_reason(exc)}") from None


# In-proto float weights past this many bytes are checked through the skeleton (run_checker).
_CHECK_COPY = 4 << 20


def run_checker(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model`` for any model: the checker opens external-data files, so a
    model with referenced (or too many) weights is checked as a weight-less skeleton whose weights
    point at an empty placeholder file. Raises onnx's own errors."""
    in_proto = sum(weights.nbytes(t) for t in model.graph.initializer if weights.shareable(t))
    if not (weights.has_refs(model) or past_proto_limit(model) or in_proto >= _CHECK_COPY):
        onnx.checker.check_model(model, full_check=full_check)
        return
    # The checker would serialise the model's weights and parse them again (0.15 s of T5's 62 MB):
    # the weight-less skeleton is checked instead, and here the one thing the checker reads of the
    # weights it no longer sees in the proto: that their raw data is as long as their shape says.
    skel, stripped = weights.skeleton(model, "placeholder")
    for t in stripped.values():
        want = None if weights.is_ref(t) else _expected_bytes(t)
        if want is not None and len(t.raw_data) < want:
            raise onnx.checker.ValidationError(
                f"TensorProto (tensor name: {t.name}) raw_data size ({len(t.raw_data)} bytes) is too small for the "
                f"declared shape and type ({want} bytes required).")
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-check-") as tmp:
        (Path(tmp) / "placeholder").touch()
        p = Path(tmp) / "model.onnx"
        p.write_bytes(skel.SerializeToString())
        onnx.checker.check_model(str(p), full_check=full_check)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (temporary files in the same folder, then rename).

    External data (``<name>.data`` beside the model) is used when the model holds referenced
    weights or is past the 2 GiB protobuf limit, or when ``external_data`` is True. Every file
    ``input_path`` (a model) reads is refused as a target. Several outputs: ``paths.plan_outputs``.
    """
    from onnx_fp16_rewrite.io.paths import plan_outputs

    plan = plan_outputs([input_path], {"--output": path})
    with plan.transaction() as tx:
        tx.write_model("--output", model, external_data=external_data)
    return Path(path)


def write_model_files(
    model: onnx.ModelProto,
    target: Path,
    stage_model: Callable[[], Path],
    stage_data: Callable[[], Path | None],
    *,
    external_data: bool | None = None,
) -> None:
    """Write ``model`` into staged temporaries (``paths._Transaction``): the model, and its
    weights streamed into ``<target>.data`` (4 KiB-aligned, so ORT can map them) when external
    data is used. No whole ModelProto with weights is ever serialised."""
    refs = weights.has_refs(model)
    use_external = external_data if external_data is not None else (refs or past_proto_limit(model))
    if not use_external:
        _write_synced(stage_model(), model.SerializeToString())
        return
    data_tmp = stage_data()
    if data_tmp is None:
        raise BadInputError(f"{target}: external data needs the output {target.name}.data reserved")
    skel = onnx.ModelProto()
    skel.CopyFrom(model)  # cheap: large weights are references (load_model, weights.make_tensor)
    data_name = target.name + ".data"
    with open(data_tmp, "wb") as f:
        for t in weights.all_tensors(skel):
            ref = weights.is_ref(t)
            if not ref and not (t.HasField("raw_data") and len(t.raw_data) >= _EXTERNAL_THRESHOLD):
                continue
            f.write(b"\0" * (-f.tell() % 4096))
            offset = f.tell()
            if ref:
                for chunk in weights.iter_chunks(t):
                    f.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
            else:
                f.write(t.raw_data)
            length = f.tell() - offset
            del t.external_data[:]
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v
        f.flush()
        os.fsync(f.fileno())
    _write_synced(stage_model(), skel.SerializeToString())


def refuse_overwrite(out: str | os.PathLike, input_path: str | os.PathLike | None) -> None:
    """Raise BadInputError when ``out`` is a file the input model reads (the model or its
    external data). Several outputs at once: ``paths.plan_outputs``."""
    from onnx_fp16_rewrite.io.paths import plan_outputs

    plan_outputs([input_path], {"output": out}, model_outputs=())


def past_proto_limit(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serialises past protobuf's 2 GiB (in-memory inference and folding cannot take it)."""
    # Tensor bytes far below the limit decide it without ByteSize (0.16 s on T5's 62 MB).
    if sum(weights.nbytes(t) for t in weights.all_tensors(model)) < _PROTO_LIMIT // 4 and \
            len(model.graph.node) < 1_000_000:
        return False
    try:
        return model.ByteSize() > _PROTO_LIMIT
    except Exception:  # protobuf 7 raises past 2 GiB
        return True


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
