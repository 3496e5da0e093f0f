"""TensorRT backend: build the model with TensorRT's own ONNX parser, run the engine on the feeds
the FP16 emulation uses, and report per output in the emulation's schema (``Fp16Report``).

TensorRT and Polygraphy are optional (``pip install 'onnx-fp16-rewrite[trt]'``, NVIDIA GPU) and
imported only inside the functions that build, so a missing TensorRT never breaks the CLI. What
decides *how* to build is pure and tested without TensorRT: ``choose_build`` (by TensorRT version
and by whether the model is typed FP16), ``map_plan_to_layers`` (which layers get FP32),
``profile_shapes`` and ``trtexec_mode``.

The API facts this rests on (TensorRT Python API reference, 10.x ``Builder`` / ``ILayer`` pages and
11.0 ``Builder`` page; Polygraphy 0.53 ``backend/trt/loader.py`` and ``config.py``):

- Weak typing (TensorRT 10.x): ``BuilderFlag.FP16`` lets any layer run in FP16; ``ILayer.precision``
  and ``ILayer.set_output_type`` pin a layer, honoured strictly only with
  ``OBEY_PRECISION_CONSTRAINTS``. Polygraphy: ``CreateConfig(fp16=True, precision_constraints="obey")``.
  Deprecated in 10.12, removed in 11.0.
- Strong typing: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (Polygraphy
  ``NetworkFromOnnxPath(..., strongly_typed=True)``); tensor types follow the ONNX types and Casts,
  and TensorRT rejects layer precisions and output types. In 11.0 the flag is deprecated and ignored
  (networks are always strongly typed) and ``BuilderFlag.FP16`` no longer exists.
- The parser names a layer after its ONNX node (see ``onnx_fp16_rewrite.emit.trtexec``), so the precision plan is
  applied to the layers whose name is exactly a pinned node's name -- the same rule trtexec's
  ``--layerPrecisions`` follows, so this build is the one ``trtexec_command(mode="weak")`` describes
  (plus FP32 output types, which keep FP32 results FP32 between pinned layers).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_fp16_rewrite.errors import BadInputError, TensorRTBuildError, TensorRTUnavailableError, one_line
from onnx_fp16_rewrite.emulation.fp16_emulation import Fp16Report, build_emulation, compare_output
from onnx_fp16_rewrite.io.ort_runner import Feed, infer_types, run_model
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

__all__ = [
    "NOT_INSTALLED",
    "BuildChoice",
    "LayerInfo",
    "LayerPrecisions",
    "check_trt",
    "choose_build",
    "count_layers",
    "has_fp16_tensors",
    "map_plan_to_layers",
    "parse_trt_version",
    "profile_shapes",
    "reference_outputs",
    "require_tensorrt",
    "trtexec_mode",
]

logger = logging.getLogger(__name__)

Version = tuple[int, int]

NOT_INSTALLED = "TensorRT is not installed: pip install 'onnx-fp16-rewrite[trt]' on a machine with an NVIDIA GPU"
MIN_VERSION: Version = (10, 0)
# Weak typing was deprecated in 10.12 and removed in 11.0.
_WEAK_DEPRECATED: Version = (10, 12)
_FLOAT_TYPES = frozenset({"FLOAT", "HALF", "BF16"})
# Layers with no arithmetic to pin; Polygraphy's `debug precision` skips the same two kinds.
_NO_PRECISION_KINDS = frozenset({"CONSTANT", "SHAPE"})


def parse_trt_version(text: str) -> Version:
    """(major, minor) of a ``tensorrt.__version__`` string such as ``"10.8.0.43"``."""
    match = re.match(r"\s*(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"cannot read a TensorRT version from {text!r}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class BuildChoice:
    """How to build: ``mode`` is ``weak`` (FP16 flag + pinned FP32 layers), ``strong`` (types from
    the model) or ``fp32`` (TensorRT >= 11 with an FP32 model: nothing runs in FP16)."""

    mode: str
    trt_version: str
    fp16_flag: bool
    strongly_typed_flag: bool
    layer_precisions: bool
    reason: str


def choose_build(trt_version: str, *, model_has_fp16: bool, pinned: int = 0) -> BuildChoice:
    """The build mode for a model on a TensorRT version, with the reason in words.

    Raises TensorRTUnavailableError for TensorRT < 10.0 (no strong typing; not targeted)."""
    try:
        major, minor = parse_trt_version(trt_version)
    except ValueError as exc:
        raise TensorRTUnavailableError(str(exc)) from None
    if (major, minor) < MIN_VERSION:
        raise TensorRTUnavailableError(f"TensorRT {trt_version} is too old: this backend needs TensorRT >= 10.0")
    if model_has_fp16:
        if major >= 11:
            return BuildChoice("strong", trt_version, False, False, False,
                               f"mixed-precision model: TensorRT {major}.x networks are always strongly typed, "
                               "so tensors keep the model's FLOAT16/FLOAT types")
        # Weak typing would treat the model's Casts as hints and could run its FP32 islands in FP16.
        return BuildChoice("strong", trt_version, False, True, False,
                           "mixed-precision model: built strongly typed (STRONGLY_TYPED), so TensorRT keeps the "
                           "model's FLOAT16/FLOAT types and Casts")
    if major >= 11:
        return BuildChoice("fp32", trt_version, False, False, False,
                           f"FP32 model on TensorRT {major}.x: there is no FP16 flag, so this engine runs in FP32 and "
                           "proves nothing about FP16; emit a mixed-precision model (fix --emit mixed) and check that")
    if pinned:
        reason = (f"FP32 model: weakly typed build with the FP16 flag; {pinned} pinned node(s) become FP32 layers "
                  "under OBEY_PRECISION_CONSTRAINTS")
    else:
        reason = "FP32 model without a precision plan: weakly typed build with the FP16 flag (any layer may run in FP16)"
    if (major, minor) >= _WEAK_DEPRECATED:
        reason += "; weak typing is deprecated since TensorRT 10.12 and gone in 11 (prefer fix --emit mixed)"
    return BuildChoice("weak", trt_version, True, False, pinned > 0, reason)


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


def count_layers(layers: Sequence[LayerInfo], mode: str, fp32_layers: Mapping[str, object]) -> tuple[int, int]:
    """(FP16, FP32) counts of float-computing layers, for the report's node counts."""
    float_layers = [layer for layer in layers if layer.computes_floats]
    if mode == "weak":
        fp32 = sum(layer.name in fp32_layers for layer in float_layers)
    elif mode == "strong":
        fp32 = sum("HALF" not in layer.output_types for layer in float_layers)
    else:
        fp32 = len(float_layers)
    return len(float_layers) - fp32, fp32


