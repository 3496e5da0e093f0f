"""Loading and saving ONNX models: external data, atomic writes, never overwriting the input."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnx_fp16_rewrite.errors import BadInputError, one_line

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message past 2 GiB; above this we write weights as external data.
_PROTO_LIMIT = 2**31 - 1
# Initializers at least this large go to the external data file when one is written.
_EXTERNAL_THRESHOLD = 1024


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load a model from a path (external data included) or pass a ModelProto through.

    Raises BadInputError with a one-line message for a missing file, a file that is not ONNX,
    a truncated protobuf or missing external data.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.exists():
        raise BadInputError(f"model file not found: {path}")
    if not path.is_file():
        raise BadInputError(f"model path is not a file: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise BadInputError(f"not a valid ONNX model: {path} ({one_line(exc)})") from None
    except Exception as exc:  # protobuf raises a few unrelated types on garbage input
        raise BadInputError(f"not a valid ONNX model: {path} ({one_line(exc)})") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0 and len(proto.graph.output) == 0:
        raise BadInputError(f"not a valid ONNX model: {path} (no graph)")
    if not proto.opset_import:
        raise BadInputError(f"not a valid ONNX model: {path} (no opset_import)")
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise BadInputError(f"cannot load external data of {path}: {one_line(exc)}") from None
    return proto


def check_model(model: onnx.ModelProto, what: str = "model", *, strict_shapes: bool = False) -> None:
    """Run the ONNX checker (and, with ``strict_shapes``, strict shape and type inference);
    a failure becomes a BadInputError naming ``what``."""
    try:
        if model.ByteSize() > _PROTO_LIMIT:
            # The checker and shape inference need a path for models past the protobuf limit.
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "model.onnx"
                _save_external(model, p)
                onnx.checker.check_model(str(p))
                if strict_shapes:
                    onnx.shape_inference.infer_shapes_path(
                        str(p), str(Path(tmp) / "inferred.onnx"), check_type=True, strict_mode=True
                    )
        else:
            onnx.checker.check_model(model)
            if strict_shapes:
                onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BadInputError(f"{what} fails the ONNX checker: {one_line(exc)}") from None


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file in the same folder, then rename).

    External data (``<name>.data`` beside the model) is used when the model is past the 2 GiB
    protobuf limit, or when ``external_data`` is True. ``input_path`` is refused as a target.
    """
    out = Path(path)
    refuse_overwrite(out, input_path)
    if not out.parent.exists():
        raise BadInputError(f"output folder does not exist: {out.parent}")
    use_external = external_data if external_data is not None else model.ByteSize() > _PROTO_LIMIT
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnx-rewrite-", dir=out.parent))
    try:
        tmp_model = tmp_dir / out.name
        if use_external:
            _save_external(model, tmp_model)
            data_name = out.name + ".data"
            os.replace(tmp_dir / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
    finally:
        for leftover in tmp_dir.iterdir():
            leftover.unlink()
        tmp_dir.rmdir()
    logger.info("wrote %s%s", out, " (+ external data)" if use_external else "")
    return out


def refuse_overwrite(out: str | os.PathLike, input_path: str | os.PathLike | None) -> None:
    """Raise BadInputError when ``out`` is the input model (or its external data file)."""
    if input_path is None:
        return
    out_p, in_p = Path(out).resolve(), Path(input_path).resolve()
    if out_p == in_p or (out_p.exists() and in_p.exists() and os.path.samefile(out_p, in_p)):
        raise BadInputError(f"output path is the input model, refusing to overwrite: {out}")


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    # Work on a copy: convert_model_to_external_data mutates the proto in place.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=_EXTERNAL_THRESHOLD,
    )
