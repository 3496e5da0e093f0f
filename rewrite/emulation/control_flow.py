"""FP16 emulation inside If / Loop / Scan bodies, like the main graph.

Each body node is treated as a main-graph node would be: its float outputs are rounded through
FP16 where it runs in FP16, an FP16 node's float inputs are rounded on the edge (weakly typed
builds), and its statistics (max, min, sum; with an FP32 shadow also the squared error against an
FP32 copy of the body node and the copy's range) are reduced inside the body. The scalars leave
the body as extra body outputs:

- If: each branch outputs its own statistics and zeros for the other branch's (both branches must
  have the same outputs), so the branch not taken reports nothing;
- Loop / Scan: as extra scan outputs (one value per iteration), reduced after the node.

A body node is FP32 when the plan pins it or any control-flow node around it (pinning an If pins
its branches). In an FP32 shadow, body inputs (loop-carried values, scan slices) are their own
shadow: the error measured in a Loop body is the error born in one iteration.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fp16_rewrite.emit.schema_types import fixed_type_inputs
from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.emulation.fp16_graph_edits import SHADOW, round_nodes, shadow_node, subgraphs

_FLOAT, _FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
_HANDLED = ("If", "Loop", "Scan")
# statistic -> how per-iteration values combine after a Loop/Scan
_COMBINE = {"max": "ReduceMax", "min": "ReduceMin", "sum": "ReduceSum", "err": "ReduceSum", "ref": "ReduceSum",
            "fmax": "ReduceMax", "fmin": "ReduceMin"}


@dataclass
class BodySite:
    """Statistics of one body tensor, as names in the graph that holds the control-flow node."""

    tensor: str
    node: str
    op: str
    fp16: bool
    outs: dict[str, str]


@dataclass
class BodyEmulation:
    """What emulating the bodies of one control-flow node added."""

    sites: list[BodySite] = field(default_factory=list)
    after: list[onnx.NodeProto] = field(default_factory=list)  # nodes to place after the node
    fp16_nodes: int = 0
    fp32_nodes: int = 0
    unhandled: list[str] = field(default_factory=list)  # why a body could not be emulated


def body_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of tensors inside subgraphs (shape inference fills their value_info)."""
    if not any(subgraphs(n) for n in model.graph.node):
        return {}
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}

    def visit(g: onnx.GraphProto, top: bool) -> None:
        if not top:
            for vi in (*g.input, *g.output, *g.value_info):
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                    types[vi.name] = vi.type.tensor_type.elem_type
            for t in g.initializer:
                types[t.name] = t.data_type
        for n in g.node:
            for sub in subgraphs(n):
                visit(sub, False)

    visit(inferred.graph, True)
    return types


