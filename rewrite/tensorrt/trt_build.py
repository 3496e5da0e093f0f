"""Parse, build and run with TensorRT or TensorRT-RTX through Polygraphy, as three separate steps.

Separate because each can be the last one that works on a machine: TensorRT-RTX parses and builds
engines on any NVIDIA GPU, but runs them only on the compute capabilities it supports (an H200,
9.0, refuses with "The engine cannot run on this GPU, which has compute capability 9.0"). So the
build stops at the serialized engine (Polygraphy's ``EngineBytesFromNetwork``; its
``EngineFromNetwork`` would deserialize at once and fail the whole build), and running is a step
of its own whose refusal becomes a reason in words (``EngineNotRunnable``), not an exception trace.

Polygraphy is imported inside the functions, after ``trt_library.find_tensorrt`` has pointed it at
the library in use.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.errors import TensorRTBuildError, one_line

logger = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[tuple[int, ...], ...]]

# Layers with no arithmetic to pin; Polygraphy's `debug precision` skips the same two kinds.
_NO_PRECISION_KINDS = frozenset({"CONSTANT", "SHAPE"})
_FLOAT_TYPES = frozenset({"FLOAT", "HALF", "BF16"})


@dataclass(frozen=True)
class LayerInfo:
    """What the mapping needs of a TensorRT layer: its name, ``LayerType`` name and output ``DataType`` names."""

    name: str
    kind: str
    output_types: tuple[str, ...]

    @property
    def computes_floats(self) -> bool:
        return self.kind not in _NO_PRECISION_KINDS and any(t in _FLOAT_TYPES for t in self.output_types)


@dataclass
class LayerPrecisions:
    """The plan as layer settings: layer name -> indices of outputs typed FP32 (compute precision FP32)."""

    fp32: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


@dataclass
class BuiltEngine:
    """A parsed network's layers and the serialized engine built from it."""

    engine: bytes
    layers: list[LayerInfo]
    mapping: LayerPrecisions
    strongly_typed: bool
    parse_seconds: float
    build_seconds: float


