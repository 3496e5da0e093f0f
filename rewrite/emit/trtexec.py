"""trtexec command lines that carry a precision plan, with every layer name checked before it is emitted.

What the rules below rest on (read in the stored public sources; versions inferred from the
features each source has, not from release tags, which the sources do not carry):

**How the ONNX parser names layers** (onnx/onnx-tensorrt ``ImporterContext.cpp``,
``importerUtils.cpp`` / ``onnx2trt_utils.cpp``, ``onnxOpImporters.cpp``, ``ModelImporter.cpp``):

- An importer names a layer by calling ``ctx->registerLayer(layer, node)``; the base name is
  ``getNodeName(node)``: the ONNX node name, or ``"node_of_" + <first output name>`` when the node
  is unnamed. ``generateUniqueName`` gives the first layer the base name exactly; every further
  layer registered with the same base name gets ``<name>_<N>``. In the 10.x sources N is one
  counter shared by all tensor and layer names of the parse, so the suffixes cannot be predicted
  from the node alone. The old inline context (7.x/8.0 era) used a per-name count (``_1``, ``_2``).
- Nothing renames layers after a node is imported: ``parseNode`` in 10.x has no such pass, and
  ``RETURN_FIRST_OUTPUT`` does not register the layer. Helper layers (broadcast reshapes, squeezes,
  constants, loops) are either registered under ``ONNXTRT_*`` names or not registered at all. Layers
  that are never registered keep TensorRT's default name ``(Unnamed Layer* <i>) [<Type>]``
  (NVIDIA/TensorRT#681). So ``--layerPrecisions=<node>:fp32`` pins only the one layer named
  exactly after the node.
- CumSum, the case that matters here: TRT >= 10.8 imports it as one ``addCumulative`` layer that is
  registered under the node name, so the pin reaches the layer that accumulates. The loop-based
  importer (<= 10.7) builds a loop, an iterator, a recurrence and an ElementWise running sum, and
  registers none of them (``squeezeTensor`` registers only when asked). On those versions the
  CumSum node name probably names no layer at all.
- In 10.x, ``processMetadata`` also stores ``[ONNX Layer: <node name>]`` as layer metadata, which
  the engine inspector shows. That is the reliable way back from a layer to its node.

**How trtexec reads ``--layerPrecisions=spec``** (NVIDIA/TensorRT ``samples/common/sampleOptions.cpp``
and ``sampleEngines.cpp``; the same in the 2022 (8.x) and 2025 (10.x) sources):

- argv: each argument is split at its first ``'='``, so ``'='`` inside names is harmless.
- The value is split on **every** ``','``, before any quote handling, and there is no escape. A name
  containing ``','`` cannot be written.
- Each entry is then read by ``splitNameAndValue``. If the entry contains ``"'"``, it must contain
  exactly two (otherwise trtexec throws). The name is then the text before the first quote plus the
  quoted text, and the value is everything after the closing quote minus its first character. With
  no quote, the name is everything before the **last** ``':'``. Afterwards every ``"'"`` is removed
  from the name. So ``'a:b':fp32`` works, ``a:b:fp32`` works too (the last-colon rule; this is also
  what the oldest sources do), and a name containing ``"'"`` cannot be written.
- Matching (``setLayerPrecisions``): an exact layer-name match wins. In 10.x an entry containing
  ``'*'`` is otherwise a pattern with one wildcard (``matchStringWithOneWildcard``). In older (8.x)
  sources only the entry ``"*"`` is special (it applies to all layers). Entries that match no layer are ignored
  without a message.

What this module therefore emits: ``<name>:fp32`` entries, never quoted (quotes add nothing,
and the last-colon rule is the behaviour every version shares), sorted by name, joined by ``','``.
It refuses (raises ``LayerNameError``, listing every offending name with the reason) names that
are empty or that contain ``','``, ``"'"``, ``'*'`` or a NUL byte. ``unexpressible_layer_names``
returns the same reasons as a list of warnings, without raising. Every emitted spec is parsed back
with ``parse_layer_precision_spec`` (trtexec's rules, re-implemented) before it is returned.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import onnx

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

__all__ = [
    "TRTEXEC_PRECISIONS",
    "LayerNameError",
    "dynamic_inputs",
    "format_command",
    "layer_name_problem",
    "layer_precision_spec",
    "parse_layer_precision_spec",
    "shape_flags",
    "store_validated_shapes",
    "validated_shapes",
    "trtexec_command",
    "unexpressible_layer_names",
]

logger = logging.getLogger(__name__)

Mode = Literal["weak", "strong"]
#: (min, opt, max) shape of one dynamic input.
ShapeProfile = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

#: Precision words trtexec's ``stringToValue<DataType>`` accepts (2025 source; 8.x had fewer).
TRTEXEC_PRECISIONS = frozenset({"fp32", "fp16", "bf16", "int8", "fp8", "int32", "int64", "bool", "uint8", "int4"})

# Flags this module writes itself; a second value in ``extra`` would leave trtexec with two
# values for one option (it keeps an arbitrary one), so that is refused.
_OWN_FLAGS = ("--onnx", "--saveEngine")
_SHAPE_FLAGS = ("--shapes", "--minShapes", "--optShapes", "--maxShapes")  # written here when ``shapes`` is given
_WEAK_FLAGS = ("--fp16", "--precisionConstraints", "--layerPrecisions")
# Flags that contradict the other mode. Under strong typing trtexec drops --fp16 with a warning,
# rejects --best, and TensorRT rejects per-layer precisions and output types.
_NOT_WITH_STRONG = (*_WEAK_FLAGS, "--bf16", "--int8", "--best", "--layerOutputTypes")
_NOT_WITH_WEAK = ("--stronglyTyped",)


class LayerNameError(BadInputError):
    """Some pinned node names cannot be written into ``--layerPrecisions``; ``problems`` lists them."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"{len(self.problems)} pinned node name(s) cannot be passed to trtexec --layerPrecisions: "
            + "; ".join(self.problems)
            + " (rename those nodes, or build strongly typed from a mixed-precision model)"
        )


