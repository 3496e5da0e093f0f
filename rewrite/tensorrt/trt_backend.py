"""TensorRT backend: build the model with TensorRT's own ONNX parser, run the engine on the feeds
the FP16 emulation uses, and report per output in the emulation's schema (``Fp16Report``).

One backend for standard TensorRT and TensorRT-RTX (``trt_library`` picks one and switches
Polygraphy to it; ``trt_build`` parses, builds and runs). Where the engine is built but cannot run
(TensorRT-RTX on a GPU it does not support), the report says "parsed: ok, built: ok" and why it
was not run, and ``not_verified`` carries that reason (CLI exit 6).

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
- TensorRT-RTX (1.x): strongly typed only; no FP16 builder flag (Polygraphy refuses it), so it is
  dispatched like TensorRT 11: mixed models strongly typed, FP32 models built FP32 with a warning.
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

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation.fp16_emulation import Fp16Report, build_emulation, compare_output
from onnx_fp16_rewrite.errors import BadInputError, TensorRTUnavailableError
from onnx_fp16_rewrite.io.ort_runner import Feed, infer_types, run_model
from onnx_fp16_rewrite.tensorrt.trt_build import (
    EngineNotRunnable,
    LayerInfo,
    LayerPrecisions,
    build_engine,
    map_plan_to_layers,
    polygraphy_logs_to_logging,
    run_engine,
)
from onnx_fp16_rewrite.tensorrt.trt_library import (
    MIN_VERSIONS,
    NOT_INSTALLED,
    TrtLibrary,
    find_tensorrt,
    parse_version,
)

__all__ = [
    "NOT_INSTALLED",
    "BuildChoice",
    "LayerInfo",
    "LayerPrecisions",
    "TrtLibrary",
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

# Weak typing was deprecated in 10.12 and removed in 11.0.
_WEAK_DEPRECATED: Version = (10, 12)
_polygraphy_logs_to_logging = polygraphy_logs_to_logging  # the name tests and older callers use


def parse_trt_version(text: str) -> Version:
    """(major, minor) of a ``tensorrt.__version__`` string such as ``"10.8.0.43"``."""
    return parse_version(text)


@dataclass(frozen=True)
class BuildChoice:
    """How to build: ``mode`` is ``weak`` (FP16 flag + pinned FP32 layers), ``strong`` (types from
    the model) or ``fp32`` (TensorRT >= 11 or TensorRT-RTX with an FP32 model: nothing runs in FP16)."""

    mode: str
    trt_version: str
    fp16_flag: bool
    strongly_typed_flag: bool
    layer_precisions: bool
    reason: str


def choose_build(trt_version: str, *, model_has_fp16: bool, pinned: int = 0,
                 library: str = "tensorrt") -> BuildChoice:
    """The build mode for a model on a TensorRT (``library="tensorrt"``) or TensorRT-RTX
    (``"tensorrt_rtx"``) version, with the reason in words.

    Raises TensorRTUnavailableError for versions too old to target (TensorRT < 10.0, TensorRT-RTX < 1.0)."""
    try:
        major, minor = parse_version(trt_version)
    except ValueError as exc:
        raise TensorRTUnavailableError(str(exc)) from None
    oldest = MIN_VERSIONS[library]
    name = "TensorRT-RTX" if library == "tensorrt_rtx" else "TensorRT"
    if (major, minor) < oldest:
        raise TensorRTUnavailableError(
            f"{name} {trt_version} is too old: this backend needs {name} >= {oldest[0]}.{oldest[1]}")
    if library == "tensorrt_rtx":
        if model_has_fp16:
            return BuildChoice("strong", trt_version, False, True, False,
                               f"mixed-precision model: {name} {trt_version} builds strongly typed (STRONGLY_TYPED), "
                               "so tensors keep the model's FLOAT16/FLOAT types and Casts")
        weak = (f"; {pinned} pinned node(s) cannot be applied as layer precisions" if pinned else "")
        return BuildChoice("fp32", trt_version, False, True, False,
                           f"FP32 model on {name}: it has no weakly typed FP16 mode (no FP16 flag){weak}, so this "
                           "engine runs in FP32 and proves nothing about FP16; emit a mixed-precision model "
                           "(fix --emit mixed) and check that")
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


def require_tensorrt() -> TrtLibrary:
    """The TensorRT library to use (standard TensorRT when it imports, else TensorRT-RTX), with
    Polygraphy switched to it; raises TensorRTUnavailableError (exit 5) when neither (or Polygraphy)
    is installed and loadable, or the library is too old."""
    return find_tensorrt()


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
    library: TrtLibrary | None = None,
) -> Fp16Report:
    """Build ``model`` with TensorRT (or TensorRT-RTX) in the mode ``choose_build`` picks, run it on
    ``feeds`` and compare every output with ``reference`` (default: the model's own FP32 outputs).

    ``model_path``: the model on disk (TensorRT's parser reads external data beside it); without
    it the model is written to a temporary folder. TensorRT cannot say *where* a tensor went bad
    without marking outputs, which changes the build, so ``first_failures`` stays empty. When the
    engine builds but cannot run here, the report has no outputs, ``passed`` is False and
    ``not_verified`` says why.
    """
    library = library or require_tensorrt()
    start = time.perf_counter()
    plan = PrecisionPlan.from_model(model) if plan is None else plan
    choice = choose_build(library.version, model_has_fp16=has_fp16_tensors(model), pinned=len(plan),
                          library=library.module)
    logger.info("%s: %s", library.label, choice.reason)
    typed = _typed_feeds(model, feeds)
    shapes = profile_shapes(model, typed)
    with tempfile.TemporaryDirectory() as tmp:
        if model_path is None:
            from onnx_fp16_rewrite.io.model_io import save_model

            model_path = str(save_model(model, Path(tmp) / "model.onnx"))
        built = build_engine(model_path, fp16_flag=choice.fp16_flag, strongly_typed=choice.strongly_typed_flag,
                             plan=plan if choice.layer_precisions else None, shapes=shapes)
    fp16_layers, fp32_layers = count_layers(built.layers, choice.mode, built.mapping.fp32)
    typing = "strongly typed" if choice.mode != "weak" else "weakly typed, FP16 flag"
    notes = [f"{library.label}: {choice.reason}",
             f"parsed: ok ({built.parse_seconds:.2f} s), built: ok ({typing}, {len(built.layers)} layers, "
             f"{built.build_seconds:.2f} s)",
             "node counts are TensorRT layers"]
    if built.mapping.unmatched:
        notes.append(f"{len(built.mapping.unmatched)} pinned node(s) name no TensorRT layer and may run in FP16: "
                     + ", ".join(built.mapping.unmatched[:5]) + (" ..." if len(built.mapping.unmatched) > 5 else ""))
    report = Fp16Report(
        mode=choice.mode, strict_cumsum=False, fp16_nodes=fp16_layers, fp32_nodes=fp32_layers, outputs=[],
        first_failures=[], failing_tensors=0, rel_l2_tolerance=rel_l2_tolerance, passed=False,
        seconds=0.0, notes=notes,
    )
    try:
        runs = run_engine(built.engine, typed)
    except EngineNotRunnable as exc:
        report.not_verified = f"the engine could not be run here: {exc.reason}"
        report.notes.append(report.not_verified)
        report.seconds = round(time.perf_counter() - start, 3)
        logger.info("%s: built, not run: %s", library.label, exc.reason)
        return report
    if reference is None:
        reference = reference_outputs(model, feeds)
    report.outputs = [
        compare_output(o.name, [r[o.name] for r in runs], [ref[o.name] for ref in reference], rel_l2_tolerance)
        for o in model.graph.output
    ]
    report.passed = all(o.ok for o in report.outputs)
    if not report.passed:
        report.notes.append("TensorRT does not say where a tensor went bad: run check (CPU emulation) to locate it")
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _typed_feeds(model: onnx.ModelProto, feeds: Sequence[Feed]) -> list[Feed]:
    """Feeds cast to the model's input types (a mixed model takes FLOAT16 inputs; the engine checks)."""
    types = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return [{k: np.asarray(v).astype(types.get(k, np.asarray(v).dtype)) for k, v in f.items()} for f in feeds]
