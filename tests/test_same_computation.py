"""A canonical form proved to compute what the original does (canonical.same_computation), without a run."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite import canonical as canonical_module
from onnx_fp16_rewrite.canonical import PROVED, canonicalize, computes_as_given
from onnx_fp16_rewrite.canonical.same_computation import different_computation
from onnx_fp16_rewrite.io.ort_runner import run_model


@pytest.fixture(scope="session")
def cache_root(request) -> str:  # the corpus tests' export cache (test_exported_corpus)
    return os.environ.get("ONNX_FP16_REWRITE_CACHE") or str(request.config.cache.mkdir("onnx-fp16-rewrite"))


def _scaled_attention(scale_op: str) -> onnx.ModelProto:
    """x [2, 4, 8] (dims symbolic) scaled by 1 / sqrt(last dim) computed from Shape (``Sqrt``, or
    ``Pow`` 0.5), then reshaped with a shape built from Shape/Gather/Concat: what exports write."""
    i = lambda v, n: numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "two"], ["d"], name="d", axis=0),
        helper.make_node("Cast", ["d"], ["d_f"], name="d_f", to=TensorProto.FLOAT),
        (helper.make_node("Sqrt", ["d_f"], ["root"], name="root") if scale_op == "Sqrt"
         else helper.make_node("Pow", ["d_f", "half"], ["root"], name="root")),
        helper.make_node("Div", ["x", "root"], ["scaled"], name="scale"),
        helper.make_node("Gather", ["shape", "zero"], ["b"], name="b", axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"], name="b1"),
        helper.make_node("Concat", ["b1", "minus_one"], ["new_shape"], name="new_shape", axis=0),
        helper.make_node("Reshape", ["scaled", "new_shape"], ["flat"], name="flat"),
        helper.make_node("Cast", ["flat"], ["y"], name="noop_cast", to=TensorProto.FLOAT),  # a .to(float32)
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", "dim"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [i(2, "two"), i(0, "zero"), i([0], "axes0"), i([-1], "minus_one"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds():
    return [{"x": np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)}]


def _count_original_runs(monkeypatch):
    runs = []
    real = canonical_module._LazyValidator.get
    monkeypatch.setattr(canonical_module._LazyValidator, "get", lambda self: runs.append(1) or real(self))
    return runs


def test_exact_shape_arithmetic_is_proved_without_running_the_original(monkeypatch):
    model, feeds = _scaled_attention("Sqrt"), _feeds()
    runs = _count_original_runs(monkeypatch)
    canonical, report = canonicalize(model, feeds)
    assert report.specialised and report.casts_removed == ["noop_cast"]
    assert not any(n.op_type in ("Shape", "Sqrt", "Concat") for n in canonical.graph.node)
    assert report.validation == PROVED and computes_as_given(report) and runs == []
    # What the proof claims: the same FP32 outputs, bit for bit.
    got, want = run_model(canonical, feeds)[0]["y"], run_model(model, feeds)[0]["y"]
    assert np.array_equal(got, want)


def test_a_value_an_implementation_may_round_differently_is_validated_by_a_run(monkeypatch):
    model, feeds = _scaled_attention("Pow"), _feeds()
    runs = _count_original_runs(monkeypatch)
    canonical, report = canonicalize(model, feeds)
    assert report.specialised and not any(n.op_type == "Pow" for n in canonical.graph.node)
    assert report.validation.startswith("FP32 outputs match the original") and runs
    assert not computes_as_given(report)


def test_a_changed_float_constant_or_node_is_not_proved():
    model = _scaled_attention("Sqrt")
    other = onnx.ModelProto()
    other.CopyFrom(model)
    assert different_computation(model, other) is None
    other.graph.node[4].op_type = "Mul"  # x * root instead of x / root
    assert "computed differently" in different_computation(model, other)
    other.CopyFrom(model)
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(1, np.int64), "two"))
    assert "computed differently" in different_computation(model, other)


def test_deferred_confirmation_needs_no_run_when_proved(monkeypatch):
    """fix's path: the validation would wait for the first diagnosis' outputs; proved, nothing waits."""
    runs = _count_original_runs(monkeypatch)
    canonical, report = canonicalize(_scaled_attention("Sqrt"), _feeds(), confirm_later=True)
    assert canonical_module.confirm(report, canonical, None) and runs == []
    assert not canonical_module.unconfirmed(report) and report.validation == PROVED


@pytest.mark.parametrize("name, exporter", [("vae-decoder", "torchscript"), ("vae-decoder", "dynamo"),
                                            ("t5-encoder-dynamic", "torchscript"), ("bert", "torchscript"),
                                            ("gpt2-eager", "torchscript"), ("guided-filter", "dynamo")])
def test_exported_models_proved_compute_as_given_bit_for_bit(name, exporter, cache_root):
    """On real exports: wherever a canonical form is proved, the original's FP32 outputs are its own."""
    from onnx_fp16_rewrite.models import exported

    model = exported.build(name, exporter, cache_root=cache_root)
    feeds = exported.feeds(name, model)[:1]
    canonical, report = canonicalize(model, feeds)
    if not computes_as_given(report):
        assert report.validation.startswith("FP32 outputs match the original"), report.validation
        return
    want, got = run_model(model, feeds)[0], run_model(canonical, feeds)[0]
    assert all(np.array_equal(want[k], got[k], equal_nan=True) for k in want)