def layer_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be written as a ``--layerPrecisions`` entry, or None when it can."""
    if name == "":
        return ("empty name: the ONNX parser names an unnamed node's layer node_of_<first output>; "
                "give the node a name")
    if "," in name:
        return "contains ',': trtexec splits the whole list on every ',' and has no escape"
    if "'" in name:
        return "contains \"'\": trtexec reads ' as quote marks (two per entry) and strips them from names"
    if "*" in name:
        return "contains '*': trtexec 10.x reads it as a wildcard, so other layers would be pinned too"
    if "\x00" in name:
        return "contains a NUL byte, which no argv element can carry"
    return None


def unexpressible_layer_names(plan: PrecisionPlan | Iterable[str]) -> list[str]:
    """Warnings (``"<name>: <reason>"``, sorted by name) for the names trtexec cannot be given."""
    names = plan.fp32_nodes if isinstance(plan, PrecisionPlan) else plan
    problems = []
    for name in sorted(names):
        reason = layer_name_problem(name)
        if reason is not None:
            problems.append(f"{name!r}: {reason}")
    return problems


def parse_layer_precision_spec(spec: str) -> dict[str, str]:
    """Read a ``--layerPrecisions`` value the way trtexec does (``sampleOptions.cpp``).

    Returns ``{layer name: precision}``. A later entry overrides an earlier one, as in trtexec.
    Raises ValueError where trtexec throws: an entry with one or three quotes, an unknown precision,
    an empty entry.
    """
    result: dict[str, str] = {}
    if spec == "":
        return result
    for entry in spec.split(","):
        if entry == "":
            raise ValueError("empty entry (two ',' in a row, or a trailing ',')")
        quoted = entry.split("'")
        if len(quoted) != 1:
            if len(quoted) != 3:
                raise ValueError(f"{entry!r}: expected exactly 2 single quotes, found {len(quoted) - 1}")
            name, value = quoted[0] + quoted[1], quoted[2][1:]
        else:
            name, sep, value = entry.rpartition(":")
            if not sep:
                name, value = entry, entry  # trtexec takes the whole entry as both; the value check fails
        if value not in TRTEXEC_PRECISIONS:
            raise ValueError(f"{entry!r}: invalid precision {value!r}")
        result[name.replace("'", "")] = value
    return result


def layer_precision_spec(plan: PrecisionPlan, precision: str = "fp32") -> str:
    """The ``--layerPrecisions`` value pinning every plan node to ``precision``, sorted by name.

    Raises LayerNameError (listing every offending name) rather than emit an entry trtexec would
    misread. Returns "" for an empty plan.
    """
    if precision not in TRTEXEC_PRECISIONS:
        raise BadInputError(f"unknown trtexec precision {precision!r}; one of {sorted(TRTEXEC_PRECISIONS)}")
    problems = unexpressible_layer_names(plan)
    if problems:
        raise LayerNameError(problems)
    names = sorted(plan.fp32_nodes)
    spec = ",".join(f"{name}:{precision}" for name in names)
    # Self-check: what trtexec will read back must be exactly what we meant.
    if parse_layer_precision_spec(spec) != {name: precision for name in names}:
        raise AssertionError(f"internal error: --layerPrecisions spec does not round-trip: {spec!r}")
    return spec


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def trtexec_command(
    model_path: str,
    plan: PrecisionPlan,
    *,
    mode: Mode,
    engine_path: str | None = None,
    shapes: Mapping[str, ShapeProfile] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The trtexec argv that builds ``model_path`` under ``plan``.

    ``shapes``: ``{input: (min, opt, max)}`` for the dynamic inputs, the shapes that were validated
    (without them trtexec sets every dynamic dim to 1). One shape per input gives ``--shapes``; a
    range gives ``--minShapes/--optShapes/--maxShapes``.

    ``weak``: ``--fp16 --precisionConstraints=obey --layerPrecisions=<plan>:fp32`` (the last omitted
    for an empty plan). This is TensorRT 10.x weak typing, deprecated in 10.12 and removed in 11.0.
    ``strong``: ``--stronglyTyped``, for a model whose precisions are already in the graph
    (``--emit mixed``). It has no ``--fp16`` and no layer precisions: trtexec disables FP16 under
    strong typing, and TensorRT 11 has no FP16 flag at all.
    Raises LayerNameError for names trtexec cannot be given (weak mode), and BadInputError for an
    empty path, an ``extra`` flag that repeats one this function writes, or one that contradicts
    the mode.
    """
    if not model_path:
        raise BadInputError("trtexec needs a model path")
    if engine_path == "":
        raise BadInputError("engine path is empty")
    if mode not in ("weak", "strong"):
        raise BadInputError(f"mode must be 'weak' or 'strong', not {mode!r}")
    extra = list(extra)
    for arg in extra:
        flag = _flag_name(arg)
        if flag in _OWN_FLAGS or (mode == "weak" and flag in _WEAK_FLAGS) or (shapes and flag in _SHAPE_FLAGS):
            raise BadInputError(f"{flag} is written by trtexec_command itself; do not pass it in extra")
        if mode == "strong" and flag in _NOT_WITH_STRONG:
            raise BadInputError(f"{flag} is a weak-typing option; it contradicts --stronglyTyped")
        if mode == "weak" and flag in _NOT_WITH_WEAK:
            raise BadInputError(f"{flag} contradicts mode='weak'; use mode='strong'")

    argv = ["trtexec", f"--onnx={model_path}"]
    if mode == "weak":
        argv += ["--fp16", "--precisionConstraints=obey"]
        if len(plan):
            argv.append(f"--layerPrecisions={layer_precision_spec(plan)}")
    else:
        argv.append("--stronglyTyped")
        if len(plan):
            logger.debug("strong mode: %d pinned node(s) must already be FP32 in the graph (Casts)", len(plan))
    argv += shape_flags(shapes or {})
    if engine_path is not None:
        argv.append(f"--saveEngine={engine_path}")
    argv += extra
    return argv


