"""Running models in ONNX Runtime CPU with graph optimizations off, large models included."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 1

Feed = dict[str, np.ndarray]


def make_session(model: onnx.ModelProto):
    """An ORT CPU session with every graph optimization disabled.

    Optimizations stay off on purpose: ORT's fusions and cast eliminations would change the
    numerics we are trying to observe (and fold away the FP16 rounding casts of the emulator).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    # The arena keeps every block it ever grew to; with the emulation's many short-lived
    # tensors it grew by ~1 GiB per NAFNet run. Plain malloc returns memory between runs.
    opts.enable_cpu_mem_arena = False
    # ORT's default order runs the emulation's statistics reductions late and keeps every
    # activation alive until then (NAFNet 512x512: 1.3 GB, 1.0 s); priority order frees them
    # early (286 MB, 0.35 s).
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    providers = ["CPUExecutionProvider"]
    if model.ByteSize() <= _PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    # Past the protobuf limit ORT must read the model (and its weights) from disk.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=providers)


def run_model(
    model: onnx.ModelProto, feeds: Sequence[Feed], output_names: Sequence[str] | None = None
) -> list[Feed]:
    """Run ``model`` once per feed; returns one ``{output name: array}`` dict per feed."""
    session = make_session(model)
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        values = session.run(names, feed)
        results.append(dict(zip(names, values)))
    return results


def infer_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element type (onnx.TensorProto enum) and rank of every tensor shape inference can type."""
    if model.ByteSize() <= _PROTO_LIMIT:
        inferred = onnx.shape_inference.infer_shapes(model)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save_model(model, str(src), save_as_external_data=True, location="in.onnx.data")
            onnx.shape_inference.infer_shapes_path(str(src), str(dst))
            inferred = onnx.load(str(dst), load_external_data=False)
    types: dict[str, int] = {}
    ranks: dict[str, int] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type:
            types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)
    for init in graph.initializer:
        types[init.name] = init.data_type
        ranks[init.name] = len(init.dims)
    return types, ranks
