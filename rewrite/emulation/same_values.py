"""Whether two emulation graphs compute the same values, proved by value numbering.

``fix --emit mixed`` used to verify the strongly typed model it emits with one more emulation run,
although the search's last run (the weak emulation of the same plan) had mostly computed the very
same values: the mixed model's FP16 tensors are the tensors the plan leaves FP16, rounded where
they are produced, and its FP32 islands read what the weak emulation hands them. Here each
tensor of an emulation graph gets a number from what computes it: the op, its attributes and
the numbers of its inputs; a weight by its values; a graph input by name and by whether the
emulation's feed rounds it. What changes no value is seen through: Identity, a Cast to the type
its input already has, and rounding twice (round-to-nearest FP16 is idempotent). A rounding Cast
pair (FP32 -> FP16 -> FP32) and the rounding of an FP16 feed (numpy) are one and the same
rounding: tests/test_same_values.py checks the two agree bit for bit, subnormals, the overflow
boundary and NaN included. Two tensors with one number are the same ORT CPU kernels applied in
the same order to the same values: the same bits. Graphs with control flow or random ops are
not numbered (None). ``canonical.same_computation`` numbers plain graphs the same way (a Constant
node as a weight of its value) to prove a canonicalisation step computes what it was given.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import onnx
from onnx import helper

from onnx_fp16_rewrite.emulation.fp16_graph_edits import subgraphs
from onnx_fp16_rewrite.io import weights
from onnx_fp16_rewrite.io.ort_runner import infer_types

logger = logging.getLogger(__name__)

_FLOAT, _FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
# Ops whose values are not a function of their inputs (two runs differ).
_RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"})


_DIGEST_VALUES = 1 << 14


def _equal_bytes(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Byte arrays equal, compared a MiB at a time (no temporary the size of a weight)."""
    return a.size == b.size and all(np.array_equal(a[i:i + chunk], b[i:i + chunk]) for i in range(0, a.size, chunk))


def _values(t: onnx.TensorProto) -> np.ndarray:
    """A weight's values, flat: an inline tensor's bytes as they are (no conversion, no copy of
    an array), a reference's memory map or buffer (io.weights)."""
    if not weights.is_ref(t) and t.raw_data and t.data_type not in (onnx.TensorProto.STRING,):
        try:
            return np.frombuffer(t.raw_data, helper.tensor_dtype_to_np_dtype(t.data_type))
        except (KeyError, TypeError, ValueError):  # a type numpy cannot view: convert it
            pass
    return np.ascontiguousarray(weights.tensor_array(t)).reshape(-1)


