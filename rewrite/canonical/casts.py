"""No-op Casts: ``Cast(to=T)`` (or ``CastLike``) of a tensor that already has type T.

HF's T5LayerNorm writes ``hidden.to(torch.float32)``; the TorchScript exporter keeps it as
``Cast(to=FLOAT)`` on a FLOAT tensor, and scale reasoning then stops at an op it does not know to
be the identity. Removing it is exact. A Cast whose output is a graph output keeps that name:
the tensor it casts is renamed to the output's name instead (when that tensor is produced by a
node and is no graph input or output itself); otherwise the Cast stays.
"""

from __future__ import annotations

import logging

import onnx

from onnx_fp16_rewrite.io.ort_runner import infer_types

__all__ = ["remove_noop_casts"]

logger = logging.getLogger(__name__)


def remove_noop_casts(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """Remove no-op Casts of the main graph in place; returns the model, the names of the Casts
    removed and of no-op Casts kept (graph output of a graph input, or of another graph output)."""
    try:
        types, _ = infer_types(model)
    except Exception as exc:  # without types no Cast can be proven a no-op
        logger.info("no-op Casts: type inference failed (%s)", exc)
        return model, [], []
    g = model.graph
    outputs = {o.name for o in g.output}
    inputs = {i.name for i in g.input} | {i.name for i in g.initializer}
    removed, kept = [], []
    for node in list(g.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Cast", "CastLike"):
            continue
        src, out = node.input[0], node.output[0]
        if node.op_type == "Cast":
            target = next((a.i for a in node.attribute if a.name == "to"), None)
        else:
            target = types.get(node.input[1]) if len(node.input) > 1 else None
        if target is None or types.get(src) != target:
            continue
        if out not in outputs:
            g.node.remove(node)
            _rename_uses(g, out, src)
            _drop_value_info(g, out)
        elif src not in inputs and src not in outputs:
            g.node.remove(node)
            _drop_value_info(g, out)
            _rename_everywhere(g, src, out)
        else:
            kept.append(node.name)
            continue
        removed.append(node.name)
    if removed:
        logger.info("removed %d no-op Cast(s)", len(removed))
    return model, removed, kept


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` reads ``new`` instead, in subgraphs too (outer-scope references)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                if not _defines(sub, old):
                    _rename_uses(sub, old, new)


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the tensor ``old`` (its producer's output, its readers, its value_info) to ``new``."""
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new
    _rename_uses(graph, old, new)


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    for vi in list(graph.value_info):
        if vi.name == name:
            graph.value_info.remove(vi)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def _defines(graph: onnx.GraphProto, name: str) -> bool:
    """A subgraph that defines ``name`` itself shadows the outer tensor."""
    return (any(i.name == name for i in graph.input) or any(i.name == name for i in graph.initializer)
            or any(name in n.output for n in graph.node))
