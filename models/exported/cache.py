"""A disk cache of exported corpus models, so a machine exports each (model, exporter) once.

The key covers what changes an export: the name, the exporter, the library versions and the source of the
builder's module and of the export code. Folder: ``$ONNX_FP16_REWRITE_CACHE`` if set, else
``~/.cache/onnx-fp16-rewrite``; entries live under ``exported/``. Writes are atomic (temp file + rename), so
two processes building the same entry at once both end with a whole file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["cache_dir", "cache_key", "load_entry", "store_entry"]

logger = logging.getLogger(__name__)

_LIBRARIES = ("torch", "transformers", "diffusers", "onnx", "onnxscript", "numpy")


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    if root is None:
        root = os.environ.get("ONNX_FP16_REWRITE_CACHE") or Path.home() / ".cache" / "onnx-fp16-rewrite"
    return Path(root) / "exported"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cache_key(spec: Spec, exporter: str) -> str:
    h = hashlib.sha256(f"{spec.name}|{exporter}".encode())
    for package in _LIBRARIES:
        h.update(f"|{package}={_version(package)}".encode())
    here = Path(__file__).parent
    for source in sorted({inspect.getsourcefile(spec.module), str(here / "export.py"), str(here / "spec.py")}):
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:16]


def _paths(spec: Spec, exporter: str, root) -> tuple[Path, Path]:
    stem = cache_dir(root) / f"{spec.name}-{exporter}-{cache_key(spec, exporter)}"
    return stem.with_suffix(".onnx"), stem.with_suffix(".npz")


def load_entry(spec: Spec, exporter: str, root=None) -> tuple[onnx.ModelProto, list[Feed]] | None:
    """The cached model and torch's reference outputs (one dict per feed), or None."""
    model_path, ref_path = _paths(spec, exporter, root)
    if not (model_path.is_file() and ref_path.is_file()):
        return None
    try:
        model = onnx.load(model_path)
        with np.load(ref_path) as data:
            refs: dict[int, Feed] = {}
            for key in data.files:
                index, name = key.split("/", 1)
                refs.setdefault(int(index), {})[name] = data[key]
    except Exception as exc:  # a damaged entry is rebuilt, not fatal
        logger.warning("corpus cache entry %s unreadable (%s): rebuilding", model_path, exc)
        return None
    return model, [refs[i] for i in sorted(refs)]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store_entry(spec: Spec, exporter: str, model: onnx.ModelProto, reference: list[Feed], root=None) -> Path:
    import io

    model_path, ref_path = _paths(spec, exporter, root)
    buf = io.BytesIO()
    np.savez(buf, **{f"{i}/{name}": value for i, ref in enumerate(reference) for name, value in ref.items()})
    _atomic_write(ref_path, buf.getvalue())
    _atomic_write(model_path, model.SerializeToString())
    logger.debug("cached %s", model_path)
    return model_path