def shape_flags(shapes: Mapping[str, ShapeProfile]) -> list[str]:
    """``--shapes=x:1x3x64x64,...`` when every input has one shape, else min/opt/max flags.

    trtexec reads these lists like ``--layerPrecisions`` (split on every ``','``, name before the
    last ``':'``), so names with ``','`` or ``"'"`` are refused."""
    if not shapes:
        return []
    bad = [f"{name!r}" for name in shapes if not name or "," in name or "'" in name or "\x00" in name]
    if bad:
        raise BadInputError(f"input name(s) {', '.join(bad)} cannot be written in trtexec --shapes "
                            "(trtexec splits on ',' and reads ' as quotes): rename those inputs")
    names = sorted(shapes)

    def spec(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[name][which])}" for name in names)

    if all(shapes[n][0] == shapes[n][1] == shapes[n][2] for n in names):
        return [f"--shapes={spec(1)}"]
    return [f"--minShapes={spec(0)}", f"--optShapes={spec(1)}", f"--maxShapes={spec(2)}"]


#: metadata_props key under which ``fix`` stores the shapes it validated (``onnx-rewrite trtexec`` reads them).
SHAPES_KEY = "onnx_fp16_rewrite.validated_shapes"


def store_validated_shapes(model: onnx.ModelProto, shapes: Mapping[str, ShapeProfile]) -> None:
    """Record ``{input: (min, opt, max)}`` in the model's metadata (replacing an older entry)."""
    import json

    kept = [p for p in model.metadata_props if p.key != SHAPES_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if shapes:
        model.metadata_props.add(key=SHAPES_KEY, value=json.dumps({k: [list(s) for s in v] for k, v in shapes.items()}))


def validated_shapes(model: onnx.ModelProto) -> dict[str, ShapeProfile]:
    """The shapes ``store_validated_shapes`` recorded, for inputs the model still has; {} when none."""
    import json

    names = {vi.name for vi in model.graph.input}
    for prop in model.metadata_props:
        if prop.key == SHAPES_KEY:
            try:
                data = json.loads(prop.value)
                return {k: tuple(tuple(int(d) for d in s) for s in v) for k, v in data.items()
                        if k in names and len(v) == 3}
            except (ValueError, TypeError):
                logger.warning("ignoring unreadable %s metadata", SHAPES_KEY)
    return {}


def dynamic_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the model's real inputs with a dynamic (or unknown) dim, in graph order."""
    inits = {i.name for i in model.graph.initializer}
    return [vi.name for vi in model.graph.input if vi.name not in inits
            and any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)]


def format_command(argv: Sequence[str]) -> str:
    """One POSIX shell line for ``argv`` (``shlex.join``); ``shlex.split`` gives ``argv`` back."""
    return shlex.join(argv)