def has_fp16_tensors(model: onnx.ModelProto) -> bool:
    """Whether the model types any tensor FLOAT16 (the emulation's rule for a strongly typed model)."""
    return TensorProto.FLOAT16 in infer_types(model)[0].values()


def trtexec_mode(requested: str, model_has_fp16: bool) -> tuple[str, list[str]]:
    """Resolve ``--mode weak|strong|auto`` for the trtexec command; returns (mode, warnings)."""
    if requested not in ("weak", "strong", "auto"):
        raise BadInputError(f"--mode must be weak, strong or auto, not {requested!r}")
    mode = ("strong" if model_has_fp16 else "weak") if requested == "auto" else requested
    warnings = []
    if mode == "strong" and not model_has_fp16:
        warnings.append("the model has no FLOAT16 tensors: a strongly typed build runs it entirely in FP32 "
                        "(emit a mixed-precision model with fix --emit mixed)")
    if mode == "weak" and model_has_fp16:
        warnings.append("the model has FLOAT16 tensors: under weak typing TensorRT treats its Casts as hints and may "
                        "run its FP32 islands in FP16 (use --mode strong)")
    return mode, warnings


def profile_shapes(model: onnx.ModelProto, feeds: Sequence[Feed]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes for inputs with dynamic dims, spanning the feeds; {} when all are static.

    Without a profile Polygraphy would build dynamic dims for its default size (1), not our inputs."""
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in inits or all(d.HasField("dim_value") for d in dims):
            continue
        seen = np.array([np.shape(f[vi.name]) for f in feeds if vi.name in f])
        if seen.size == 0:
            raise BadInputError(f"input {vi.name!r} has dynamic dims and no feed gives its shape")
        shapes[vi.name] = (tuple(map(int, seen.min(0))), tuple(map(int, seen[0])), tuple(map(int, seen.max(0))))
    return shapes


def require_tensorrt() -> str:
    """TensorRT's version string; raises TensorRTUnavailableError (exit 5) when TensorRT or
    Polygraphy is missing, cannot be loaded, or TensorRT is older than 10.0."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailableError(NOT_INSTALLED) from None
    except OSError as exc:  # the wheel is there but its shared libraries are not loadable
        raise TensorRTUnavailableError(f"TensorRT is installed but cannot be loaded: {one_line(exc)}") from None
    try:
        import polygraphy.backend.trt  # noqa: F401
    except ImportError:
        raise TensorRTUnavailableError("Polygraphy is not installed: pip install 'onnx-fp16-rewrite[trt]'") from None
    version = str(getattr(tensorrt, "__version__", "unknown"))
    choose_build(version, model_has_fp16=False)  # raises for unreadable or too old versions
    return version


def reference_outputs(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[Feed]:
    """The model's outputs in FP32 (ORT, optimizations off); a mixed model computes in FP32 with its
    FP16-rounded weights, as the emulation's own reference does."""
    emu = build_emulation(model, None, round_fp16=False, with_stats=False)
    as_fp32 = [{k: np.asarray(v, np.float32) if np.asarray(v).dtype == np.float16 else v for k, v in f.items()}
               for f in feeds]
    return run_model(emu.model, as_fp32, [o.name for o in model.graph.output])


def check_trt(
    model: onnx.ModelProto,
    feeds: Sequence[Feed],
    reference: Sequence[Feed] | None = None,
    *,
    plan: PrecisionPlan | None = None,
    model_path: str | None = None,
    rel_l2_tolerance: float = 1e-2,
) -> Fp16Report:
    """Build ``model`` with TensorRT in the mode ``choose_build`` picks, run it on ``feeds`` and
    compare every output with ``reference`` (default: the model's own FP32 outputs).

    ``model_path``: the model on disk (TensorRT's parser reads external data beside it); without
    it the model is written to a temporary folder. TensorRT cannot say *where* a tensor went bad
    without marking outputs, which changes the build, so ``first_failures`` stays empty.
    """
    version = require_tensorrt()
    start = time.perf_counter()
    plan = PrecisionPlan.from_model(model) if plan is None else plan
    choice = choose_build(version, model_has_fp16=has_fp16_tensors(model), pinned=len(plan))
    logger.info("TensorRT %s: %s", version, choice.reason)
    if reference is None:
        reference = reference_outputs(model, feeds)
    typed = _typed_feeds(model, feeds)
    shapes = profile_shapes(model, typed)
    with tempfile.TemporaryDirectory() as tmp:
        if model_path is None:
            from onnx_fp16_rewrite.io.model_io import save_model

            model_path = str(save_model(model, Path(tmp) / "model.onnx"))
        runs, layers, mapping = _build_and_run(model_path, choice, plan, typed, shapes)
    outputs = [
        compare_output(o.name, [r[o.name] for r in runs], [ref[o.name] for ref in reference], rel_l2_tolerance)
        for o in model.graph.output
    ]
    fp16_layers, fp32_layers = count_layers(layers, choice.mode, mapping.fp32)
    notes = [f"TensorRT {version}: {choice.reason}", "node counts are TensorRT layers"]
    if mapping.unmatched:
        notes.append(f"{len(mapping.unmatched)} pinned node(s) name no TensorRT layer and may run in FP16: "
                     + ", ".join(mapping.unmatched[:5]) + (" ..." if len(mapping.unmatched) > 5 else ""))
    passed = all(o.ok for o in outputs)
    if not passed:
        notes.append("TensorRT does not say where a tensor went bad: run check (CPU emulation) to locate it")
    return Fp16Report(
        mode=choice.mode, strict_cumsum=False, fp16_nodes=fp16_layers, fp32_nodes=fp32_layers, outputs=outputs,
        first_failures=[], failing_tensors=0, rel_l2_tolerance=rel_l2_tolerance, passed=passed,
        seconds=round(time.perf_counter() - start, 3), notes=notes,
    )


def _typed_feeds(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[Feed]:
    """Feeds cast to the model's input types (a mixed model takes FLOAT16 inputs; the engine checks)."""
    types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return [{k: np.asarray(v).astype(types.get(k, np.asarray(v).dtype)) for k, v in f.items()} for f in feeds]


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


def _build_and_run(path: str, choice: BuildChoice, plan: PrecisionPlan, feeds: list[Feed],
                   shapes: dict[str, tuple[tuple[int, ...], ...]]) -> tuple[list[Feed], list[LayerInfo], LayerPrecisions]:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner
    from polygraphy.exception import PolygraphyException

    try:
        with _polygraphy_logs_to_logging():
            # Keep the parser referenced until the engine is built: it owns the imported weights.
            builder, network, parser = NetworkFromOnnxPath(path, strongly_typed=choice.strongly_typed_flag)()
            layers, infos = _layer_infos(network)
            mapping = map_plan_to_layers(plan, infos) if choice.layer_precisions else LayerPrecisions()
            for layer, info in zip(layers, infos):
                if info.name in mapping.fp32:
                    layer.precision = trt.float32
                    for k in mapping.fp32[info.name]:
                        layer.set_output_type(k, trt.float32)
            profiles = None
            if shapes:
                profile = Profile()
                for name, (lo, opt, hi) in shapes.items():
                    profile.add(name, min=lo, opt=opt, max=hi)
                profiles = [profile]
            config = CreateConfig(fp16=choice.fp16_flag, precision_constraints="obey" if mapping.fp32 else None,
                                  profiles=profiles)
            engine = EngineFromNetwork((builder, network, parser), config=config)()
            with TrtRunner(engine) as runner:
                # Copies: the runner reuses its output buffers between inferences.
                runs = [{k: np.array(v, copy=True) for k, v in runner.infer(feed).items()} for feed in feeds]
    except PolygraphyException as exc:
        raise TensorRTBuildError(
            f"TensorRT could not build or run {path} ({choice.mode} typing): {one_line(exc)} (rerun with -v for its log)"
        ) from None
    return runs, infos, mapping


@contextlib.contextmanager
def _polygraphy_logs_to_logging() -> Iterator[None]:
    """Polygraphy (and TensorRT's logger, which Polygraphy wraps) prints to stdout by default; library
    code must not print, so route its messages into Python logging ("Polygraphy" logger) meanwhile."""
    from polygraphy.logger import G_LOGGER

    if not hasattr(G_LOGGER, "use_python_logging_system"):  # older Polygraphy: silence it instead
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            yield
        return
    # Colors off too: with the optional `colored` package missing, Polygraphy would print a notice.
    before = G_LOGGER.use_python_logging_system, G_LOGGER.colors
    G_LOGGER.use_python_logging_system, G_LOGGER.colors = True, False
    try:
        yield
    finally:
        G_LOGGER.use_python_logging_system, G_LOGGER.colors = before
