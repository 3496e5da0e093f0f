"""Which tensors a rewrite left alone: a digest of how each tensor is computed.

Two models' tensors with the same name and the same digest hold the same FP32 values: the digest
covers the producer (op, domain, attributes), its inputs' digests, the weights' bytes and the
graph inputs' names. After a rewrite the fixer re-measures ranges only where digests changed.
"""

from __future__ import annotations

import hashlib

import onnx


def value_signatures(model: onnx.ModelProto) -> dict[str, str]:
    """Digest of every tensor a node of the main graph produces (graphs are in topological order)."""
    g = model.graph
    sig: dict[str, str] = {}
    for init in g.initializer:
        sig[init.name] = hashlib.blake2b(init.SerializeToString(), digest_size=16).hexdigest()
    for inp in g.input:
        sig.setdefault(inp.name, "input:" + inp.name)
    for node in g.node:
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{node.domain}:{node.op_type};".encode())
        for attr in node.attribute:
            # A body may read outer tensors by name, which this digest does not follow: such a
            # node (and everything it feeds) never counts as unchanged.
            h.update(attr.SerializeToString() if not (attr.g.node or attr.graphs) else node.name.encode() + b"|body")
        for name in node.input:
            h.update((sig.get(name, "?" + name) + ";").encode())
        for i, out in enumerate(node.output):
            if out:
                sig[out] = f"{h.hexdigest()}:{i}"
    return sig


def unchanged(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Tensors computed the same way in both models."""
    return {t for t, s in after.items() if before.get(t) == s}


def rewritten_at(before: onnx.ModelProto, after: onnx.ModelProto, tensors: list[str],
                 before_signatures: dict[str, str] | None = None, values_changed: list[str] | None = None,
                 after_signatures: dict[str, str] | None = None) -> set[str]:
    """The ``tensors`` a rewrite reached at their own node: gone from ``after``, in or reading
    one in ``values_changed`` (the pass's declaration), or made by a node that ``after`` computes
    differently (op, domain, attributes, input names, a weight's bytes) or that reads a tensor so
    made. Every other tensor is made the same way from the same tensors as before: only what flows
    into it (its inputs' FP32 rounding and FP16 error) can differ."""
    sig_before = before_signatures or value_signatures(before)
    sig_after = after_signatures or value_signatures(after)
    producer_before = {o: n for n in before.graph.node for o in n.output if o}
    producer_after = {o: n for n in after.graph.node for o in n.output if o}
    weights = {i.name for i in after.graph.initializer}

    def local(node: onnx.NodeProto) -> tuple:
        return (node.domain, node.op_type, tuple(a.SerializeToString() for a in node.attribute), tuple(node.input))

    def remade(name: str) -> bool:
        if name in weights:
            return sig_before.get(name) != sig_after.get(name)
        node, old = producer_after.get(name), producer_before.get(name)
        if node is None:
            return old is not None  # a graph input stays one; a tensor turned into one is remade
        return old is None or local(old) != local(node)

    declared = set(values_changed or ())
    reached = set()
    for t in tensors:
        node = producer_after.get(t)
        if node is None or t in declared or remade(t) or any(i in declared or remade(i) for i in node.input if i):
            reached.add(t)
    return reached


def emulated_alike(before: onnx.ModelProto, after: onnx.ModelProto, tensors: list[str],
                   before_signatures: dict[str, str] | None = None,
                   after_signatures: dict[str, str] | None = None) -> set[str]:
    """The ``tensors`` that ``after`` computes exactly as ``before`` does, FP16 emulation
    included: the same digest, and every node they depend on keeps its name (the precision plan
    is keyed by names) and its index-arithmetic standing (emit.index_arithmetic, which reads
    consumers: a rewrite downstream could change it). Under one precision plan such a tensor has
    the same FP32 and FP16 values, errors and ranges in both models' diagnoses."""
    from onnx_fp16_rewrite.emit.index_arithmetic import index_arithmetic_nodes
    from onnx_fp16_rewrite.io.ort_runner import infer_types

    same = unchanged(before_signatures or value_signatures(before), after_signatures or value_signatures(after))
    wanted = [t for t in tensors if t in same]
    if not wanted:
        return set()

    def index_names(m: onnx.ModelProto) -> set[str] | None:
        try:
            types, _ = infer_types(m)
        except Exception:  # no types: no tensor can be shown alike
            return None
        return {m.graph.node[k].name for k in index_arithmetic_nodes(m.graph, types)}

    idx_before, idx_after = index_names(before), index_names(after)
    if idx_before is None or idx_after is None:
        return set()
    producer_before = {o: n.name for n in before.graph.node for o in n.output if o}
    producer_after = {o: n for n in after.graph.node for o in n.output if o}
    alike = set()
    for t in wanted:
        stack, seen, ok = [t], set(), True
        while stack and ok:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = producer_after.get(name)
            if node is None:
                continue  # a graph input or weight: its digest already matched
            ok = producer_before.get(name) == node.name and (node.name in idx_before) == (node.name in idx_after)
            stack += [i for i in node.input if i]
        if ok:
            alike.add(t)
    return alike


__all__ = ["emulated_alike", "rewritten_at", "unchanged", "value_signatures"]
