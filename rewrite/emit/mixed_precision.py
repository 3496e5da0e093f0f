"""Turn an FP32 model plus a PrecisionPlan into a strongly typed FP16/FP32 model.

Everything runs in FP16 except the FP32 islands named by the plan (and the nodes this converter
cannot convert). The output is what ``trtexec --stronglyTyped`` / TensorRT 11 builds exactly as
written. Two lessons from existing converters shape the design (notes/mixed-precision-tools.md):
casts are inserted per *tensor*, never per consumer, so a fan-out tensor leaving an FP32 island is
never rounded to FP16 and back; and which inputs convert comes from each op's schema.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.emit.graph_scopes import (
    value_types as _value_types,
    convertible as _convertible,
    subgraphs as _subgraphs,
    copy as _copy,
    cast as _cast,
    all_node_names as _all_node_names,
    all_names as _all_names,
    outer_refs as _outer_refs,
    rebuild_types as _rebuild_types,
)
from onnx_fp16_rewrite.emit.index_arithmetic import index_arithmetic_nodes
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.fp16_limits import FP16_MAX

__all__ = ["FP16_MAX", "MixedPrecisionReport", "to_mixed_precision"]

logger = logging.getLogger(__name__)

FP32, FP16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
_SUFFIX = {FP16: "fp16", FP32: "fp32"}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_FORCED = "converter: "  # prefix of the reasons this module gives (plan reasons are kept as is)


@dataclass
class MixedPrecisionReport:
    """What the conversion did. Constant-node values are listed with the initializers under the
    tensor they produce; nodes without a name are listed as ``<op>#<index>``."""

    keep_io_types: bool
    fp16_node_count: int = 0
    fp32_node_count: int = 0
    fp16_nodes: list[str] = field(default_factory=list)
    fp32_nodes: dict[str, str] = field(default_factory=dict)  # node -> reason
    forced_fp32_nodes: list[str] = field(default_factory=list)  # FP32 by the converter, not the plan
    non_float_nodes: int = 0
    casts_inserted: int = 0
    casts: list[str] = field(default_factory=list)
    initializers_converted: list[str] = field(default_factory=list)
    initializers_clamped: dict[str, int] = field(default_factory=dict)  # name -> values clamped
    initializers_duplicated: list[str] = field(default_factory=list)
    plan_nodes_missing: list[str] = field(default_factory=list)


