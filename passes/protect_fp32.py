"""protect-fp32: pin overflow-prone regions to FP32 in the precision plan.

Pinning a single node is not enough: keeping a CumSum in FP32 and handing its prefix sums
straight back to FP16 overflows anyway (onnxconverter-common does exactly that and still gives
NaN). So the selected nodes are seeds of a *region* grown on measured FP32 ranges:
- forward, through every consumer of a region tensor whose absmax exceeds ``exit_absmax``,
  until values are back in range (for an integral image: after the box-sum difference and the
  divide, not at the CumSum output);
- backward, to the producer of any region input whose absmax exceeds ``exit_absmax``.
The graph itself is not changed; only the plan stored in the model is.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import FP16_MAX
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_context import PassContext
from onnx_fp16_rewrite.analysis.regions import GraphIndex, grow_region

logger = logging.getLogger(__name__)


class ProtectFp32(Pass):
    name = "protect-fp32"
    summary = "pin CumSum / name-matched / listed nodes to FP32, grown into a region until values fit FP16"

    def __init__(
        self,
        *,
        op_types: Sequence[str] = ("CumSum",),
        match: str | None = None,
        nodes: Sequence[str] = (),
        exit_absmax: float = 2048.0,
        grow: bool = True,
        pin_large_weights: bool = True,
    ) -> None:
        """``match`` is a regex searched in node names and output tensor names; ``exit_absmax``
        is the largest FP32 absmax a tensor may have to leave the FP32 region (well inside
        FP16's 65504, so downstream sums and differences keep their digits)."""
        if match is not None:
            try:
                re.compile(match)
            except re.error as exc:
                raise BadInputError(f"protect-fp32: bad --match regex {match!r}: {exc}") from None
        if not 0 < exit_absmax <= FP16_MAX:
            raise BadInputError(f"protect-fp32: exit_absmax must be in (0, {FP16_MAX:g}], got {exit_absmax}")
        self.op_types = tuple(op_types)
        self.match = match
        self.nodes = tuple(nodes)
        self.exit_absmax = float(exit_absmax)
        self.grow = grow
        self.pin_large_weights = pin_large_weights

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult(modified=False)
        seeds = self._seeds(graph, result)
        region = dict(seeds)
        if self.grow and region:
            region = grow_region(GraphIndex(ctx.model.graph), seeds, ctx.tensor_absmax(), self.exit_absmax)
        by_name = {n.name: n for n in graph.nodes}
        for name, reason in region.items():
            node = by_name[name]
            if ctx.plan.pin(name, reason):
                result.modified = True
                result.rewritten.append(Site(name, node.op, f"pinned to FP32: {reason}"))
            else:
                result.skipped.append(Site(name, node.op, "already FP32 in the plan"))
        return result

    def _seeds(self, graph: gs.Graph, result: PassResult) -> dict[str, str]:
        seeds: dict[str, str] = {}
        pattern = re.compile(self.match) if self.match else None
        names = {n.name for n in graph.nodes}
        for node in graph.nodes:
            if node.op in self.op_types:
                seeds.setdefault(node.name, f"op type {node.op}")
            if pattern and (pattern.search(node.name) or any(pattern.search(t.name) for t in node.outputs)):
                seeds.setdefault(node.name, f"name matches {self.match!r}")
            if self.pin_large_weights:
                big = [t for t in node.inputs if isinstance(t, gs.Constant) and _absmax(t) > FP16_MAX]
                if big and node.op not in ("Shape", "Reshape", "Gather", "Slice"):
                    seeds.setdefault(node.name, f"reads weight {big[0].name} beyond FP16 range")
        for name in self.nodes:
            if name in names:
                seeds.setdefault(name, "listed by name")
            else:
                result.skipped.append(Site(name, "?", "no node with this name"))
        if pattern and not any("matches" in r for r in seeds.values()):
            result.skipped.append(Site(self.match or "", "-", "the --match pattern matched no node"))
        if not seeds:
            result.skipped.append(Site("-", "-", "no node selected (op types, pattern, names)"))
        return seeds


def _absmax(t: gs.Constant) -> float:
    values = np.asarray(t.values)
    if values.size == 0 or not np.issubdtype(values.dtype, np.floating):
        return 0.0
    return float(np.abs(values).max())
