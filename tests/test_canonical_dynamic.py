"""Dynamic and -1 dims end to end: check/fix accept any consistent feed, FLOPs on the run's shapes."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from canonical_exports import conv_stack_module, export, rand, torch_flops
from onnx_fp16_rewrite.analysis.flops import fp16_flop_fraction
from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.passes import ProtectFp32

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def paddle_like(tmp_path_factory):
    """A conv stack whose input is declared [-1, 3, ?, ?], as Paddle exports declare it."""
    import torch

    folder = tmp_path_factory.mktemp("dyn")
    module = conv_stack_module()
    model = export(module, (torch.rand(1, 3, 16, 16),), folder / "stack.onnx", input_names=["x"],
                   output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = -1
    dims[2].Clear()
    dims[3].Clear()  # "?": no value, no name
    path = folder / "paddle_like.onnx"
    onnx.save(model, str(path))
    return module, model, path


def test_check_accepts_a_consistent_feed_and_refuses_a_wrong_one(paddle_like, tmp_path, capsys):
    _, _, path = paddle_like
    np.savez(tmp_path / "x.npz", x=rand(1, 3, 48, 192))
    assert main(["check", str(path), "--inputs", str(tmp_path / "x.npz")]) == 0
    assert "FP16 emulation: PASS" in capsys.readouterr().out
    np.savez(tmp_path / "bad.npz", x=rand(1, 4, 48, 192))
    assert main(["check", str(path), "--inputs", str(tmp_path / "bad.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has shape [1, 4, 48, 192], the model wants [?,3,?,?]" in err


def test_shape_hint_is_accepted(paddle_like, capsys):
    _, _, path = paddle_like
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    hint = err.split("give --shape ")[1].split(" ")[0]
    assert hint == "x:1x3x64x64"
    assert main(["check", str(path), "--shape", hint]) == 0


def test_flop_fraction_on_run_shapes_matches_an_independent_count(paddle_like, caplog):
    import torch

    module, model, _ = paddle_like
    x = rand(1, 3, 48, 192)
    convs, relus = torch_flops(module, torch.from_numpy(x))
    total = sum(convs.values()) + relus
    expected = 1 - convs["conv2"] / total  # conv2 pinned
    with caplog.at_level(logging.WARNING, logger="onnx_fp16_rewrite.analysis.flops"):
        result = fix_model(model, [ProtectFp32(op_types=(), nodes=("/conv2/Conv",), grow=False)], [{"x": x}],
                           emit="fp32")
    rep = result.report
    assert PrecisionPlan.from_model(result.model).fp32_nodes.keys() == {"/conv2/Conv"}
    assert rep.fp16_flop_fraction == pytest.approx(expected, rel=1e-2)
    assert abs(rep.fp16_flop_fraction - expected) < 1e-9  # the same rules on the same shapes: exact
    assert "unknown shapes" not in caplog.text
    # Without the run's shapes every dynamic dim is unknown: the fraction would be meaningless.
    assert fp16_flop_fraction(result.model) == 0.0
    # The emitted model still takes another shape.
    other = {"x": rand(2, 3, 20, 36)}
    np.testing.assert_allclose(run_model(result.model, [other])[0]["y"], run_model(model, [other])[0]["y"],
                               rtol=1e-5, atol=1e-5)


def test_fix_cli_on_minus_one_dims_prints_the_traced_fraction(paddle_like, tmp_path, capsys):
    _, _, path = paddle_like
    np.savez(tmp_path / "x.npz", x=rand(1, 3, 48, 192))
    out = tmp_path / "fixed.onnx"
    code = main(["fix", str(path), "--inputs", str(tmp_path / "x.npz"), "-o", str(out), "--emit", "fp32"])
    text = capsys.readouterr()
    assert code == 0, text
    assert "FP16 FLOP fraction: 100.0%" in text.out
    assert text.out.count("unknown shapes") + text.err.count("unknown shapes") == 0
    fixed = onnx.load(str(out))
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    assert not any(d.HasField("dim_value") and d.dim_value != 3 for d in dims)  # still dynamic


def test_mixed_emission_of_a_dynamic_export_keeps_its_dims(tmp_path):
    import torch

    from canonical_exports import padded_attention_module

    dynamic = {"x": {0: "N", 2: "H", 3: "W"}, "v": {0: "B", 1: "T"}}
    model = export(padded_attention_module(), (torch.rand(1, 3, 8, 12), torch.rand(2, 5, 16)), tmp_path / "p.onnx",
                   input_names=["x", "v"], output_names=["y", "h"], dynamic_axes=dynamic)
    feeds = [{"x": rand(1, 3, 8, 12), "v": rand(2, 5, 16, seed=1)}]
    result = fix_model(model, [], feeds, auto=True, emit="mixed", keep_io_types=True)
    rep = result.report
    assert rep.exit_code == 0 and rep.canonical.specialised and rep.canonical.emitted_dynamic
    assert rep.canonical.folded == 36 and rep.canonical.casts_removed == ["/Cast_2"]
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in result.model.graph.initializer)
    other = [{"x": rand(2, 3, 20, 36, seed=5), "v": rand(3, 9, 16, seed=6)}]
    got, want = run_model(result.model, other)[0], run_model(model, other)[0]
    for name in ("y", "h"):  # FP16 weights and activations: FP16-level agreement on a new shape
        assert got[name].shape == want[name].shape
        rel = np.linalg.norm(got[name] - want[name]) / np.linalg.norm(want[name])
        assert rel < 2e-3, (name, rel)