def to_mixed_precision(
    model: onnx.ModelProto, plan: PrecisionPlan, *, keep_io_types: bool = False
) -> tuple[onnx.ModelProto, MixedPrecisionReport]:
    """Return a mixed FP16/FP32 copy of the FP32 ``model`` (left untouched) and a report.

    FLOAT graph inputs/outputs become FLOAT16 unless ``keep_io_types``; their names never change.
    Raises PassFailedError when the result fails strict shape inference or the full checker.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opsets = {(i.domain or ""): i.version for i in out.opset_import}
    types, nontensor, infos = _value_types(out)
    conv = _Converter(out.graph, plan, keep_io_types, opset=opsets.get("", opsets.get("ai.onnx", 1)), types=types,
                      nontensor=nontensor, value_info=infos, used=_all_names(out.graph),
                      report=MixedPrecisionReport(keep_io_types=keep_io_types))
    conv.decide()
    conv.materialize()
    names = _all_node_names(out.graph)
    missing = conv.report.plan_nodes_missing = sorted(k for k in plan.fp32_nodes if k not in names)
    if missing:
        logger.warning("plan pins %d node(s) not in the model: %s", len(missing), missing[:5])
    if out.ir_version < 4:  # IR 3: every initializer must also be a graph input
        listed = {i.name for i in out.graph.input}
        out.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                               for t in out.graph.initializer if t.name not in listed)
    out = _rebuild_types(out, conv.custom_value_info)
    plan.store_in(out)
    r = conv.report
    r.fp16_node_count, r.fp32_node_count, r.casts_inserted = len(r.fp16_nodes), len(r.fp32_nodes), len(r.casts)
    logger.info("mixed precision: %d FP16 nodes, %d FP32 nodes (%d forced), %d casts",
                r.fp16_node_count, r.fp32_node_count, len(r.forced_fp32_nodes), r.casts_inserted)
    return out, r


class _Converter:
    """Converts one graph. An If/Loop/Scan body is converted by a converter of its own that keeps
    the body's inputs and outputs FP32 (the control-flow node's interface stays FP32, so both
    branches and the loop-carried values agree); the types a body reads outer tensors in are
    asked of the enclosing graph, which casts there, once per (tensor, type), as for its own
    readers: an FP16 tensor reaches FP16 body code uncast."""

    def __init__(self, graph: onnx.GraphProto, plan: PrecisionPlan, keep_io: bool, *, opset: int,
                 types: dict[str, int], nontensor: set[str], value_info: dict, used: set[str],
                 report: MixedPrecisionReport, outer: dict[str, int | None] | None = None,
                 pinned_reason: str | None = None) -> None:
        self.g, self.plan = graph, plan
        self.report = report
        self.io_type = FP32 if keep_io else FP16
        self.opset = opset
        self.types, self.nontensor, self.value_info = types, nontensor, value_info
        self.inputs = [i.name for i in self.g.input]
        self.outer_home = dict(outer or {})  # outer names -> their type there (None: a constant)
        self.outputs = {o.name for o in self.g.output}
        self.inits = {t.name: k for k, t in enumerate(self.g.initializer) if t.name not in self.inputs}
        self.used = used  # one namespace for new tensors and nodes alike, bodies included
        self.pinned_reason = pinned_reason  # set inside a pinned control-flow node: all FP32
        self.schemas: dict[str, onnx.defs.OpSchema | None] = {}
        self.prec: dict[int, int] = {}  # node index -> FP16/FP32 (nodes with float tensors)
        self.home: dict[str, int] = {}  # float tensor -> the type its producer writes
        self.need: dict[int, dict[int, int]] = {}  # node -> {input slot: type it reads}
        self.wanted: dict[str, list[int]] = {}  # float tensor -> types read, first use first
        self.children: dict[int, list[_Converter]] = {}  # control-flow node -> its bodies' converters
        self.flex_const: dict[str, int] = {}  # float Constant-node output -> node index
        self.custom_outputs: set[str] = set()  # of schema-less nodes: inference can't type them
        self.custom_value_info: list[onnx.ValueInfoProto] = []
        self.index_nodes: dict[int, str] = {}  # node index -> why it is index arithmetic

    # ---- decisions -------------------------------------------------------------------------
    def decide(self) -> None:
        for name in self.inputs:
            if self.types.get(name) == FP32:
                self.home[name] = self.io_type
        self.index_nodes = index_arithmetic_nodes(self.g, self.types)
        for sparse in self.g.sparse_initializer:  # rare: kept FP32, cast where FP16 reads it
            self.home[sparse.values.name] = FP32
        for i, node in enumerate(self.g.node):
            if _is_flexible_constant(node, self.plan):
                self.flex_const[node.output[0]] = i  # stored like an initializer, see below
            else:
                self._decide_node(i, node)
        for o in self.g.output:  # a body output read from outside: the interface wants it FP32
            if o.name in self.outer_home and self.types.get(o.name) == FP32:
                self._want(o.name, FP32)

    def _home_of(self, t: str) -> int | None:
        return self.home.get(t, self.outer_home.get(t))

    def _decide_bodies(self, i: int, node: onnx.NodeProto) -> None:
        pinned = self.pinned_reason
        if pinned is None and node.name and self.plan.is_fp32(node.name):
            pinned = f"inside {node.name} (FP32 by the plan): {self.plan.fp32_nodes[node.name]}"
        for sub in _subgraphs(node):
            refs = _outer_refs([sub])
            child = _Converter(sub, self.plan, True, opset=self.opset, types=self.types, nontensor=self.nontensor,
                               value_info=self.value_info, used=self.used, report=self.report,
                               outer={t: self._home_of(t) for t in refs}, pinned_reason=pinned)
            child.decide()
            for t in refs:  # cast here, once, whatever the body reads
                for dtype in child.wanted.get(t, []):
                    self._want(t, dtype)
            self.children.setdefault(i, []).append(child)

    def _decide_node(self, i: int, node: onnx.NodeProto) -> None:
        if _subgraphs(node):
            self._decide_bodies(i, node)
        fin = [s for s, t in enumerate(node.input) if t and self.types.get(t) == FP32]
        fout = [s for s, t in enumerate(node.output) if t and self.types.get(t) == FP32]
        unknown = [t for t in (*node.input, *node.output) if t and t not in self.types and t not in self.nontensor]
        if not fin and not fout and not unknown:
            self.report.non_float_nodes += 1
            return
        schema = self._schema(node)
        conv_in = {s: _convertible(schema, s, True) for s in fin}
        conv_out = {s: _convertible(schema, s, False) for s in fout}
        if self.pinned_reason:
            reason = self.pinned_reason
        elif node.name and self.plan.is_fp32(node.name):
            reason = self.plan.fp32_nodes[node.name]
        elif i in self.index_nodes:  # costs nothing: FP16 there moves indices, not data
            reason = _FORCED + self.index_nodes[i]
        else:
            reason = self._forced_reason(node, schema, unknown, conv_in, conv_out)
        if reason is not None:
            prec = FP32
        elif fout:
            prec = FP16
        else:  # no float output (Shape, Equal, ...): follow the first float input, no cast needed
            homes = [self._home_of(node.input[s]) for s in fin if conv_in[s] and self._home_of(node.input[s])]
            prec = homes[0] if homes else FP16
        self.prec[i] = prec
        label = _label(node, i)
        if prec == FP16:
            self.report.fp16_nodes.append(label)
        else:
            self.report.fp32_nodes[label] = reason or _FORCED + "follows its FP32 input"
            if reason and reason.startswith(_FORCED):
                self.report.forced_fp32_nodes.append(label)
        for s in fin:  # fixed-type inputs (Resize scales) and unconvertible type vars stay FLOAT
            self.need.setdefault(i, {})[s] = prec if conv_in[s] else FP32
            self._want(node.input[s], self.need[i][s])
        for s in fout:
            self.home[node.output[s]] = prec if conv_out[s] else FP32
        if schema is None:
            self.custom_outputs.update(node.output)

    def _forced_reason(self, node, schema, unknown, conv_in, conv_out) -> str | None:
        if _subgraphs(node):
            return _FORCED + f"{node.op_type}: its inputs and outputs stay FP32, its bodies are converted"
        if node.domain not in _DEFAULT_DOMAINS:
            return _FORCED + f"custom domain '{node.domain}' (no schema)"
        if schema is None:
            return _FORCED + f"no schema for {node.op_type} in opset {self.opset}"
        if any(t in self.nontensor for t in (*node.input, *node.output) if t):
            return _FORCED + "reads or writes a sequence/optional/map value"
        if unknown:
            return _FORCED + f"type of '{unknown[0]}' unknown after shape inference"
        if "dtype" in schema.attributes:  # RandomNormal, EyeLike, ...: output type is an attribute
            return _FORCED + f"{node.op_type} has a dtype attribute"
        if not any(conv_in.values()) and not any(conv_out.values()):
            return _FORCED + f"{node.op_type}-{schema.since_version} has no float16 in its schema"
        return None

    def _schema(self, node: onnx.NodeProto) -> onnx.defs.OpSchema | None:
        if node.domain not in _DEFAULT_DOMAINS:
            return None
        if node.op_type not in self.schemas:
            try:
                self.schemas[node.op_type] = onnx.defs.get_schema(node.op_type, self.opset, "")
            except onnx.defs.SchemaError:
                self.schemas[node.op_type] = None
        return self.schemas[node.op_type]

    def _want(self, tensor: str, dtype: int) -> None:
        wants = self.wanted.setdefault(tensor, [])
        if dtype not in wants:
            wants.append(dtype)

    # ---- rewriting -------------------------------------------------------------------------
    def materialize(self, outer_alias: dict[str, dict[int, str]] | None = None) -> None:
        # tensor -> {type: name holding it in that type}; outer names as the enclosing graph has them
        alias: dict[str, dict[int, str]] = dict(outer_alias or {})
        casts: dict[object, list[onnx.NodeProto]] = {}  # producer (node index or "inputs") -> casts
        producer = {t: i for i, n in enumerate(self.g.node) for t in n.output if t}
        renamed: dict[str, str] = {}
        for t, home in self.home.items():
            alias[t] = {home: t}
            group = casts.setdefault(producer.get(t, "inputs"), [])
            out_type = self.io_type if t in self.outputs else home
            if out_type != home:  # graph outputs keep their names: the producer's output is renamed
                renamed[t] = alias[t][home] = self._unique(f"{t}_{_SUFFIX[home]}")
                alias[t][out_type] = t
                group.append(_cast(renamed[t], t, out_type, self._unique(f"{t}/cast_to_{_SUFFIX[out_type]}")))
            for dtype in self.wanted.get(t, []):
                if dtype not in alias[t]:  # one cast per (tensor, type), shared by all readers
                    name = alias[t][dtype] = self._unique(f"{t}/cast_to_{_SUFFIX[dtype]}")
                    group.append(_cast(alias[t][home], name, dtype, name))
        extra: dict[int, onnx.NodeProto] = {}  # node index -> duplicated Constant placed after it
        for t in [*self.inits, *self.flex_const]:
            if t in self.wanted or t in self.outputs:
                alias[t] = self._place_constant(t, extra)
        for init in self.g.initializer:  # old style: an initializer that is also an input follows it
            if self.home.get(init.name) == FP16:
                init.CopyFrom(weights.make_tensor(self._fp16(weights.tensor_array(init), init.name), init.name))
                self.report.initializers_converted.append(init.name)

        new_nodes = list(casts.get("inputs", []))
        for i, node in enumerate(self.g.node):
            self._fix_attributes(i, node)
            for s, dtype in self.need.get(i, {}).items():
                node.input[s] = alias[node.input[s]][dtype]
            for s, t in enumerate(node.output):
                node.output[s] = renamed.get(t, t)
                if t in self.custom_outputs and t in self.value_info:
                    vi = onnx.ValueInfoProto()
                    vi.CopyFrom(self.value_info[t])
                    vi.name = node.output[s]
                    self.custom_value_info.append(vi)
            for child in self.children.get(i, []):  # before the copy below detaches the bodies
                child.materialize({t: alias[t] for t in child.outer_home if t in alias})
            new_nodes += [node, *([extra[i]] if i in extra else []), *casts.get(i, [])]
        cast_names = {c.name for group in casts.values() for c in group}
        self.report.casts = [n.name for n in new_nodes if n.op_type == "Cast" and n.name in cast_names]
        copies = [_copy(n) for n in new_nodes]  # detach before the repeated field is cleared
        del self.g.node[:]
        self.g.node.extend(copies)
        for o in self.g.output:
            if o.name in self.outer_home and FP32 in alias.get(o.name, {}):
                o.name = alias[o.name][FP32]
        for vi in (*self.g.input, *self.g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == FP32:
                vi.type.tensor_type.elem_type = self.io_type

    def _place_constant(self, t: str, extra: dict[int, onnx.NodeProto]) -> dict[int, str]:
        """Store a constant once per type its readers need. The original name keeps the graph
        output's type if it is one, else FP32 (FP16 when only FP16 code reads it)."""
        wants = set(self.wanted.get(t, [])) | ({self.io_type} if t in self.outputs else set())
        primary = self.io_type if t in self.outputs else FP16 if wants == {FP16} else FP32
        arr = self._constant_value(t)
        names = {primary: t}
        if primary == FP16:
            self._store(t, t, self._fp16(arr, t), extra)
            self.report.initializers_converted.append(t)
        elif t in self.flex_const:
            i = self.flex_const[t]
            self.report.fp32_nodes[_label(self.g.node[i], i)] = _FORCED + "constant read in FP32"
        for dtype in wants - {primary}:  # at most one: the other float type
            names[dtype] = copy = self._unique(f"{t}_{_SUFFIX[dtype]}")
            self._store(t, copy, arr.astype(np.float32) if dtype == FP32 else self._fp16(arr, t), extra)
            self.report.initializers_duplicated.append(t)
        return names

    def _constant_value(self, t: str) -> np.ndarray:
        if t in self.inits:
            return weights.tensor_array(self.g.initializer[self.inits[t]])  # large: a read-only map
        a = self.g.node[self.flex_const[t]].attribute[0]
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        return np.array(a.f if a.name == "value_float" else list(a.floats), np.float32)

    def _store(self, t: str, name: str, arr: np.ndarray, extra: dict[int, onnx.NodeProto]) -> None:
        """Write ``arr`` as constant ``name``: in place when it is ``t``, else as a new copy."""
        if t in self.inits:
            tensor = weights.make_tensor(arr, name)  # large weights stay out of the proto
            if name == t:
                self.g.initializer[self.inits[t]].CopyFrom(tensor)
            else:
                self.g.initializer.append(tensor)
            return
        i = self.flex_const[t]
        node = self.g.node[i]
        if name != t:  # ``name`` is reserved in the shared namespace, so it names the node too
            node = extra[i] = helper.make_node("Constant", [], [name], name=name)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(arr)))
        if arr.dtype == np.float16:
            self.report.fp16_nodes.append(_label(node, i))
        else:
            self.report.fp32_nodes[_label(node, i)] = _FORCED + "constant read in FP32"

    def _fix_attributes(self, i: int, node: onnx.NodeProto) -> None:
        if self.prec.get(i) != FP16 or node.domain not in _DEFAULT_DOMAINS:
            return
        if node.op_type == "Cast":
            # Cast(to=FLOAT) in FP16 code now writes FLOAT16. A Cast left fp16->fp16 is kept: it is
            # a no-op TensorRT and ORT remove, and dropping it could rename a graph output.
            for a in node.attribute:
                if a.name == "to" and a.i == FP32:
                    a.i = FP16
        elif node.op_type == "ConstantOfShape" and self.types.get(node.output[0]) == FP32:
            value = next((a for a in node.attribute if a.name == "value"), None)
            arr = numpy_helper.to_array(value.t) if value else np.zeros(1, np.float32)  # the default
            value = value or node.attribute.add(name="value", type=onnx.AttributeProto.TENSOR)
            value.t.CopyFrom(numpy_helper.from_array(self._fp16(arr, node.output[0])))

    def _fp16(self, arr: np.ndarray, name: str) -> np.ndarray:
        """Clamp finite values to ±65504, then convert. ±inf stays inf: masks use it on purpose."""
        out, n, worst = weights.clamp_to_fp16(np.asarray(arr))  # chunked: no full-size temporaries
        if n:
            logger.warning("clamping %d value(s) of '%s' to ±%g for FP16 (absmax %g)", n, name, FP16_MAX, worst)
            self.report.initializers_clamped[name] = self.report.initializers_clamped.get(name, 0) + n
        return out

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


# ---- helpers ---------------------------------------------------------------------------------
def _is_flexible_constant(node: onnx.NodeProto, plan: PrecisionPlan) -> bool:
    """A float Constant not pinned by the plan: its value is stored in whatever type is read."""
    if node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS or not node.attribute:
        return False
    if node.name and plan.is_fp32(node.name):
        return False
    a = node.attribute[0]
    return a.name in ("value_float", "value_floats") or a.name == "value" and a.t.data_type == FP32


def _label(node: onnx.NodeProto, i: int) -> str:
    return node.name or f"{node.op_type}#{i}"
