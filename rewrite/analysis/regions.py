"""Growing FP32 regions on measured ranges, shared by protect-fp32 and the automatic fixer.

A region starts at seed nodes and grows
- forward, through every consumer of a region tensor whose FP32 absmax exceeds ``limit``
  (values are not back in range yet: an FP16 reader would overflow or lose the digits), and
- backward, to the producer of any region input whose absmax exceeds ``limit``.
Graphs are plain ``onnx.GraphProto``s here, so no graphsurgeon import is needed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import onnx


class GraphIndex:
    """Producer and consumers of every tensor name of a graph's nodes."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        # Nodes inside If/Loop/Scan bodies too, so a site in a body grows a region there.
        nodes = _all_nodes(graph)
        self.nodes = {n.name: n for n in nodes}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in set(node.input):
                if inp:
                    self.consumers[inp].append(node)


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    out = []
    for node in graph.node:
        out.append(node)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                out += _all_nodes(sub)
    return out


def grow_region(
    index: GraphIndex,
    seeds: Mapping[str, str],
    absmax: Mapping[str, float],
    limit: float,
    *,
    forward: bool = True,
    backward: bool = True,
) -> dict[str, str]:
    """Seeds (node name -> reason) grown into a region (node name -> reason)."""
    region = dict(seeds)
    work = [index.nodes[name] for name in seeds if name in index.nodes]

    def large(tensor: str) -> bool:
        return tensor in index.producer and absmax.get(tensor, 0.0) > limit

    while work:
        node = work.pop()
        for t in node.output if forward else ():
            if not large(t):
                continue
            for consumer in index.consumers.get(t, []):
                if consumer.name not in region:
                    region[consumer.name] = f"reads {t} (FP32 absmax {absmax[t]:.4g})"
                    work.append(consumer)
        if not backward:
            continue
        for t in node.input:
            if large(t) and index.producer[t].name not in region:
                producer = index.producer[t]
                region[producer.name] = f"produces {t} (FP32 absmax {absmax[t]:.4g})"
                work.append(producer)
    return region


def boundary_tensors(index: GraphIndex, region: Iterable[str]) -> list[str]:
    """Tensors produced inside the region and read outside it (where values leave FP32)."""
    inside = set(region)
    out = []
    for name in inside:
        node = index.nodes.get(name)
        if node is None:
            continue
        for t in node.output:
            if any(c.name not in inside for c in index.consumers.get(t, [])):
                out.append(t)
    return sorted(out)
