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


__all__ = ["unchanged", "value_signatures"]