class ValueNumbers:
    """Numbers shared by several graphs: a number means the same value in each. ``coarse``: a
    weight's number says only its type and shape (equal values have equal coarse numbers, so
    graphs whose coarse numbers differ differ: a cheap first look that reads no weight)."""

    def __init__(self, *, coarse: bool = False) -> None:
        self.coarse = coarse
        self._ids: dict[tuple, int] = {}
        self._keys: list[tuple] = []
        self._weights: dict[tuple, list[tuple[int, np.ndarray]]] = {}  # the weights numbered so far

    def _intern(self, key: tuple) -> int:
        got = self._ids.get(key)
        if got is None:
            got = self._ids[key] = len(self._keys)
            self._keys.append(key)
        return got

    def rounded(self, k: int) -> int:
        """The number of ``k`` rounded to FP16 and back (rounding a rounded value changes nothing)."""
        return k if self._keys[k][0] == "round" else self._intern(("round", k))

    def weight(self, t: onnx.TensorProto) -> int:
        """A weight's number: equal values, equal numbers. Found by a digest of a sample of its
        bytes, then confirmed byte for byte (faster than digesting every byte: T5's weights)."""
        if self.coarse:
            return self._intern(("weight", t.data_type, tuple(t.dims)))
        values = _values(t)
        # Whole elements sampled (a byte stride would read one byte of each: FP16-rounded FP32
        # weights all end in zero bytes).
        sample = np.ascontiguousarray(values[::max(1, values.size // _DIGEST_VALUES)])
        digest = hashlib.sha1(sample.view(np.uint8).data).hexdigest() if values.size else ""
        flat = values.view(np.uint8)
        key = (t.data_type, tuple(t.dims), flat.size, digest)
        seen = self._weights.setdefault(key, [])
        for number, other in seen:
            if other is flat or _equal_bytes(other, flat):
                return number
        number = self._intern(("weight", key, len(seen)))
        seen.append((number, flat))
        return number

    def number(self, model: onnx.ModelProto, rounded_inputs: set[str] = frozenset(),
               given: dict[str, int] | None = None, types: dict[str, int] | None = None) -> dict[str, int] | None:
        """Every tensor of ``model`` (an emulation graph, or any graph) -> its number; None where
        the graph has control flow or random ops. ``rounded_inputs``: graph inputs the feed rounds
        to FP16. ``given``: tensors whose number the caller knows (they replace what computes them).
        A Constant node's tensor is numbered as a weight of its value. ``types``: the model's
        element types when the caller has them (else inferred)."""
        g = model.graph
        if any(n.op_type in _RANDOM or subgraphs(n) for n in g.node):
            return None
        if types is None:
            types, _ = infer_types(model)
        opsets = tuple(sorted((i.domain or "", i.version) for i in model.opset_import))
        num: dict[str, int] = {"": -1}
        for t in g.initializer:
            num[t.name] = self.weight(t)
        for i in g.input:
            if i.name not in num:
                k = self._intern(("input", i.name))
                num[i.name] = self.rounded(k) if i.name in rounded_inputs else k
        for node in g.node:
            try:
                ins = [num[x] for x in node.input]
            except KeyError:  # an input produced later: not a topologically sorted graph
                return None
            outs = self._node_numbers(node, ins, types, opsets)
            for out, k in zip(node.output, outs):
                if out:
                    num[out] = given[out] if given and out in given else k
        return num

    def _node_numbers(self, node: onnx.NodeProto, ins: list[int], types: dict[str, int], opsets: tuple) -> list[int]:
        """The numbers of ``node``'s outputs, from its inputs' numbers ``ins``."""
        default = node.domain in ("", "ai.onnx")
        to = next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None
        if default and (node.op_type == "Identity" or (to is not None and types.get(node.input[0]) == to)):
            return [ins[0]]
        if default and to == _FLOAT and self._keys[ins[0]][0] == "half":
            return [self.rounded(self._keys[ins[0]][1])]
        if default and to == _FLOAT16 and types.get(node.input[0]) == _FLOAT:
            return [self._intern(("half", ins[0]))]
        if default and node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            return [self.weight(node.attribute[0].t)]
        attrs = tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute))
        op = self._intern(("node", node.domain or "", node.op_type, attrs, tuple(ins), len(node.output), opsets))
        return [self._intern(("out", op, k)) for k in range(len(node.output))]


def reused_verdict(weak_model: onnx.ModelProto, strong_model: onnx.ModelProto, plan, feeds, verdict, *,
                   verdict_run: str, strict_cumsum: bool = False):
    """The FP16 check report of ``strong_model`` (the mixed model emitted from ``weak_model`` and
    ``plan``) on ``feeds``, without running it; None (the reason logged) where the weak verdict
    run cannot be proved to have computed it.

    ``verdict``: the clean report (passed, no failing tensor) of the weak emulation of
    ``weak_model`` under ``plan`` on the same feeds against the same reference, from a screen
    (``verdict_run="screen"``: one sum per stored tensor, all finite) or a diagnosis
    (``"diagnosis"``: every stored tensor finite; the caller says so only where no FP32 value of
    the model is non-finite, since a diagnosis passes FP16 non-finiteness where FP32 has it too).
    Proved when every output of the strong emulation has the number of the weak one's, and every
    tensor the strong check takes statistics of has the number of one the weak run took them of.
    Then the strong check's outputs compare as the verdict's did, and its screen sums are sums of
    finite values: of FP16 values (no overflow possible), or, for FP32 tensors, the very sums the
    weak screen found finite (a diagnosis has no such sums: FP32 tensors then need a run)."""
    from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation
    from onnx_fp16_rewrite.emulation.fp16_report import Fp16Report

    start = time.perf_counter()

    def refused(why: str):
        logger.info("mixed-model verification runs: %s", why)
        return None

    if not (verdict.passed and verdict.failing_tensors == 0 and verdict_run in ("screen", "diagnosis")):
        return refused("the search's verdict is not a clean emulation run")
    outputs = [o.name for o in strong_model.graph.output]
    if outputs != [o.name for o in weak_model.graph.output] or {o.name for o in verdict.outputs} != set(outputs):
        return refused("the models' outputs differ")
    weak = build_emulation(weak_model, plan, strict_cumsum=strict_cumsum, nonfinite_only=True)
    strong = build_emulation(strong_model, plan, strict_cumsum=strict_cumsum, nonfinite_only=True)
    if strong.unhandled_bodies or weak.unhandled_bodies:
        return refused("control flow the emulation does not handle")
    fed_fp16 = set()  # inputs emu_feed rounds in both emulations: FP16 in the feeds
    for name in {n for f in feeds for n in f}:
        kinds = {np.asarray(f[name]).dtype == np.float16 for f in feeds if name in f}
        if len(kinds) > 1:
            return refused(f"input {name!r} is FP16 in some samples only")
        if kinds == {True}:
            fed_fp16.add(name)
    numbers = ValueNumbers()
    nums = []
    for emu in (weak, strong):
        got = numbers.number(emu.model, emu.fp16_inputs | fed_fp16)
        if got is None:
            return refused("control flow or random ops")
        nums.append(got)
    nw, ns = nums
    differ = [o for o in outputs if nw.get(o) is None or nw.get(o) != ns.get(o)]
    if differ:
        return refused(f"output {differ[0]!r} is computed differently")
    weak_sites = {nw[s.tensor] for s in weak.sites if s.tensor in nw}
    if verdict_run == "screen" and verdict.edges_finite:
        # FP32 islands' values as FP16 layers read them: the mixed model's Casts to FP16.
        weak_sites |= {nw[t] for t in weak.edge_sums if t in nw}
    for s in strong.sites:
        if ns.get(s.tensor) not in weak_sites:
            return refused(f"tensor {s.tensor!r} has no counterpart in the weak run")
        if not s.fp16 and verdict_run != "screen":
            return refused(f"FP32 tensor {s.tensor!r}: its sum was not taken")
    by_name = {o.name: o for o in verdict.outputs}
    return Fp16Report(
        mode=strong.mode, strict_cumsum=strict_cumsum, fp16_nodes=strong.fp16_nodes, fp32_nodes=strong.fp32_nodes,
        outputs=[by_name[o] for o in outputs], first_failures=[], failing_tensors=0,
        rel_l2_tolerance=verdict.rel_l2_tolerance, passed=True,
        seconds=round(time.perf_counter() - start, 3),
        notes=list(strong.notes) + ["not run again: its outputs and statistics are proved (value numbering) to be "
                                    "those of the search's final weak-emulation run"],
    )


__all__ = ["ValueNumbers", "reused_verdict"]
