"""The precision plan: which nodes must run in FP32, and why. Stored inside the model.

The plan lives in the model's ``metadata_props`` (one JSON entry) so it survives save/load,
graphsurgeon round trips and composition across passes and scripts. Node names are the keys,
which is also what TensorRT's ONNX parser names its layers after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx

PLAN_KEY = "onnx_fp16_rewrite.precision_plan"


@dataclass
class PrecisionPlan:
    """Nodes pinned to FP32 (node name -> reason). Everything else may run in FP16."""

    fp32_nodes: dict[str, str] = field(default_factory=dict)

    def pin(self, node_name: str, reason: str) -> bool:
        """Pin a node; returns True when it was not pinned before."""
        if node_name in self.fp32_nodes:
            return False
        self.fp32_nodes[node_name] = reason
        return True

    def is_fp32(self, node_name: str) -> bool:
        return node_name in self.fp32_nodes

    def __len__(self) -> int:
        return len(self.fp32_nodes)

    def to_json(self) -> str:
        return json.dumps({"version": 1, "fp32_nodes": self.fp32_nodes}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrecisionPlan":
        data = json.loads(text)
        return cls(fp32_nodes=dict(data.get("fp32_nodes", {})))

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> "PrecisionPlan":
        for prop in model.metadata_props:
            if prop.key == PLAN_KEY:
                return cls.from_json(prop.value)
        return cls()

    def store_in(self, model: onnx.ModelProto) -> None:
        """Write the plan into ``model.metadata_props`` (replacing an older one), dropping names
        of nodes that no longer exist (nodes inside If/Loop/Scan bodies count)."""
        names = _node_names(model.graph)
        live = {k: v for k, v in self.fp32_nodes.items() if k in names}
        kept = [p for p in model.metadata_props if p.key != PLAN_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        if live:
            model.metadata_props.add(key=PLAN_KEY, value=PrecisionPlan(live).to_json())


def _node_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.add(node.name)
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                names |= _node_names(sub)
    return names
