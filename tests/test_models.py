"""The test-model builders: valid ONNX, runnable in ORT, and with the FP32 magnitudes the project relies on."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnx_fp16_rewrite.models import (
    DEMO_MODELS,
    build_cumsum_chain,
    build_integral_box_filter,
    build_mlp,
    build_nafnet,
    build_residual_groupnorm,
    demo_inputs,
)

FP16_MAX = 65504.0
SCA_OPS = ["CumSum", "CumSum", "Pad", "Slice", "Slice", "Slice", "Slice", "Add", "Sub", "Sub", "Div", "Pad", "Conv"]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], extra: list[str] = ()) -> dict[str, np.ndarray]:
    """Run in ORT CPU with optimizations off; ``extra`` intermediate tensors are exposed as outputs on a copy."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    if extra:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        exposed.graph.output.extend(helper.make_tensor_value_info(t, types[t], None) for t in extra)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in exposed.graph.output]
    return dict(zip(names, session.run(names, feeds)))


def absmax(a: np.ndarray) -> float:
    return float(np.abs(a).max())


def node_outputs(model: onnx.ModelProto) -> list[str]:
    return [o for node in model.graph.node for o in node.output]


ALL_BUILDERS = {
    "nafnet": build_nafnet,
    "nafnet-dynamic": lambda: build_nafnet(dynamic=True),
    "nafnet-opset18": lambda: build_nafnet(height=64, width=48, kernel=(32, 40), opset=18),
    "residual-groupnorm": build_residual_groupnorm,
    "box-filter": build_integral_box_filter,
    "cumsum-chain": build_cumsum_chain,
    "mlp": build_mlp,
}


@pytest.fixture(scope="module")
def nafnet() -> onnx.ModelProto:
    return build_nafnet()


@pytest.fixture(scope="module")
def nafnet_feeds(nafnet: onnx.ModelProto) -> dict[str, np.ndarray]:
    return demo_inputs(nafnet)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_valid_onnx_with_unique_names(name: str) -> None:
    model = ALL_BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert all(n.startswith("/") for n in names)


@pytest.mark.parametrize("name", ["nafnet", "residual-groupnorm", "box-filter", "cumsum-chain", "mlp"])
def test_deterministic(name: str) -> None:
    assert ALL_BUILDERS[name]().SerializeToString() == ALL_BUILDERS[name]().SerializeToString()


def test_demo_models_are_zero_arg_builders() -> None:
    assert set(DEMO_MODELS) == {"nafnet", "residual-groupnorm", "box-filter"}
    for builder in DEMO_MODELS.values():
        assert isinstance(builder(), onnx.ModelProto)


def test_demo_inputs_rejects_symbolic_dims() -> None:
    with pytest.raises(ValueError, match="symbolic"):
        demo_inputs(build_nafnet(dynamic=True))


# --- NAFNet -------------------------------------------------------------------------------------------------

def test_nafnet_sca_naming(nafnet: onnx.ModelProto) -> None:
    for i in range(2):
        scope = f"/encoders.0/encoders.0.{i}/sca/"
        assert [n.op_type for n in nafnet.graph.node if n.name.startswith(scope)] == SCA_OPS
    sca = [n for n in nafnet.graph.node if "sca" in n.name]
    assert len(sca) == 2 * len(SCA_OPS)
    assert all("/sca/sca." in n.name for n in sca)
    first = nafnet.graph.node[[n.name for n in nafnet.graph.node].index("/encoders.0/encoders.0.0/sca/sca.0/CumSum")]
    assert first.input[0] == "/encoders.0/encoders.0.0/sg/Mul_output_0"


def test_nafnet_fp32_magnitudes(nafnet: onnx.ModelProto, nafnet_feeds: dict[str, np.ndarray]) -> None:
    sca = "/encoders.0/encoders.0.0/sca/sca.0/"
    integral, box_sum = f"{sca}CumSum_1_output_0", f"{sca}Sub_1_output_0"
    order = node_outputs(nafnet)
    upto = order[: order.index(box_sum) + 1]  # everything through block 0's box sum
    out = run(nafnet, nafnet_feeds, upto)
    y = out["output"]
    assert np.isfinite(y).all() and absmax(y) < 100
    assert np.abs(y - nafnet_feeds["input"]).mean() < 0.1  # a plausible restoration: a small correction
    assert absmax(out[integral]) >= 2 * FP16_MAX  # measured 2.74e5
    assert absmax(out[box_sum]) > FP16_MAX  # measured 1.54e5; k1*k2 = 147456 as well
    assert absmax(out[f"{sca}Slice_3_output_0"]) > FP16_MAX
    first_over = next(t for t in upto if absmax(out[t]) > FP16_MAX)
    assert first_over == integral
    assert absmax(out[f"{sca}CumSum_output_0"]) < 1000  # the row prefix sum (W first) is still small
    gate = out["/encoders.0/encoders.0.0/sg/Mul_output_0"]
    assert 0.3 < gate.mean() < 1.0  # positive-mean activations into the integral image


def test_nafnet_ort_time(nafnet: onnx.ModelProto, nafnet_feeds: dict[str, np.ndarray]) -> None:
    start = time.perf_counter()
    y = run(nafnet, nafnet_feeds)["output"]
    assert y.shape == (1, 3, 512, 512)
    assert time.perf_counter() - start < 5.0  # measured ~0.25 s on 2 CPU cores


