"""Networks inside control flow: a voice-activity-detector-like If, a Loop and a Scan (opset 17).

``build_vad_if``: frame energy ``mean(x^2)`` against a threshold chooses a branch; the *speech*
branch is a small network whose ``Mul(h, h)`` (~1e5) and row sum (~1e7) overflow FP16 before a
Div brings them back to shares in [0, 1]; the *silence* branch is a small MLP that is FP16-safe.
Both read the outer input and outer weights, as exported VADs do.

``build_loop``: 3 iterations of ``s <- share(MatMul(s, W)^2)`` on a carried [1,16] state, every
iteration's state also a scan output; the squares overflow FP16 inside the body.

``build_scan``: a Scan over 8 frames of [8,16]: per frame ``e = (x_t W)^2`` (overflows),
``y_t = e / sum(e)``, and a running state ``acc + mean(y_t)``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["build_loop", "build_scan", "build_vad_if", "vad_inputs"]

_F = TensorProto.FLOAT
_OPSET = [helper.make_opsetid("", 17)]


def _vi(name: str, shape, dtype: int = _F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=_OPSET, ir_version=8, producer_name="onnx-fp16-rewrite.models")
    onnx.checker.check_model(model, full_check=True)
    return model


def build_vad_if(*, seed: int = 0) -> onnx.ModelProto:
    """Input ``x`` float [1,64] (frame features), output ``y`` float [1,8]."""
    rng = np.random.default_rng(seed)
    w = {
        "speech.w1": rng.standard_normal((64, 64)) * 40.0, "speech.w2": rng.standard_normal((64, 8)) * 0.5,
        "silence.w1": rng.standard_normal((64, 32)) * 0.2, "silence.w2": rng.standard_normal((32, 8)) * 0.2,
        "threshold": np.float32(0.2),
    }
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in w.items()]
    speech = helper.make_graph([
        helper.make_node("MatMul", ["x", "speech.w1"], ["sp_h"], name="/speech/fc1/MatMul"),
        helper.make_node("Mul", ["sp_h", "sp_h"], ["sp_e"], name="/speech/energy/Mul"),
        helper.make_node("ReduceSum", ["sp_e", "axes"], ["sp_tot"], name="/speech/energy/ReduceSum", keepdims=1),
        helper.make_node("Div", ["sp_e", "sp_tot"], ["sp_share"], name="/speech/energy/Div"),
        helper.make_node("MatMul", ["sp_share", "speech.w2"], ["sp_y"], name="/speech/fc2/MatMul"),
    ], "speech", [], [_vi("sp_y", [1, 8])])
    silence = helper.make_graph([
        helper.make_node("MatMul", ["x", "silence.w1"], ["si_h"], name="/silence/fc1/MatMul"),
        helper.make_node("Relu", ["si_h"], ["si_r"], name="/silence/act/Relu"),
        helper.make_node("MatMul", ["si_r", "silence.w2"], ["si_y"], name="/silence/fc2/MatMul"),
    ], "silence", [], [_vi("si_y", [1, 8])])
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["x2"], name="/vad/Mul"),
        helper.make_node("ReduceMean", ["x2"], ["frame_energy"], name="/vad/ReduceMean", keepdims=0),
        helper.make_node("Greater", ["frame_energy", "threshold"], ["is_speech"], name="/vad/Greater"),
        helper.make_node("If", ["is_speech"], ["branch_y"], name="/vad/If", then_branch=speech, else_branch=silence),
        helper.make_node("Sigmoid", ["branch_y"], ["y"], name="/head/Sigmoid"),
    ]
    return _model(helper.make_graph(nodes, "vad_if", [_vi("x", [1, 64])], [_vi("y", [1, 8])], initializer=inits))


def vad_inputs(*, speech: bool, seed: int = 1) -> dict[str, np.ndarray]:
    """U(0,1) frames (energy ~0.33: speech) or U(0,0.5) (energy ~0.08: silence)."""
    x = np.random.default_rng(seed).uniform(0, 1 if speech else 0.5, (1, 64)).astype(np.float32)
    return {"x": x}


def build_loop(*, seed: int = 0, iterations: int = 3) -> onnx.ModelProto:
    """Input ``x`` float [1,16], outputs ``s_final`` [1,16] and ``states`` [iterations,1,16]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * 300.0).astype(np.float32), "loop.w"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(iterations, np.int64), "trip"),
             numpy_helper.from_array(np.array(True), "always")]
    body = helper.make_graph([
        helper.make_node("Identity", ["cond_in"], ["cond_out"], name="/loop/cond"),
        helper.make_node("MatMul", ["s_in", "loop.w"], ["lp_h"], name="/loop/body/MatMul"),
        helper.make_node("Mul", ["lp_h", "lp_h"], ["lp_e"], name="/loop/body/Mul"),
        helper.make_node("ReduceSum", ["lp_e", "axes"], ["lp_tot"], name="/loop/body/ReduceSum", keepdims=1),
        helper.make_node("Div", ["lp_e", "lp_tot"], ["s_out"], name="/loop/body/Div"),
        helper.make_node("Identity", ["s_out"], ["s_scan"], name="/loop/body/Identity"),
    ], "loop_body", [_vi("iter", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("s_in", [1, 16])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("s_out", [1, 16]), _vi("s_scan", [1, 16])])
    nodes = [
        helper.make_node("Loop", ["trip", "always", "x"], ["s_loop", "states_loop"], name="/loop/Loop", body=body),
        helper.make_node("Identity", ["s_loop"], ["s_final"], name="/out/s"),
        helper.make_node("Identity", ["states_loop"], ["states"], name="/out/states"),
    ]
    graph = helper.make_graph(nodes, "loop", [_vi("x", [1, 16])],
                              [_vi("s_final", [1, 16]), _vi("states", [iterations, 1, 16])], initializer=inits)
    return _model(graph)


def build_scan(*, seed: int = 0, frames: int = 8) -> onnx.ModelProto:
    """Input ``x`` float [frames,16], outputs ``acc`` [1] and ``y`` [frames,16]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * 40.0).astype(np.float32), "scan.w"),
             numpy_helper.from_array(np.zeros(1, np.float32), "acc0")]
    body = helper.make_graph([
        helper.make_node("Unsqueeze", ["x_t", "ax0"], ["sc_row"], name="/scan/body/Unsqueeze"),
        helper.make_node("MatMul", ["sc_row", "scan.w"], ["sc_h"], name="/scan/body/MatMul"),
        helper.make_node("Mul", ["sc_h", "sc_h"], ["sc_e"], name="/scan/body/Mul"),
        helper.make_node("ReduceSum", ["sc_e"], ["sc_tot"], name="/scan/body/ReduceSum", keepdims=0),
        helper.make_node("Div", ["sc_e", "sc_tot"], ["sc_share"], name="/scan/body/Div"),
        helper.make_node("Squeeze", ["sc_share", "ax0"], ["y_t"], name="/scan/body/Squeeze"),
        helper.make_node("ReduceMean", ["y_t"], ["sc_mean"], name="/scan/body/ReduceMean", keepdims=1),
        helper.make_node("Add", ["acc_in", "sc_mean"], ["acc_out"], name="/scan/body/Add"),
    ], "scan_body", [_vi("acc_in", [1]), _vi("x_t", [16])], [_vi("acc_out", [1]), _vi("y_t", [16])],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "ax0")])
    nodes = [helper.make_node("Scan", ["acc0", "x"], ["acc", "y"], name="/scan/Scan", body=body, num_scan_inputs=1)]
    graph = helper.make_graph(nodes, "scan", [_vi("x", [frames, 16])], [_vi("acc", [1]), _vi("y", [frames, 16])],
                              initializer=inits)
    return _model(graph)