class ControlFlowEmulator:
    """Emulates the bodies of control-flow nodes; one instance per emulation graph."""

    def __init__(self, types: dict[str, int], *, strong: bool, fp16_tensors: set[str], pinned: set[str],
                 round_fp16: bool, with_stats: bool, fp32_shadow: bool, opset: int,
                 weights: dict[str, onnx.TensorProto], new_inits: list[onnx.TensorProto],
                 shadow_ranges: Container[str] | None = None) -> None:
        self.types, self.strong, self.fp16_tensors, self.pinned = types, strong, fp16_tensors, pinned
        self.round_fp16, self.with_stats, self.shadow, self.opset = round_fp16, with_stats, fp32_shadow, opset
        self.weights, self.new_inits = weights, new_inits
        self.shadow_ranges = shadow_ranges  # with a shadow: tensors whose FP32 max/min to measure (None: all)
        self._rounded_weights: dict[str, str] = {}
        self._count = 0

    def emulate(self, node: onnx.NodeProto, shadowed: set[str], pinned_outer: bool = False,
                recurrent: bool = False) -> BodyEmulation:
        """Rewrite ``node``'s bodies in place. ``shadowed``: outer names that have an FP32 twin
        ``<name>__fp32``. ``pinned_outer``: an enclosing control-flow node is FP32."""
        result = BodyEmulation()
        if node.op_type not in _HANDLED or node.domain not in ("", "ai.onnx"):
            if self.round_fp16 or self.shadow:  # an all-FP32 run is right without body edits
                result.unhandled.append(f"{node.op_type} {node.name!r}: its body is not emulated "
                                        "(only If, Loop, Scan)")
            return result
        fp32 = pinned_outer or (not self.strong and node.name in self.pinned)
        recurrent = recurrent or node.op_type != "If"
        per_body = [self._body(g, shadowed, fp32, result, recurrent) for g in subgraphs(node)]
        if not (self.with_stats or self.shadow):
            return result
        if node.op_type == "If":
            self._wire_if(node, per_body, result)
        else:
            self._wire_scan_outputs(node, per_body[0], result)
        return result

    # ---- one body ----------------------------------------------------------------------------
    def _body(self, g: onnx.GraphProto, shadowed: set[str], fp32: bool, result: BodyEmulation,
              recurrent: bool) -> list[BodySite]:
        originals = [_copy(n) for n in g.node]
        produced = {o for n in g.node for o in n.output if o}
        twin = shadowed | produced  # names whose FP32 twin exists in this scope
        local_inits = {t.name for t in g.initializer}
        nodes: list[onnx.NodeProto] = []
        sites: list[BodySite] = []
        edges: dict[str, str] = {}
        for node, original in zip(list(g.node), originals):
            float_outs = [o for o in node.output if o and self.types.get(o) in (_FLOAT, _FLOAT16)]
            node_fp16 = (any(o in self.fp16_tensors for o in float_outs) if self.strong
                         else not fp32 and node.name not in self.pinned)
            if float_outs:
                result.fp16_nodes += node_fp16
                result.fp32_nodes += not node_fp16
            emulate = self.round_fp16 and node_fp16
            if emulate and not self.strong:
                fixed = fixed_type_inputs(node, self.opset)
                for k, name in enumerate(node.input):
                    if name and k not in fixed and self.types.get(name) in (_FLOAT, _FLOAT16):
                        node.input[k] = self._round_input(name, local_inits, edges, nodes)
            raw = {}
            if emulate:
                for k, out in enumerate(node.output):
                    if out in float_outs:
                        raw[out] = node.output[k] = self._name(out + "__raw")
            nested = None
            if subgraphs(node):
                nested = self.emulate(node, twin if self.shadow else set(), pinned_outer=not node_fp16,
                                      recurrent=recurrent)
                result.unhandled += nested.unhandled
                result.fp16_nodes += nested.fp16_nodes
                result.fp32_nodes += nested.fp32_nodes
            nodes.append(node)
            if nested is not None:
                nodes += nested.after
                sites += nested.sites
            for out in float_outs:
                if out in raw:
                    nodes += round_nodes(raw[out], out)
            if self.shadow:
                nodes.append(shadow_node(original, twin))
            for out in float_outs if self.with_stats or self.shadow else ():
                sites.append(self._stats(out, raw.get(out, out), original, node_fp16, nodes, recurrent))
        del g.node[:]
        g.node.extend(nodes)
        return sites

    def _round_input(self, name: str, local_inits: set[str], edges: dict[str, str],
                     nodes: list[onnx.NodeProto]) -> str:
        if name in self.weights and name not in local_inits:  # an outer weight: clamped, as engines do
            if name not in self._rounded_weights:
                self._rounded_weights[name] = self._name(name + "__r16cf")
                self.new_inits.append(weights.rounded_fp16(self.weights[name], self._rounded_weights[name]))
            return self._rounded_weights[name]
        if name not in edges:
            edges[name] = self._name(name + "__r16")
            nodes.extend(round_nodes(name, edges[name]))
        return edges[name]

    def _stats(self, out: str, raw: str, original: onnx.NodeProto, fp16: bool,
               nodes: list[onnx.NodeProto], recurrent: bool) -> BodySite:
        twin = out + SHADOW
        keep = (lambda t: t)
        if self.shadow and recurrent and self.opset >= 9:
            keep = self._born_here(twin, nodes)
        outs = {}
        wanted = []
        if self.with_stats:
            wanted += [("max", "ReduceMax", raw), ("min", "ReduceMin", raw), ("sum", "ReduceSum", keep(raw))]
        if self.shadow:
            diff = self._name(out + "__e_diff")
            nodes.append(helper.make_node("Sub", [out, twin], [diff], name=diff))
            wanted += [("err", "ReduceSumSquare", keep(diff)), ("ref", "ReduceSumSquare", keep(twin))]
            if self.shadow_ranges is None or out in self.shadow_ranges:
                masked = keep(twin)
                wanted += [("fmax", "ReduceMax", masked), ("fmin", "ReduceMin", masked)]
        for kind, op, src in wanted:
            outs[kind] = self._name(f"{out}__{kind}")
            nodes.append(helper.make_node(op, [src], [outs[kind]], name=outs[kind], keepdims=0))
        return BodySite(out, original.name, original.op_type, fp16, outs)

    def _born_here(self, twin: str, nodes: list[onnx.NodeProto]):
        """In a Loop/Scan body the twin reads the carried values as emulated (body inputs are
        their own shadow), so where the twin itself is inf/NaN the error came in with the carried
        value of an earlier iteration: such positions count 0, and what is left is the error born
        in this iteration (else the first overflow's NaN would blame every node of the body).
        Returns a function that masks a tensor of the twin's shape that way."""
        bad, zero = self._name(twin + "_bad"), self._name(twin + "_zero")
        nodes += [
            helper.make_node("IsNaN", [self._sub_self(twin, nodes)], [bad], name=bad),
            helper.make_node("Constant", [], [zero], name=zero, value=numpy_helper.from_array(np.array(0, np.float32))),
        ]

        def keep(t: str) -> str:
            masked = self._name(t + "_here")
            nodes.append(helper.make_node("Where", [bad, zero, t], [masked], name=masked))
            return masked

        return keep

    def _sub_self(self, t: str, nodes: list[onnx.NodeProto]) -> str:
        """``t - t``: 0 where ``t`` is finite, NaN where it is inf or NaN (IsInf needs opset 10)."""
        name = self._name(t + "_minus_self")
        nodes.append(helper.make_node("Sub", [t, t], [name], name=name))
        return name

    # ---- statistics out of the node ------------------------------------------------------------
    def _wire_if(self, node: onnx.NodeProto, per_body: list[list[BodySite]], result: BodyEmulation) -> None:
        branches = subgraphs(node)
        for b, sites in enumerate(per_body):
            for site in sites:
                outer = {}
                for kind, local in site.outs.items():
                    outer[kind] = self._name(f"{node.name or node.output[0]}__{local}")
                    node.output.append(outer[kind])
                    for other, g in enumerate(branches):
                        if other == b:
                            g.output.append(helper.make_tensor_value_info(local, _FLOAT, []))
                        else:  # the branch not taken reports zeros
                            zero = self._name(local + "__zero")
                            g.node.append(helper.make_node("Constant", [], [zero], name=zero,
                                                           value=numpy_helper.from_array(np.array(0, np.float32))))
                            g.output.append(helper.make_tensor_value_info(zero, _FLOAT, []))
                result.sites.append(BodySite(site.tensor, site.node, site.op, site.fp16, outer))

    def _wire_scan_outputs(self, node: onnx.NodeProto, sites: list[BodySite], result: BodyEmulation) -> None:
        body = subgraphs(node)[0]
        attrs = {a.name: a for a in node.attribute}
        for site in sites:
            outer = {}
            for kind, local in site.outs.items():
                body.output.append(helper.make_tensor_value_info(local, _FLOAT, []))
                stacked = self._name(f"{node.name or node.output[0]}__{local}")
                node.output.append(stacked)
                for key in ("scan_output_axes", "scan_output_directions"):
                    if key in attrs:
                        attrs[key].ints.append(0)
                outer[kind] = self._name(stacked + "_all")
                result.after.append(helper.make_node(_COMBINE[kind], [stacked], [outer[kind]], name=outer[kind],
                                                     keepdims=0))
            result.sites.append(BodySite(site.tensor, site.node, site.op, site.fp16, outer))

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{base}__cf{self._count}"


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(node)
    return c
