"""Where a report comes from: tool and library versions, the command line, the input's hash."""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path

_LIBRARIES = ("onnx", "onnxruntime", "onnx-graphsurgeon", "numpy", "tensorrt", "polygraphy", "matplotlib")


def tool_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("onnx-fp16-rewrite")
    except metadata.PackageNotFoundError:  # running from a source tree without an install
        from onnx_fp16_rewrite import __version__

        return __version__


def versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries that decide the numbers (None: not installed)."""
    from importlib import metadata

    found: dict[str, str | None] = {"onnx-fp16-rewrite": tool_version(), "python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            found[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            found[lib] = None
    return found


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_info(path: str | None, demo: str | None = None) -> dict:
    """The input model as a report names it: path and sha256 (of the .onnx file; external
    data files are listed by the model itself), or the built-in demo's name."""
    if path is None:
        return {"path": None, "sha256": None, "demo": demo}
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "demo": None}


def command_line(argv: Sequence[str]) -> str:
    """The exact command, shell-quoted, as the user could paste it again."""
    return shlex.join(["onnx-rewrite", *argv])
