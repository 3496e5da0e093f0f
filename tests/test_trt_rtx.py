"""Our claims checked against TensorRT-RTX's real ONNX parser and builder.

Runs where ``tensorrt_rtx`` imports (the GPU machine, see README "What was tested where"); skipped
elsewhere. Nothing here stands in for TensorRT: every assertion is about what the real parser and
builder did. TensorRT-RTX builds on any NVIDIA GPU but runs engines only on the compute
capabilities it supports, so running is asserted only where the GPU supports it; elsewhere the
refusal itself is asserted (one line, exit 6, "not verified").
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tensorrt_rtx")
pytest.importorskip("polygraphy")

from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan  # noqa: E402
from onnx_fp16_rewrite.emit.trtexec import parse_layer_precision_spec  # noqa: E402
from onnx_fp16_rewrite.fix import EXIT_NOT_VERIFIED, fix_model  # noqa: E402
from onnx_fp16_rewrite.io.model_io import save_model  # noqa: E402
from onnx_fp16_rewrite.models import DEMO_MODELS, failure_patterns  # noqa: E402
from onnx_fp16_rewrite.passes import ProtectFp32  # noqa: E402
from onnx_fp16_rewrite.pipeline.registry import auto_rewrites  # noqa: E402
from onnx_fp16_rewrite.tensorrt.trt_backend import (  # noqa: E402
    check_trt,
    has_fp16_tensors,
    profile_shapes,
    require_tensorrt,
)
from onnx_fp16_rewrite.tensorrt.trt_build import build_engine, parse_layers  # noqa: E402

# Where the survey of parse/build results goes (the GPU run writes it under $OUT for the notes).
SURVEY = os.environ.get("TRT_RTX_SURVEY")


def _models() -> dict:
    from onnx_fp16_rewrite.models import gpt2_attention, nafnet, sd_vae_decoder, t5_encoder
    from onnx_fp16_rewrite.models.guided_filter import build_guided_filter

    def with_demo(module, builder):
        model = builder()
        return model, [module.demo_inputs(model)]

    return {
        "nafnet-demo": lambda: with_demo(nafnet, DEMO_MODELS["nafnet"]),
        "residual-groupnorm": lambda: with_demo(nafnet, DEMO_MODELS["residual-groupnorm"]),
        "box-filter": lambda: with_demo(nafnet, DEMO_MODELS["box-filter"]),
        "guided-filter": lambda: with_demo(nafnet, lambda: build_guided_filter(size=224)),
        "t5-encoder": lambda: with_demo(t5_encoder, t5_encoder.build_t5_encoder),
        "gpt2-attention": lambda: with_demo(gpt2_attention, gpt2_attention.build_gpt2_attention),
        "sd-vae-decoder": lambda: with_demo(sd_vae_decoder, sd_vae_decoder.build_sd_vae_decoder),
        "integral-1024": lambda: failure_patterns.build_integral_mean(size=1024),
        "rmsnorm-pow": failure_patterns.build_rmsnorm_pow,
        "attention-logits": failure_patterns.build_attention_logits,
        "causal-linear-attention": failure_patterns.build_causal_linear_attention,
        "masked-sentinels": failure_patterns.build_masked_sentinels,
    }


MODELS = _models()


def _record(entry: dict) -> None:
    if SURVEY:
        with open(SURVEY, "a") as f:
            f.write(json.dumps(entry) + "\n")


def test_the_library_is_tensorrt_rtx():
    library = require_tensorrt()
    if library.module == "tensorrt":
        pytest.skip("standard TensorRT is installed too and is preferred; set POLYGRAPHY_USE_TENSORRT_RTX=1")
    assert library.is_rtx and library.label.startswith("TensorRT-RTX 1.")
    from polygraphy import config

    assert config.USE_TENSORRT_RTX  # Polygraphy drives TensorRT-RTX, not a second backend of ours


@pytest.mark.parametrize("name", MODELS)
def test_mixed_emission_parses_and_builds(name, tmp_path):
    """fix --auto --emit mixed on every test model: the emitted strongly typed model parses and builds,
    and the FP16 tensors it declares come out of the parser as HALF layers."""
    model, feeds = MODELS[name]()
    result = fix_model(model, [], feeds, auto=True, auto_rewrites=auto_rewrites(), emit="mixed")
    path = save_model(result.model, tmp_path / f"{name}.mixed.onnx")
    assert has_fp16_tensors(result.model)
    built = build_engine(str(path), fp16_flag=False, strongly_typed=True, plan=None, shapes={})
    half = sum("HALF" in layer.output_types for layer in built.layers)
    _record({"model": name, "emit": "mixed", "parsed": True, "built": True, "layers": len(built.layers),
             "half_layers": half, "parse_s": built.parse_seconds, "build_s": built.build_seconds,
             "engine_bytes": len(built.engine), "fp32_nodes": len(PrecisionPlan.from_model(result.model)),
             "emulation_passed": result.report.fp16_after.passed})
    assert len(built.engine) > 0 and built.layers
    assert half > 0  # the engine really computes in FP16 somewhere


def _weak_line_layer_names(argv: list[str]) -> list[str]:
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--layerPrecisions=")), "")
    return list(parse_layer_precision_spec(spec)) if spec else []


@pytest.mark.parametrize("name", ["nafnet-demo", "integral-1024", "rmsnorm-pow", "causal-linear-attention"])
def test_pinned_names_in_layer_precisions_are_layer_names(name, tmp_path):
    """Every node a --layerPrecisions line names is a layer of TensorRT's parse of that model
    (exactly its name), for a hand-given pin (protect-fp32 --match sca) and for --auto without rewrites."""
    model, feeds = MODELS[name]()
    passes = [ProtectFp32(match="sca")] if name == "nafnet-demo" else []
    # auto_rewrites=(): pinning only (the rewrites leave these models with nothing to pin)
    result = fix_model(model, passes, feeds, auto=not passes, auto_rewrites=(), emit="fp32")
    names = _weak_line_layer_names(result.report.trtexec_argv)
    plan = PrecisionPlan.from_model(result.model)
    path = save_model(result.model, tmp_path / f"{name}.fp32.onnx")
    layers = {layer.name for layer in parse_layers(str(path), strongly_typed=True)}
    missing = sorted(set(names) - layers)
    _record({"model": name, "emit": "fp32", "pinned": len(plan), "layer_precision_names": len(names),
             "missing_from_parse": missing})
    assert names, "the plan pins nodes, so the line must name layers"
    assert not missing


def _norm_model(op: str, opset: int, fp16: bool) -> onnx.ModelProto:
    """x[2,8,4,4] -> <op> -> y, with the op's scale/bias at the model's float type."""
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    dtype = np.float16 if fp16 else np.float32
    rng = np.random.default_rng(0)
    if op == "GroupNormalization":
        attrs, scale_shape, axis_inputs = {"num_groups": 2, "epsilon": 1e-5}, (8,), ["scale", "bias"]
    elif op == "LayerNormalization":
        attrs, scale_shape, axis_inputs = {"axis": -1, "epsilon": 1e-5}, (4,), ["scale", "bias"]
    else:  # RMSNormalization
        attrs, scale_shape, axis_inputs = {"axis": -1, "epsilon": 1e-5}, (4,), ["scale"]
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, scale_shape).astype(dtype), "scale"),
             numpy_helper.from_array(rng.uniform(-0.1, 0.1, scale_shape).astype(dtype), "bias")]
    inits = [i for i in inits if i.name in axis_inputs]
    node = helper.make_node(op, ["x", *axis_inputs], ["y"], name=f"/norm/{op}", **attrs)
    graph = helper.make_graph([node], "norm", [helper.make_tensor_value_info("x", elem, [2, 8, 4, 4])],
                              [helper.make_tensor_value_info("y", elem, [2, 8, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 23 else 9)


@pytest.mark.parametrize(("op", "opset"), [("LayerNormalization", 17), ("GroupNormalization", 21),
                                           ("RMSNormalization", 23)])
@pytest.mark.parametrize("fp16", [True, False], ids=["fp16", "fp32"])
def test_normalization_ops_our_rewrites_emit_are_accepted(op, opset, fp16, tmp_path):
    """fuse-normalization emits these ops at these opsets; the real parser must accept and build them."""
    model = _norm_model(op, opset, fp16)
    onnx.checker.check_model(model, full_check=True)
    path = save_model(model, tmp_path / f"{op}.onnx")
    built = build_engine(str(path), fp16_flag=False, strongly_typed=True, plan=None, shapes={})
    kinds = sorted({layer.kind for layer in built.layers})
    _record({"op": op, "opset": opset, "fp16": fp16, "parsed": True, "built": True, "layer_kinds": kinds,
             "layers": [(layer.kind, layer.output_types) for layer in built.layers]})
    assert built.layers and len(built.engine) > 0
    if op != "RMSNormalization":  # imported as one INormalizationLayer (TensorRT computes it in FP32 inside)
        assert "NORMALIZATION" in kinds


def test_check_backend_trt_builds_and_says_why_it_did_not_run(tmp_path):
    """CLI: `check --backend trt` on the mixed demo. Where the GPU cannot run TensorRT-RTX engines
    (compute capability 9.0 here): parsed ok, built ok, one stderr line, exit 6; never a traceback."""
    fixed = tmp_path / "nafnet_mixed.onnx"
    fix = subprocess.run([sys.executable, "-m", "onnx_fp16_rewrite", "fix", "--demo", "nafnet", "-o", str(fixed),
                          "--emit", "mixed"], capture_output=True, text=True)
    assert fix.returncode == 0, fix.stderr
    proc = subprocess.run([sys.executable, "-m", "onnx_fp16_rewrite", "check", str(fixed), "--backend", "trt"],
                          capture_output=True, text=True)
    _record({"cli": "check --backend trt", "model": "nafnet mixed", "exit": proc.returncode,
             "stdout": proc.stdout[-1500:], "stderr": proc.stderr[-1500:]})
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout.startswith("TensorRT-RTX 1.")
    assert "parsed: ok" in proc.stdout and "built: ok (strongly typed" in proc.stdout
    if proc.returncode == EXIT_NOT_VERIFIED:
        assert "NOT VERIFIED" in proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "could not be run here" in lines[0], proc.stderr
    else:  # a GPU TensorRT-RTX supports: the engine ran, and the verdict is PASS or FAIL
        assert proc.returncode in (0, 4), proc.stderr


def test_fix_verify_trt_on_the_demo(tmp_path):
    """fix --verify trt, mixed emit: built by TensorRT-RTX; not verified (exit 6) where it cannot run."""
    model = DEMO_MODELS["nafnet"]()
    from onnx_fp16_rewrite.models.nafnet import demo_inputs

    result = fix_model(model, [], [demo_inputs(model)], auto=True, auto_rewrites=auto_rewrites(), emit="mixed",
                       verify="trt")
    trt = result.report.trt_after
    assert trt is not None and trt.mode == "strong"
    assert any(n.startswith("parsed: ok") for n in trt.notes)
    if trt.not_verified:
        assert result.report.exit_code == EXIT_NOT_VERIFIED and not trt.outputs
        assert "compute capability" in trt.not_verified
    else:
        out = trt.outputs[0]
        assert out.nan == 0 and out.inf == 0


def test_fp32_model_is_not_built_weakly(tmp_path):
    """TensorRT-RTX has no weakly typed FP16 mode: an FP32 model with a plan builds FP32 and says so."""
    model = DEMO_MODELS["nafnet"]()
    from onnx_fp16_rewrite.models.nafnet import demo_inputs

    result = fix_model(model, [ProtectFp32(match="sca")], [demo_inputs(model)], emit="fp32")
    path = save_model(result.model, tmp_path / "fp32.onnx")
    report = check_trt(result.model, [demo_inputs(model)], model_path=str(path))
    assert report.mode == "fp32"
    assert "no weakly typed FP16 mode" in report.notes[0] and "fix --emit mixed" in report.notes[0]
    assert "parsed: ok" in report.notes[1]
    shlex.join(result.report.trtexec_argv)  # the printed line is still well-formed


def _carried_models() -> list[Path]:
    folder = os.environ.get("TRT_RTX_MODELS")
    return sorted(Path(folder).glob("*.onnx")) if folder else []


@pytest.mark.parametrize("path", _carried_models(), ids=lambda p: p.name)
def test_corpus_mixed_emission_parses_and_builds(path):
    """The corpus of library exports, fixed (fix --auto --emit mixed) where the exporters are installed
    (benchmarks/trt_rtx_corpus.py) and carried here: each emitted model parses and builds."""
    built = build_engine(str(path), fp16_flag=False, strongly_typed=True, plan=None, shapes=_static_or_feed_shapes(path))
    half = sum("HALF" in layer.output_types for layer in built.layers)
    _record({"corpus": path.name, "parsed": True, "built": True, "layers": len(built.layers), "half_layers": half,
             "parse_s": built.parse_seconds, "build_s": built.build_seconds})
    assert built.layers and len(built.engine) > 0 and half > 0


def _static_or_feed_shapes(path: Path) -> dict:
    """A one-shape profile for dynamic inputs, from the feed shapes the fix was validated on
    (summary.json beside the models)."""
    summary = json.loads((path.parent / "summary.json").read_text()).get(path.name, {})
    model = onnx.load(str(path), load_external_data=False)
    return profile_shapes(model, [{k: np.empty(s, np.float32) for k, s in summary["shapes"].items()}])
