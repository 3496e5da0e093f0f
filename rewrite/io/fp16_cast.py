"""FP32 -> FP16 conversion of large arrays through ONNX Runtime's Cast kernel.

numpy converts float32 to float16 and back element by element in software (about 15 ns an
element here: 0.25 s for T5's 65 MB of weights, rounded once per fix and cast once more when
``--emit mixed`` stores them); ORT's CPU Cast is vectorised and threaded, 2.5-4x faster. Both round
to nearest, ties to even, with subnormals kept, so the bits are the same (tests/test_fp16_cast.py
checks ties, subnormals, the FP16 range's edge, infinities and signed zeros). NaN payloads are
where conversions may differ, so an array holding NaN goes through numpy. ``clamp`` clips to
±65504 first (the emulation's weights: an FP16 engine holds the range's edge, not inf) in the same
ORT graph (a Clip node), which saves numpy's clipped copy, a pass as long as the conversion.
"""

from __future__ import annotations

import numpy as np

from onnx_fp16_rewrite.fp16_limits import FP16_MAX

# Below this many elements a session run costs more than numpy's loop.
MIN_ELEMENTS = 1 << 16

_sessions: dict[tuple[str, bool], object] = {}


def to_fp16(arr: np.ndarray, *, clamp: bool = False) -> np.ndarray:
    """``arr.astype(np.float16)`` for a float32 array (overflow to inf, as numpy; ``clamp``: of
    ``np.clip(arr, -65504, 65504)``)."""
    if not _fast(arr):
        with np.errstate(over="ignore"):
            return _clip(arr, clamp).astype(np.float16)
    return _run("fp16", arr, clamp)


def round_fp16(arr: np.ndarray, *, clamp: bool = False) -> np.ndarray:
    """``arr.astype(np.float16).astype(np.float32)`` for a float32 array (``clamp`` as ``to_fp16``)."""
    if not _fast(arr):
        with np.errstate(over="ignore"):
            return _clip(arr, clamp).astype(np.float16).astype(np.float32)
    return _run("round", arr, clamp)


def _clip(arr: np.ndarray, clamp: bool) -> np.ndarray:
    return np.clip(arr, -FP16_MAX, FP16_MAX) if clamp else arr


def _fast(arr: np.ndarray) -> bool:
    # max propagates NaN: one pass, no temporary mask the size of the array.
    return arr.dtype == np.float32 and arr.size >= MIN_ELEMENTS and not np.isnan(arr.max())


def _run(kind: str, arr: np.ndarray, clamp: bool) -> np.ndarray:
    if (kind, clamp) not in _sessions:
        _sessions[kind, clamp] = _session(kind, clamp)
    session = _sessions[kind, clamp]
    flat = np.ascontiguousarray(arr).reshape(-1)
    return session.run(None, {"x": flat})[0].reshape(arr.shape)


def _session(kind: str, clamp: bool):
    from onnx import TensorProto, helper, numpy_helper

    from onnx_fp16_rewrite.io.ort_runner import make_session  # here: ort_runner imports weights, which imports us

    nodes, inits = [], []
    if clamp:
        inits = [numpy_helper.from_array(np.array(-FP16_MAX, np.float32), "lo"),
                 numpy_helper.from_array(np.array(FP16_MAX, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["x", "lo", "hi"], ["c"]))
    nodes.append(helper.make_node("Cast", ["c" if clamp else "x"], ["h" if kind == "round" else "y"],
                                  to=TensorProto.FLOAT16))
    if kind == "round":
        nodes.append(helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT))
    out = TensorProto.FLOAT if kind == "round" else TensorProto.FLOAT16
    graph = helper.make_graph(nodes, "fp16_cast", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", out, ["n"])], inits)
    # Every graph optimisation off and cast chains kept (make_session): the rounding is the point.
    return make_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


__all__ = ["MIN_ELEMENTS", "round_fp16", "to_fp16"]