class EngineNotRunnable(Exception):
    """The engine was built but cannot run on this machine; ``reason`` is one line in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def map_plan_to_layers(plan: PrecisionPlan, layers: Sequence[LayerInfo]) -> LayerPrecisions:
    """Which layers get FP32: exactly those named like a pinned node (trtexec's matching rule).

    Layers with no float arithmetic (constants, shape layers, integer outputs) are skipped with the
    reason; ``unmatched`` lists pinned nodes that name no layer (e.g. CumSum on TensorRT <= 10.7,
    imported as an unnamed loop), which therefore stay free to run in FP16.
    """
    result = LayerPrecisions()
    found: set[str] = set()
    for layer in layers:
        if not plan.is_fp32(layer.name):
            continue
        found.add(layer.name)
        if not layer.computes_floats:
            result.skipped[layer.name] = f"{layer.kind} layer with outputs {list(layer.output_types)}: nothing to pin"
            continue
        result.fp32[layer.name] = tuple(i for i, t in enumerate(layer.output_types) if t in _FLOAT_TYPES)
    result.unmatched = sorted(set(plan.fp32_nodes) - found)
    return result


def parse_layers(path: str, *, strongly_typed: bool) -> list[LayerInfo]:
    """The layers TensorRT's ONNX parser makes of the model at ``path`` (no build)."""
    from polygraphy.backend.trt import NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    try:
        with polygraphy_logs_to_logging():
            _builder, network, _parser = NetworkFromOnnxPath(path, strongly_typed=strongly_typed)()
            return _layer_infos(network)[1]
    except PolygraphyException as exc:
        raise TensorRTBuildError(f"TensorRT's ONNX parser refused {path}: {one_line(exc)} (rerun with -v for its log)") from None


def build_engine(path: str, *, fp16_flag: bool, strongly_typed: bool, plan: PrecisionPlan | None,
                 shapes: Shapes) -> BuiltEngine:
    """Parse ``path`` and build a serialized engine. ``plan`` (weak typing only) pins the layers
    named like its nodes to FP32 under OBEY_PRECISION_CONSTRAINTS."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException
    from polygraphy.mod.trt_importer import lazy_import_trt

    trt = lazy_import_trt()  # tensorrt or tensorrt_rtx, whichever Polygraphy was switched to
    try:
        with polygraphy_logs_to_logging():
            start = time.perf_counter()
            # Keep the parser referenced until the engine is built: it owns the imported weights.
            builder, network, parser = NetworkFromOnnxPath(path, strongly_typed=strongly_typed)()
            layers, infos = _layer_infos(network)
            mapping = map_plan_to_layers(plan, infos) if plan is not None else LayerPrecisions()
            for layer, info in zip(layers, infos):
                if info.name in mapping.fp32:
                    layer.precision = trt.float32
                    for k in mapping.fp32[info.name]:
                        layer.set_output_type(k, trt.float32)
            parsed = time.perf_counter()
            profiles = None
            if shapes:
                profile = Profile()
                for name, (lo, opt, hi) in shapes.items():
                    profile.add(name, min=lo, opt=opt, max=hi)
                profiles = [profile]
            kwargs = {"profiles": profiles}
            if fp16_flag:  # never passed under TensorRT-RTX: Polygraphy refuses precision flags there
                kwargs["fp16"] = True
            if mapping.fp32:
                kwargs["precision_constraints"] = "obey"
            engine = EngineBytesFromNetwork((builder, network, parser), config=CreateConfig(**kwargs))()
            built = time.perf_counter()
    except PolygraphyException as exc:
        raise TensorRTBuildError(f"TensorRT could not parse or build {path}: {one_line(exc)} "
                                 "(rerun with -v for its log)") from None
    return BuiltEngine(bytes(engine), infos, mapping, strongly_typed, round(parsed - start, 3),
                       round(built - parsed, 3))


def run_engine(engine: bytes, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Deserialize and run ``engine`` on each feed; raises EngineNotRunnable with TensorRT's own
    reason when this machine cannot run it (unsupported compute capability, no GPU)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.exception import PolygraphyException

    errors = _ErrorLines()
    try:
        with polygraphy_logs_to_logging(), errors.capture():
            loaded = EngineFromBytes(engine)()
            with TrtRunner(loaded) as runner:
                # Copies: the runner reuses its output buffers between inferences.
                return [{k: np.array(v, copy=True) for k, v in runner.infer(feed).items()} for feed in feeds]
    except (PolygraphyException, RuntimeError, OSError) as exc:
        raise EngineNotRunnable(errors.reason() or one_line(exc)) from None


def _enum_name(value: object) -> str:
    """``trt.DataType.HALF`` -> ``"HALF"`` (pybind11 enums have ``.name``; ``str`` is the fallback)."""
    return str(getattr(value, "name", None) or str(value).rsplit(".", 1)[-1])


def _layer_infos(network) -> tuple[list, list[LayerInfo]]:
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    infos = []
    for layer in layers:
        outs = [layer.get_output(k) for k in range(layer.num_outputs)]
        infos.append(LayerInfo(layer.name, _enum_name(layer.type),
                               tuple(_enum_name(t.dtype) if t is not None else "NONE" for t in outs)))
    return layers, infos


class _ErrorLines(logging.Handler):
    """Collects the error lines TensorRT logs (through Polygraphy) while an engine is loaded."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().strip())

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        target = logging.getLogger("Polygraphy")
        target.addHandler(self)
        try:
            yield
        finally:
            target.removeHandler(self)

    def reason(self) -> str:
        """TensorRT's own explanation (the compute-capability line, when there is one), one line."""
        lines = [line for text in self.lines for line in text.splitlines() if line.strip()]
        for line in lines:
            if "compute capability" in line.lower():
                return _strip_prefix(line)
        generic = ("could not deserialize", "see log for details")
        specific = [line for line in lines if not any(g in line.lower() for g in generic)]
        return _strip_prefix(specific[0]) if specific else ""


def _strip_prefix(line: str) -> str:
    """TensorRT's sentence without Polygraphy's ``[E] `` mark, the ``IRuntime::deserializeCudaEngine:
    Error Code 6: API Usage Error (...)`` framing and the source location (``In throw...``) after it."""
    line = line.strip()
    if line.startswith("[") and "]" in line[:6]:
        line = line.split("]", 1)[1].strip()
    framed = re.match(r"^\S+::\S+: Error Code \d+: [^(]*\((.*)$", line)
    if framed:
        line = framed[1]
    line = re.split(r"\s+In \w+ at |\s+In throw", line)[0].rstrip(" )")
    return line[:300]


class _Relay(logging.Handler):
    """Re-logs Polygraphy's records under this module's logger at INFO at most: TensorRT's own
    errors are reasons we report in words, so its log is detail for ``-v``, not stderr noise."""

    def emit(self, record: logging.LogRecord) -> None:
        logger.log(min(record.levelno, logging.INFO), "%s", record.getMessage())


@contextlib.contextmanager
def polygraphy_logs_to_logging() -> Iterator[None]:
    """Polygraphy (and TensorRT's logger, which Polygraphy wraps) prints to stdout by default; library
    code must not print, so route its messages into Python logging meanwhile (the "Polygraphy"
    logger, relayed to this module's logger and not propagated to the root)."""
    from polygraphy.logger import G_LOGGER

    if not hasattr(G_LOGGER, "use_python_logging_system"):  # older Polygraphy: silence it instead
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            yield
        return
    target = logging.getLogger("Polygraphy")
    relay = _Relay()
    # Colors off too: with the optional `colored` package missing, Polygraphy would print a notice.
    before = G_LOGGER.use_python_logging_system, G_LOGGER.colors, target.propagate
    G_LOGGER.use_python_logging_system, G_LOGGER.colors = True, False
    target.propagate = False
    target.addHandler(relay)
    try:
        yield
    finally:
        target.removeHandler(relay)
        G_LOGGER.use_python_logging_system, G_LOGGER.colors, target.propagate = before
