"""Running models in ONNX Runtime CPU with graph optimizations off, large models included."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from onnx_fp16_rewrite.io import weights

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


def make_session(model: onnx.ModelProto, *, optimize: bool = False, as_user: bool = False):
    """An ORT CPU session with every graph optimization disabled, or with ``optimize`` ORT's
    basic level (constant folding, redundant-node removal; the speed helper's
    tests/test_session_optimizations.py proves it keeps the emulator's FP16 rounding Casts and
    its outputs bitwise); intra-op threads = the cores this process may use.

    Optimizations are off by default on purpose: ORT's fusions change FP32 numerics (a fused
    Conv+Add rounds once), and a cast-chain elimination would fold away the FP16 rounding casts.
    ``as_user``: every ORT optimization, as a user's default session has (for a run that reports
    what such a session gives: fix's mixed model run as typed; ~25% faster than none).
    """
    import os

    import onnxruntime as ort

    _fixed_mmap_threshold()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if as_user
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # Opt-in in ORT; pinned off so no ORT default change can fold Cast(FP16)->Cast(FP32) away.
    opts.add_session_config_entry("session.enable_cast_chain_elimination", "0")
    if as_user:
        # It runs on a thread beside our main thread's work (fix's mixed model run): idle ORT
        # workers spinning for work would take the core Python needs (2 cores: three threads).
        # Results do not depend on it. Measured, 2 rounds of 3: fix --auto 1-14 % faster in 6 of 6.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        # Our sessions run once or a few times: packing MatMul weights at set-up costs more than it
        # saves (T5 encoder, 62 MB of weights: 0.35 -> 0.21 s a session, runs unchanged; fix --auto
        # 12.0x -> 9.8x a plain inference). Every session of ours packs alike, so the preflight's
        # FP32 outputs stay the emulation twin's, bit for bit; a user's session (as_user) packs.
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.intra_op_num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    # ORT writes its log straight to stderr: only with -v (our INFO logging) do its warnings
    # show; otherwise even its error lines stay quiet (its errors reach us as exceptions).
    severity = 2 if logger.isEnabledFor(logging.INFO) else 4
    ort.set_default_logger_severity(severity)
    opts.log_severity_level = severity
    # The arena keeps every block it ever grew to; with the emulation's many short-lived
    # tensors it grew by ~1 GiB per NAFNet run. Plain malloc returns memory between runs.
    # But a graph whose shapes are only known at run time gets no memory plan before its first
    # run (our sessions mostly run once): ORT then mallocs every activation of it apart, glibc maps
    # each block of 1 MiB or more fresh, and every page faults in. The arena serves those from
    # reused blocks: a TorchScript NAFNetLocal's check graph ran 12.5 -> 4.0 s (6.8M -> 0.16M page
    # faults), its peak 1.31 -> 1.49 GB.
    opts.enable_cpu_mem_arena = shapes_at_run_time(model)
    # ORT's default order runs the emulation's statistics reductions late and keeps every
    # activation alive until then (NAFNet 512x512: 1.3 GB, 1.0 s); priority order frees them
    # early (286 MB, 0.35 s).
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    providers = ["CPUExecutionProvider"]
    # Weights are given to ORT as our own buffers (add_initializer: no copy; file references
    # are read-only memory maps), and the model as a weight-less skeleton whose weights point at
    # an empty placeholder file: the protobuf limit never applies and nothing is written.
    # Float weights of any real size go that way too (weights.skeleton): ORT parsing them from
    # the serialized model would hold two more copies while the session is built.
    if not any(weights.is_ref(t) or weights.nbytes(t) >= weights.LARGE_TENSOR_BYTES or weights.shareable(t)
               for t in model.graph.initializer):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-ort-") as tmp:
        (Path(tmp) / "placeholder").touch()
        skel, stripped = weights.skeleton(model, "placeholder")
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", tmp)
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights.tensor_array(t)))
                  for t in stripped.values()]
        if opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            # Its fusions read initializer data from the graph: given as the placeholder's
            # external data instead (add_initializer's overrides they would not see).
            opts.add_external_initializers(list(stripped), values)
        else:
            for name, value in zip(stripped, values):
                opts.add_initializer(name, value)
        session = ort.InferenceSession(skel.SerializeToString(), opts, providers=providers)
    session._onnx_rewrite_weights = values  # ORT reads these buffers for the session's lifetime
    return session


def shapes_at_run_time(model: onnx.ModelProto) -> bool:
    """Whether ORT can only learn some tensor's shape by running ``model``: a graph input with a
    symbolic or unknown dim, a Shape or Size node (exporters compute pads, slices and reshapes
    from them), or control flow (bodies allocate per iteration)."""
    from onnx_fp16_rewrite.emulation.fp16_graph_edits import subgraphs

    initializers = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        t = inp.type.tensor_type
        if inp.name not in initializers and (not t.HasField("shape")
                                             or any(not d.HasField("dim_value") for d in t.shape.dim)):
            return True
    return any(n.op_type in ("Shape", "Size") or subgraphs(n) for n in model.graph.node)


_MMAP_THRESHOLD = 1 << 20
_threshold_set = False


def _fixed_mmap_threshold() -> None:
    """Blocks of 1 MiB or more always mmapped (glibc only, once per process). With the arena off
    (below), ORT mallocs every activation; glibc raises its mmap threshold to the largest block
    freed (up to 32 MiB), after which big tensors come from the heap and freed ones stay resident:
    the VAE decoder's shadow run peaked 88 MB higher. Numerics are untouched."""
    global _threshold_set
    if _threshold_set:
        return
    _threshold_set = True
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, _MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; a fixed value stops the adjustment
    except (OSError, AttributeError):  # not glibc
        pass


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; a no-op elsewhere).
    An emulation run leaves its many small freed blocks (statistics, samples) scattered over the
    heap: 80 MB of NAFNet-9's first diagnosis stayed resident and raised the next run's peak."""
    global _libc
    if _libc is False:
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None)
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        _libc = False


_libc = None


def ort_reason(exc: BaseException) -> str:
    """ORT's message without its error-code prefix and C++ source location, on one line."""
    import re

    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).strip())
    if text.startswith("/"):  # "/src/file.cc:46 void ns::Func(args...) Message"
        m = re.search(r"\) (?=[A-Z])", text)
        text = text[m.end():] if m else text
    return " ".join(text.split())[:300] or type(exc).__name__


