"""Known TensorRT pitfalls, found by reading the ONNX graph only (no TensorRT needed).

Each finding names the nodes, the TensorRT versions affected as far as the sources say, and the
issue it comes from, so ``check`` can warn before anyone builds an engine. Given the installed
TensorRT version (``check --backend trt``) only the pitfalls of that version are kept.

Sources (issue threads and the onnx-tensorrt importer, summarised in the project's TensorRT notes):

- ``cumsum-axes``: several CumSums on different axes compute "as if … the same axis" since 10.8,
  where the parser switched CumSum to ``ICumulativeLayer``; still open at 10.11
  (NVIDIA/TensorRT#4551, onnx/onnx-tensorrt#1034). NAFNet's integral image is exactly this.
- ``cumsum-reverse``: ``reverse=1`` gives the forward result (NVIDIA/TensorRT#4513, open; the
  report gives no version range, so it is reported for every version).
- ``cumsum-axis-not-constant``: the loop-based importer (<= 10.7) needs the axis as weights
  ("Axis input for CumSum must be an initializer!", NVIDIA/TensorRT#3425 on 8.6); 10.8 added
  dynamic axes. An initializer or a ``Constant`` node (imported as weights) is fine.
- ``cumsum-pinned-weak``: on <= 10.7 a CumSum is an ``ILoop`` whose layers are not named after the
  node, so a weakly typed build cannot pin it by name (see ``onnx_fp16_rewrite.emit.trtexec``).
- ``layer-name``: pinned node names that ``trtexec --layerPrecisions`` cannot carry.

Only the top-level graph is inspected (CumSums inside If/Loop bodies are not seen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.io.ort_runner import infer_types
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emit.trtexec import layer_name_problem, unexpressible_layer_names

__all__ = ["Pitfall", "find_pitfalls"]

Version = tuple[int, int]

# Weak typing (FP16 flag, layer precisions) exists up to TensorRT 10.x.
_WEAK_UNTIL: Version = (11, 0)
_LOOP_CUMSUM_UNTIL: Version = (10, 8)


@dataclass(frozen=True)
class Pitfall:
    """One finding. Affected versions: ``since <= version < until`` (None: unbounded)."""

    code: str
    text: str
    nodes: tuple[str, ...]
    refs: tuple[str, ...]
    since: Version | None = None
    until: Version | None = None

    def affects(self, version: Version) -> bool:
        return (self.since is None or version >= self.since) and (self.until is None or version < self.until)

    @property
    def versions(self) -> str:
        if self.since and self.until:
            return f"TensorRT {_v(self.since)} to < {_v(self.until)}"
        if self.since:
            return f"TensorRT >= {_v(self.since)}"
        if self.until:
            return f"TensorRT < {_v(self.until)}"
        return "TensorRT (all versions)"

    @property
    def message(self) -> str:
        refs = f" ({', '.join(self.refs)})" if self.refs else ""
        return f"{self.versions}: {self.text}{refs}"


def _v(version: Version) -> str:
    return f"{version[0]}.{version[1]}"


def find_pitfalls(
    model: onnx.ModelProto, plan: PrecisionPlan | None = None, *, trt_version: Version | None = None
) -> list[Pitfall]:
    """The pitfalls ``model`` walks into, in a fixed order; only those affecting ``trt_version``
    when it is given. ``plan`` defaults to the plan stored in the model."""
    plan = PrecisionPlan.from_model(model) if plan is None else plan
    cumsums = [n for n in model.graph.node if n.op_type == "CumSum" and n.domain in ("", "ai.onnx")]
    if not cumsums and not len(plan):
        return []
    types, ranks = infer_types(model)
    # The emulation's rule: a model with FLOAT16 tensors is built strongly typed, where layer
    # precisions do not exist; the weak-typing pitfalls only concern FP32 models.
    weak = TensorProto.FLOAT16 not in types.values()
    found = _cumsum_pitfalls(model.graph, cumsums, ranks)
    if weak:
        pinned = [n.name for n in cumsums if plan.is_fp32(n.name)]
        if pinned:
            found.append(Pitfall(
                "cumsum-pinned-weak",
                f"{len(pinned)} pinned CumSum node(s) are built as unnamed loops that layer precisions cannot reach, "
                "so their running sums may stay FP16; build strongly typed (fix --emit mixed)",
                tuple(pinned), ("onnx/onnx-tensorrt CumSum importer",), until=_LOOP_CUMSUM_UNTIL))
        bad = sorted(n for n in plan.fp32_nodes if layer_name_problem(n) is not None)
        if bad:
            found.append(Pitfall(
                "layer-name",
                f"{len(bad)} pinned node name(s) cannot be passed to trtexec --layerPrecisions: "
                + "; ".join(unexpressible_layer_names(bad)) + " (rename the nodes, or build strongly typed)",
                tuple(bad), ("trtexec sampleOptions.cpp",), until=_WEAK_UNTIL))
    if trt_version is not None:
        found = [p for p in found if p.affects(trt_version)]
    return found


def _cumsum_pitfalls(graph: onnx.GraphProto, cumsums: list[onnx.NodeProto], ranks: dict[str, int]) -> list[Pitfall]:
    found = []
    constants = _constants(graph)
    axes: dict[str, int] = {}
    dynamic = []
    for node in cumsums:
        axis = constants.get(node.input[1]) if len(node.input) > 1 else None
        if axis is None or axis.size != 1:
            dynamic.append(node.name)
            continue
        value = int(axis.reshape(-1)[0])
        rank = ranks.get(node.input[0])
        axes[node.name] = value % rank if rank else value
    if len(set(axes.values())) > 1:
        listed = ", ".join(f"{name} (axis {axes[name]})" for name in list(axes)[:4]) + (" ..." if len(axes) > 4 else "")
        found.append(Pitfall(
            "cumsum-axes",
            f"{len(axes)} CumSum nodes on {len(set(axes.values()))} different axes may all be computed along one "
            f"axis: {listed}; check --backend trt compares the engine with ONNX Runtime",
            tuple(axes), ("NVIDIA/TensorRT#4551", "onnx/onnx-tensorrt#1034"), since=_LOOP_CUMSUM_UNTIL))
    reverse = [n.name for n in cumsums if any(a.name == "reverse" and a.i == 1 for a in n.attribute)]
    if reverse:
        found.append(Pitfall(
            "cumsum-reverse",
            f"{len(reverse)} CumSum node(s) with reverse=1 were reported to give the forward result: "
            + ", ".join(reverse[:4]), tuple(reverse), ("NVIDIA/TensorRT#4513",)))
    if dynamic:
        found.append(Pitfall(
            "cumsum-axis-not-constant",
            f"{len(dynamic)} CumSum node(s) take a computed axis, which the parser rejects (axis must be an "
            "initializer); fold constants first (polygraphy surgeon sanitize --fold-constants): "
            + ", ".join(dynamic[:4]), tuple(dynamic), ("NVIDIA/TensorRT#3425",), until=_LOOP_CUMSUM_UNTIL))
    return found


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Values of initializers and Constant-node outputs (the parser imports both as weights)."""
    values = {init.name: weights.tensor_array(init) for init in graph.initializer}  # large: read-only maps
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_int", "value_ints"):
                values[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr))
    return values