def test_nafnet_dynamic_matches_static(nafnet: onnx.ModelProto, nafnet_feeds: dict[str, np.ndarray]) -> None:
    dynamic = build_nafnet(dynamic=True)
    dims = [d.dim_param for d in dynamic.graph.input[0].type.tensor_type.shape.dim[2:]]
    assert dims == ["height", "width"]
    np.testing.assert_array_equal(run(dynamic, nafnet_feeds)["output"], run(nafnet, nafnet_feeds)["output"])
    other = np.random.default_rng(3).uniform(0, 1, (1, 3, 400, 450)).astype(np.float32)
    assert run(dynamic, {"input": other})["output"].shape == (1, 3, 400, 450)


def _nafnet_avg_pool(x: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """megvii NAFNet ``AvgPool2d.forward`` (non-fast path, auto_pad), transcribed to numpy in float64."""
    _, _, h, w = x.shape
    s = x.astype(np.float64).cumsum(-1).cumsum(-2)
    s = np.pad(s, ((0, 0), (0, 0), (1, 0), (1, 0)))
    k1, k2 = min(h, kernel[0]), min(w, kernel[1])
    s1, s2, s3, s4 = s[:, :, :-k1, :-k2], s[:, :, :-k1, k2:], s[:, :, k1:, :-k2], s[:, :, k1:, k2:]
    out = (s4 + s1 - s2 - s3) / (k1 * k2)
    _h, _w = out.shape[2:]
    pads = ((0, 0), (0, 0), ((h - _h) // 2, (h - _h + 1) // 2), ((w - _w) // 2, (w - _w + 1) // 2))
    return np.pad(out, pads, mode="edge")


@pytest.mark.parametrize("kernel", [(32, 40), (31, 17), (100, 100)])
def test_nafnet_sca_matches_reference_avg_pool(kernel: tuple[int, int]) -> None:
    model = build_nafnet(height=64, width=48, kernel=kernel, blocks=1)
    sca = "/encoders.0/encoders.0.0/sca/sca.0/"
    gate, pooled = "/encoders.0/encoders.0.0/sg/Mul_output_0", f"{sca}Pad_1_output_0"
    out = run(model, demo_inputs(model), [gate, pooled])
    np.testing.assert_allclose(out[pooled], _nafnet_avg_pool(out[gate], kernel), rtol=1e-4, atol=1e-5)


# --- residual GroupNorm -------------------------------------------------------------------------------------

def test_residual_groupnorm_overflows_only_at_the_add() -> None:
    model = build_residual_groupnorm()
    conv_in, conv1, add = "/conv_in/Conv_output_0", "/block/conv1/Conv_output_0", "/block/Add_output_0"
    order = node_outputs(model)
    assert [n.op_type for n in model.graph.node if n.name.startswith("/norm/")] == [
        "Shape", "Reshape", "InstanceNormalization", "Reshape", "Mul", "Add"]
    out = run(model, demo_inputs(model), order[:-1])
    assert 1.5 * FP16_MAX < absmax(out[add]) < 2.5e5  # measured 1.07e5
    assert next(t for t in order[:-1] if absmax(out[t]) > FP16_MAX) == add
    assert absmax(out[conv_in]) < FP16_MAX and absmax(out[conv1]) < FP16_MAX
    y = out["output"]
    assert np.isfinite(y).all() and absmax(y) < 10  # measured 2.48
    # Each addend fits in FP16; their FP16 sum does not.
    with np.errstate(over="ignore"):
        summed = out[conv_in].astype(np.float16) + out[conv1].astype(np.float16)
    assert np.isinf(summed).any()


# --- integral box filter ------------------------------------------------------------------------------------

def test_box_filter_matches_the_notes() -> None:
    model = build_integral_box_filter()
    feeds = demo_inputs(model)
    names = ["/conv/Conv_output_0", "cs_h", "integral", "A", "B", "Cc", "D", "AB", "ABC", "box"]
    out = run(model, feeds, names)
    # The notes (U(0,1)*4 input, weights 4x smaller): integral 143,480 with 158,540 values over 65504,
    # cs_h 570, AB 1,708, box 22.7. Measured here: 1.42e5, 154,841 over, 565, 1,685, 22.4.
    assert 1.3e5 < absmax(out["integral"]) < 1.6e5
    assert 0.13 < np.mean(out["integral"] > FP16_MAX) < 0.17
    for small in ("cs_h", "AB", "box"):
        assert absmax(out[small]) < 2000
    for big in ("A", "B", "Cc", "D", "ABC"):
        assert absmax(out[big]) > FP16_MAX
    conv = out["/conv/Conv_output_0"].astype(np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(conv, (3, 3), axis=(2, 3))[:, :, 1:, 1:]
    np.testing.assert_allclose(out["box"], windows.sum(axis=(-2, -1)), rtol=1e-3, atol=2e-2)
    assert out["y"].shape == (1, 8, 253, 253) and np.isfinite(out["y"]).all()


# --- small models -------------------------------------------------------------------------------------------

def test_cumsum_chain_overflows_only_when_scaled() -> None:
    feeds = {"x": np.random.default_rng(0).uniform(0, 1, (1, 4096)).astype(np.float32)}
    plain = run(build_cumsum_chain(), feeds, ["/CumSum_output_0"])
    assert absmax(plain["/CumSum_output_0"]) < FP16_MAX
    scaled = run(build_cumsum_chain(scale=64.0), feeds, ["/CumSum_output_0"])
    assert absmax(scaled["/CumSum_output_0"]) > FP16_MAX
    np.testing.assert_allclose(scaled["y"], np.cumsum(feeds["x"] * 64.0, axis=1) / 4096, rtol=1e-5)


def test_mlp_is_clean() -> None:
    model = build_mlp()
    out = run(model, demo_inputs(model), node_outputs(model)[:-1])
    assert max(absmax(v) for v in out.values()) < 10