def preflight(model: onnx.ModelProto, feed: Feed, what: str, session=None) -> Feed:
    """Run the user's model once on the first feed: what ONNX Runtime refuses here is the model's
    or the inputs' doing (exit 2), not ours. Returns its outputs (the FP32 reference on that
    feed: the same session options as every FP32 run here, so later runs need not repeat it).
    ``session``: the model's session when the caller has one (``model_io.check_input_model``)."""
    from onnx_fp16_rewrite.errors import BadInputError

    try:
        session = make_session(model) if session is None else session
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))
    except Exception as exc:  # ORT raises its own exception types
        raise BadInputError(f"ONNX Runtime cannot run {what} on these inputs: {ort_reason(exc)}") from None


def run_model(
    model: onnx.ModelProto, feeds: Sequence[Feed], output_names: Sequence[str] | None = None, *,
    as_user: bool = False,
) -> list[Feed]:
    """Run ``model`` once per feed; returns one ``{output name: array}`` dict per feed
    (``as_user``: with ORT's optimizations, see ``make_session``)."""
    session = make_session(model, as_user=as_user)
    names = list(output_names) if output_names is not None else [o.name for o in session.get_outputs()]
    results = []
    for feed in feeds:
        values = session.run(names, feed)
        results.append(dict(zip(names, values)))
    del session
    trim_heap()
    return results


def infer_types(model: onnx.ModelProto, sizes: dict[str, int] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Element type (onnx.TensorProto enum) and rank of every tensor shape inference can type;
    ``sizes``, when given, gets the element count of every tensor whose dims are all known."""
    # Shapes are inferred on a weight-less skeleton (the caller's model is never touched).
    skel, _ = weights.skeleton(model)
    inferred = onnx.shape_inference.infer_shapes(skel)
    types: dict[str, int] = {}
    ranks: dict[str, int] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.elem_type:
            types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)
                if sizes is not None and all(d.HasField("dim_value") for d in tt.shape.dim):
                    sizes[vi.name] = int(np.prod([d.dim_value for d in tt.shape.dim], dtype=np.int64))
    for init in graph.initializer:
        types[init.name] = init.data_type
        ranks[init.name] = len(init.dims)
    return types, ranks
