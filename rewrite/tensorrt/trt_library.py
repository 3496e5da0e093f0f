"""Which TensorRT: standard TensorRT (``tensorrt``) or TensorRT-RTX (``tensorrt_rtx``).

Both share TensorRT's ONNX parser and strongly typed builder API, and Polygraphy (>= 0.53) drives
either through one switch, ``polygraphy.config.USE_TENSORRT_RTX`` (what
``POLYGRAPHY_USE_TENSORRT_RTX=1`` sets): its ``backend.trt`` modules decide at import time which
module their lazy ``trt`` stands for. So there is one backend here, not two: this module picks the
library, sets Polygraphy's switch before ``polygraphy.backend.trt`` is first imported, and says
which library and version the report should name.

Preference: standard TensorRT when it imports, else TensorRT-RTX; ``POLYGRAPHY_USE_TENSORRT_RTX=1``
in the environment asks for TensorRT-RTX even when both are installed (Polygraphy's own rule).

TensorRT-RTX facts this rests on (measured on an H200 with TensorRT-RTX 1.7.1.116, Polygraphy
0.53.6; Polygraphy ``backend/trt/config.py``): networks build strongly typed only -- Polygraphy
refuses the FP16/INT8/BF16/FP8 builder flags under TensorRT-RTX -- and an engine runs only on the
compute capabilities the library supports (7.5/8.0/8.6/8.9/12.x for 1.7; not 9.0, Hopper).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass

from onnx_fp16_rewrite.errors import TensorRTUnavailableError, one_line

logger = logging.getLogger(__name__)

NOT_INSTALLED = ("TensorRT is not installed: pip install 'onnx-fp16-rewrite[trt]' (or TensorRT-RTX: "
                 "'onnx-fp16-rewrite[trt-rtx]') on a machine with an NVIDIA GPU")

Version = tuple[int, int]

# The oldest release of each library this backend drives: strong typing and the 10.x builder API.
MIN_VERSIONS: dict[str, Version] = {"tensorrt": (10, 0), "tensorrt_rtx": (1, 0)}
_LABELS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}


@dataclass(frozen=True)
class TrtLibrary:
    """The TensorRT library in use: ``module`` is ``tensorrt`` or ``tensorrt_rtx``."""

    module: str
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.module == "tensorrt_rtx"

    @property
    def label(self) -> str:
        """``"TensorRT 10.8.0.43"`` or ``"TensorRT-RTX 1.7.1.116"``: what reports and the CLI print."""
        return f"{_LABELS[self.module]} {self.version}"

    @property
    def parsed_version(self) -> Version:
        return parse_version(self.version)

    def __str__(self) -> str:
        return self.label


def parse_version(text: str) -> Version:
    """(major, minor) of a ``__version__`` string such as ``"10.8.0.43"`` or ``"1.7.1.116"``."""
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"cannot read a TensorRT version from {text!r}")
    return int(match[1]), int(match[2])


def rtx_requested() -> bool:
    """Whether the environment asks for TensorRT-RTX (Polygraphy's ``POLYGRAPHY_USE_TENSORRT_RTX``)."""
    return os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX", "0") not in ("", "0")


def find_tensorrt() -> TrtLibrary:
    """The library to build with, Polygraphy switched to it; raises TensorRTUnavailableError (exit 5)
    when neither library (or Polygraphy) is installed and loadable, or the library is too old."""
    order = ("tensorrt_rtx", "tensorrt") if rtx_requested() else ("tensorrt", "tensorrt_rtx")
    errors: list[str] = []
    for name in order:
        try:
            module = __import__(name)
        except ImportError:
            continue
        except OSError as exc:  # the wheel is there but its shared libraries are not loadable
            errors.append(f"{_LABELS[name]} is installed but cannot be loaded: {one_line(exc)}")
            continue
        library = TrtLibrary(name, str(getattr(module, "__version__", "unknown")))
        check_version(library)
        _switch_polygraphy(library)
        logger.info("using %s", library.label)
        return library
    raise TensorRTUnavailableError(errors[0] if errors else NOT_INSTALLED)


def check_version(library: TrtLibrary) -> None:
    try:
        version = library.parsed_version
    except ValueError as exc:
        raise TensorRTUnavailableError(str(exc)) from None
    oldest = MIN_VERSIONS[library.module]
    if version < oldest:
        raise TensorRTUnavailableError(
            f"{library.label} is too old: this backend needs {_LABELS[library.module]} >= {oldest[0]}.{oldest[1]}")


def _switch_polygraphy(library: TrtLibrary) -> None:
    """Point Polygraphy at ``library`` before its TensorRT backend is imported (it binds then)."""
    try:
        from polygraphy import config
    except ImportError:
        raise TensorRTUnavailableError("Polygraphy is not installed: pip install 'onnx-fp16-rewrite[trt]'") from None
    if library.is_rtx and not hasattr(config, "USE_TENSORRT_RTX"):
        raise TensorRTUnavailableError("this Polygraphy cannot drive TensorRT-RTX: pip install 'polygraphy>=0.53'")
    want = library.is_rtx
    if getattr(config, "USE_TENSORRT_RTX", False) != want:
        if "polygraphy.backend.trt.loader" in sys.modules:
            # Its lazy `trt` module was bound to the other library at import; switching now would mix them.
            raise TensorRTUnavailableError(
                f"Polygraphy's TensorRT backend was already imported for the other library; cannot switch to "
                f"{library.label} in this process (set POLYGRAPHY_USE_TENSORRT_RTX before starting)")
        config.USE_TENSORRT_RTX = want
