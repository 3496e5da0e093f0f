"""TensorRT backend. Without TensorRT: version dispatch, plan -> layer precisions (as data), profile
shapes, the trtexec subcommand and the missing-TensorRT error. With TensorRT (importorskip, GPU
machines only): the NAFNet-style demo end to end. No stand-in for TensorRT is used anywhere."""

import importlib.util
import logging
import shlex
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.models import DEMO_MODELS
from onnx_fp16_rewrite.models.nafnet import build_nafnet, demo_inputs
from onnx_fp16_rewrite.cli import build_parser, main
from onnx_fp16_rewrite.errors import TensorRTUnavailableError
from onnx_fp16_rewrite.io.model_io import save_model
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.tensorrt.trt_backend import (
    NOT_INSTALLED,
    LayerInfo,
    choose_build,
    count_layers,
    has_fp16_tensors,
    map_plan_to_layers,
    parse_trt_version,
    profile_shapes,
    require_tensorrt,
    trtexec_mode,
)
from onnx_fp16_rewrite.emit.trtexec import parse_layer_precision_spec, trtexec_command

HAVE_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
needs_no_trt = pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the missing-TensorRT path cannot run")


# --- version dispatch ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "parsed"), [("10.8.0.43", (10, 8)), ("10.13.0.35", (10, 13)), ("11.0.0", (11, 0)),
                                             (" 10.3.0.post1", (10, 3))])
def test_parse_trt_version(text, parsed):
    assert parse_trt_version(text) == parsed


def test_parse_trt_version_refuses_garbage():
    with pytest.raises(ValueError, match="cannot read"):
        parse_trt_version("ten")


@pytest.mark.parametrize(
    ("version", "fp16_model", "pinned", "expected", "reason"),
    [
        ("10.3.0.26", False, 26, ("weak", True, False, True), "26 pinned node(s) become FP32 layers under OBEY"),
        ("10.7.0.23", False, 0, ("weak", True, False, False), "without a precision plan"),
        ("10.12.0.36", False, 4, ("weak", True, False, True), "deprecated since TensorRT 10.12"),
        ("10.8.0.43", True, 26, ("strong", False, True, False), "STRONGLY_TYPED"),
        ("11.0.0.114", True, 0, ("strong", False, False, False), "always strongly typed"),
        ("11.1.0", False, 26, ("fp32", False, False, False), "fix --emit mixed"),
    ],
)
def test_choose_build(version, fp16_model, pinned, expected, reason):
    choice = choose_build(version, model_has_fp16=fp16_model, pinned=pinned)
    assert (choice.mode, choice.fp16_flag, choice.strongly_typed_flag, choice.layer_precisions) == expected
    assert reason in choice.reason and choice.trt_version == version


@pytest.mark.parametrize("minor", range(0, 16))
@pytest.mark.parametrize("major", [10, 11, 12])
@pytest.mark.parametrize("fp16_model", [False, True])
def test_dispatch_never_mixes_typing_flags(major, minor, fp16_model):
    choice = choose_build(f"{major}.{minor}.0", model_has_fp16=fp16_model, pinned=3)
    assert not (choice.fp16_flag and choice.strongly_typed_flag)  # trtexec disables FP16 under strong typing
    assert choice.layer_precisions == (choice.mode == "weak")    # strongly typed networks reject them
    if major >= 11:  # no FP16 flag; STRONGLY_TYPED is deprecated and ignored
        assert not choice.fp16_flag and not choice.strongly_typed_flag
    else:
        assert choice.mode == ("strong" if fp16_model else "weak")


def test_tensorrt_8_is_refused_with_exit_5():
    with pytest.raises(TensorRTUnavailableError, match="needs TensorRT >= 10.0") as info:
        choose_build("8.6.1.6", model_has_fp16=False)
    assert info.value.exit_code == 5


# --- plan -> layer precisions, as data ---------------------------------------------------------

SCA = "/encoders.0/encoders.0.0/sca/sca.0"
PLAN = PrecisionPlan({f"{SCA}/CumSum": "r", f"{SCA}/CumSum_1": "r", f"{SCA}/Slice": "r", f"{SCA}/Div": "r",
                      f"{SCA}/Constant_3_output_0": "r"})


def _layers_10_8():
    """Layers as onnx-tensorrt >= 10.8 names them: one layer per node, named after it; helpers are
    ONNXTRT_* or unnamed."""
    return [
        LayerInfo("/intro/Conv", "CONVOLUTION", ("FLOAT",)),
        LayerInfo(f"{SCA}/CumSum", "CUMULATIVE", ("FLOAT",)),
        LayerInfo(f"{SCA}/CumSum_1", "CUMULATIVE", ("FLOAT",)),
        LayerInfo("ONNXTRT_unsqueezeTensor_12", "SHUFFLE", ("FLOAT",)),
        LayerInfo(f"{SCA}/Slice", "SLICE", ("FLOAT",)),
        LayerInfo(f"{SCA}/Div", "ELEMENTWISE", ("FLOAT",)),
        LayerInfo(f"{SCA}/Constant_3_output_0", "CONSTANT", ("FLOAT",)),
        LayerInfo("(Unnamed Layer* 40) [Shape]", "SHAPE", ("INT64",)),
    ]


def test_pinned_nodes_pin_exactly_their_layers():
    mapping = map_plan_to_layers(PLAN, _layers_10_8())
    assert mapping.fp32 == {f"{SCA}/CumSum": (0,), f"{SCA}/CumSum_1": (0,), f"{SCA}/Slice": (0,), f"{SCA}/Div": (0,)}
    assert list(mapping.skipped) == [f"{SCA}/Constant_3_output_0"] and "CONSTANT" in mapping.skipped[f"{SCA}/Constant_3_output_0"]
    assert mapping.unmatched == []
    assert count_layers(_layers_10_8(), "weak", mapping.fp32) == (2, 4)  # intro Conv + helper shuffle stay FP16


def test_loop_cumsum_on_10_7_names_no_layer():
    layers = [info for info in _layers_10_8() if info.kind != "CUMULATIVE"] + [
        LayerInfo("(Unnamed Layer* 7) [TripLimit]", "TRIP_LIMIT", ()),
        LayerInfo("(Unnamed Layer* 8) [Recurrence]", "RECURRENCE", ("FLOAT",)),
        LayerInfo("(Unnamed Layer* 9) [ElementWise]", "ELEMENTWISE", ("FLOAT",)),
    ]
    mapping = map_plan_to_layers(PLAN, layers)
    assert mapping.unmatched == [f"{SCA}/CumSum", f"{SCA}/CumSum_1"]
    assert set(mapping.fp32) == {f"{SCA}/Slice", f"{SCA}/Div"}


def test_matching_is_exact_and_keeps_every_float_output():
    plan = PrecisionPlan({"/a/CumSum": "r", "/a/Split": "r", "/blk:0/x,y": "r"})
    layers = [LayerInfo("/a/CumSum_1", "CUMULATIVE", ("FLOAT",)),       # another node's layer: not pinned
              LayerInfo("/a/Split", "SLICE", ("FLOAT", "FLOAT")),
              LayerInfo("/a/ArgMax", "TOPK", ("FLOAT", "INT32")),
              LayerInfo("/blk:0/x,y", "ELEMENTWISE", ("FLOAT",))]      # Python sets it; trtexec could not
    mapping = map_plan_to_layers(plan, layers)
    assert mapping.fp32 == {"/a/Split": (0, 1), "/blk:0/x,y": (0,)}
    assert mapping.unmatched == ["/a/CumSum"]


def test_count_layers_by_mode():
    layers = [LayerInfo("a", "CAST", ("HALF",)), LayerInfo("b", "ELEMENTWISE", ("FLOAT",)),
              LayerInfo("c", "CONSTANT", ("HALF",)), LayerInfo("d", "SHAPE", ("INT64",))]
    assert count_layers(layers, "strong", {}) == (1, 1)
    assert count_layers(layers, "weak", {"b": (0,)}) == (1, 1)
    assert count_layers(layers, "fp32", {}) == (0, 2)


def test_fixed_nafnet_plan_maps_to_its_sca_layers():
    """The real plan of `fix --match sca`, against a layer list named after the model's nodes
    (the 10.8+ parser's naming): every pinned node reaches its layer, nothing else is pinned."""
    from onnx_fp16_rewrite.passes import ProtectFp32
    from onnx_fp16_rewrite.fix import fix_model

    model = DEMO_MODELS["nafnet"]()
    fixed = fix_model(model, [ProtectFp32(match="sca")], [demo_inputs(model)]).model
    plan = PrecisionPlan.from_model(fixed)
    layers = [LayerInfo(n.name, n.op_type.upper(), ("FLOAT",)) for n in fixed.graph.node]
    mapping = map_plan_to_layers(plan, layers)
    assert set(mapping.fp32) == set(plan.fp32_nodes) and mapping.unmatched == []
    assert all("/sca/" in name for name in mapping.fp32)


# --- model inspection helpers ------------------------------------------------------------------

def test_profile_shapes_span_the_feeds():
    assert profile_shapes(DEMO_MODELS["nafnet"](), [demo_inputs(DEMO_MODELS["nafnet"]())]) == {}
    dynamic = build_nafnet(dynamic=True, blocks=1)
    feeds = [{"input": np.zeros((1, 3, 400, 512), np.float32)}, {"input": np.zeros((1, 3, 448, 384), np.float32)}]
    assert profile_shapes(dynamic, feeds) == {"input": ((1, 3, 400, 384), (1, 3, 400, 512), (1, 3, 448, 512))}


def test_trtexec_mode():
    assert trtexec_mode("auto", True) == ("strong", [])
    assert trtexec_mode("auto", False) == ("weak", [])
    mode, warnings = trtexec_mode("strong", False)
    assert mode == "strong" and "entirely in FP32" in warnings[0]
    mode, warnings = trtexec_mode("weak", True)
    assert mode == "weak" and "Casts as hints" in warnings[0]


# --- CLI: trtexec ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixed_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fixed")
    paths = {}
    for emit in ("fp32", "mixed"):
        paths[emit] = folder / f"nafnet {emit}.onnx"  # a space in the path, to check quoting
        code = main(["fix", "--demo", "nafnet", "-o", str(paths[emit]), "--pass", "protect-fp32", "--match", "sca",
                     "--emit", emit])
        assert code == 0
    return paths


def test_trtexec_command_for_fixed_fp32_model(fixed_models, capsys):
    path = str(fixed_models["fp32"])
    assert main(["trtexec", path, "--engine", "out dir/nafnet.plan"]) == 0
    out, err = capsys.readouterr()
    argv = shlex.split(out)
    plan = PrecisionPlan.from_model(onnx.load(path))
    assert argv == trtexec_command(path, plan, mode="weak", engine_path="out dir/nafnet.plan")
    assert argv[:4] == ["trtexec", f"--onnx={path}", "--fp16", "--precisionConstraints=obey"]
    spec = argv[4].removeprefix("--layerPrecisions=")
    assert parse_layer_precision_spec(spec) == {name: "fp32" for name in plan.fp32_nodes}
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith("warning: TensorRT 10 only")  # issue 12


def test_trtexec_auto_mode_is_strong_for_the_mixed_model(fixed_models, capsys):
    path = str(fixed_models["mixed"])
    assert main(["trtexec", path]) == 0
    assert shlex.split(capsys.readouterr().out) == ["trtexec", f"--onnx={path}", "--stronglyTyped"]
    assert main(["trtexec", str(fixed_models["fp32"]), "--mode", "strong"]) == 0
    out, err = capsys.readouterr()
    assert "--stronglyTyped" in out and "--fp16" not in out and err.startswith("warning: the model has no FLOAT16")


def _named_model(tmp_path, names):
    """Relu chain whose nodes carry ``names``; all pinned in the stored plan."""
    from conftest import parse_named

    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x) => (float[4] z) {
  y = Relu(x)
  z = Neg(y)
}""")
    for node, name in zip(model.graph.node, names):
        node.name = name
    PrecisionPlan({name: "test" for name in names}).store_in(model)
    path = tmp_path / "named model.onnx"
    save_model(model, path)
    return str(path)


def test_trtexec_quotes_slashes_and_colons(tmp_path, capsys):
    names = ["/blk:0/sca/Relu", "ns::Neg:1"]
    path = _named_model(tmp_path, names)
    assert main(["trtexec", path, "--mode", "weak"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[1] == f"--onnx={path}"
    spec = argv[-1].removeprefix("--layerPrecisions=")
    assert spec == "/blk:0/sca/Relu:fp32,ns::Neg:1:fp32"
    assert parse_layer_precision_spec(spec) == {"/blk:0/sca/Relu": "fp32", "ns::Neg:1": "fp32"}


def test_trtexec_refuses_a_comma_in_one_line_exit_2(tmp_path, capsys):
    path = _named_model(tmp_path, ["/sca/Concat_a,b", "/sca/Neg"])
    assert main(["trtexec", path]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "'/sca/Concat_a,b'" in err and "contains ','" in err and "Traceback" not in err


# --- without TensorRT: one line, exit 5, nothing done ------------------------------------------

def test_emulation_stays_the_default_backend():
    parser = build_parser()
    assert parser.parse_args(["check", "--demo", "nafnet"]).backend == "emulation"
    assert parser.parse_args(["fix", "--demo", "nafnet", "-o", "x.onnx"]).verify == "emulation"


@needs_no_trt
def test_require_tensorrt_says_how_to_install():
    with pytest.raises(TensorRTUnavailableError) as info:
        require_tensorrt()
    assert str(info.value) == NOT_INSTALLED and info.value.exit_code == 5


@needs_no_trt
def test_check_backend_trt_without_tensorrt_console():
    proc = subprocess.run([sys.executable, "-m", "onnx_fp16_rewrite.cli", "check", "--demo", "nafnet", "--backend", "trt"],
                          capture_output=True, text=True)
    assert proc.returncode == 5
    assert proc.stderr == f"onnx-rewrite: error: {NOT_INSTALLED}\n"
    assert proc.stdout == ""


@needs_no_trt
def test_fix_verify_trt_without_tensorrt_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "fixed.onnx"
    assert main(["fix", "--demo", "nafnet", "-o", str(out), "--verify", "trt"]) == 5
    stdout, err = capsys.readouterr()
    assert stdout == "" and err == f"onnx-rewrite: error: {NOT_INSTALLED}\n"
    assert not out.exists()


def test_strict_cumsum_is_emulation_only(capsys):
    assert main(["check", "--demo", "nafnet", "--backend", "trt", "--strict-cumsum"]) == 2
    assert "emulation backend only" in capsys.readouterr().err


def test_has_fp16_tensors(fixed_models):
    assert not has_fp16_tensors(onnx.load(str(fixed_models["fp32"])))
    assert has_fp16_tensors(onnx.load(str(fixed_models["mixed"])))


def test_polygraphy_messages_go_to_logging_not_stdout(caplog, capsys):
    """Polygraphy prints by default; its pure-Python logger (no TensorRT needed) is rerouted."""
    pytest.importorskip("polygraphy")
    from polygraphy.logger import G_LOGGER

    from onnx_fp16_rewrite.tensorrt.trt_backend import _polygraphy_logs_to_logging

    before = G_LOGGER.use_python_logging_system, G_LOGGER.colors
    with caplog.at_level(logging.INFO, logger="onnx_fp16_rewrite.tensorrt.trt_build"), _polygraphy_logs_to_logging():
        G_LOGGER.warning("tactic mishap")
    assert "tactic mishap" in caplog.text and capsys.readouterr().out == ""
    # Relayed at INFO (detail for -v), not propagated as Polygraphy's own warning to the root logger.
    assert [r.levelno for r in caplog.records if "tactic mishap" in r.getMessage()] == [logging.INFO]
    assert (G_LOGGER.use_python_logging_system, G_LOGGER.colors) == before
    assert logging.getLogger("Polygraphy").propagate


# --- with TensorRT (skipped where it is not installed) -----------------------------------------

def _trt_version():
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("polygraphy")
    return parse_trt_version(trt.__version__)


def test_trt_nafnet_weak_fp16_build_gives_nan():
    version = _trt_version()
    if version >= (11, 0):
        pytest.skip("TensorRT >= 11 has no weakly typed FP16 build of an FP32 model")
    from onnx_fp16_rewrite.tensorrt.trt_backend import check_trt

    model = DEMO_MODELS["nafnet"]()
    report = check_trt(model, [demo_inputs(model)])
    assert report.mode == "weak" and not report.passed
    assert report.outputs[0].nan + report.outputs[0].inf > 0


@pytest.mark.parametrize("emit", ["fp32", "mixed"])
def test_trt_nafnet_fixed_is_clean(emit):
    version = _trt_version()
    from onnx_fp16_rewrite.passes import ProtectFp32
    from onnx_fp16_rewrite.fix import fix_model
    from onnx_fp16_rewrite.tensorrt.trt_pitfalls import find_pitfalls

    model = DEMO_MODELS["nafnet"]()
    result = fix_model(model, [ProtectFp32(match="sca")], [demo_inputs(model)], emit=emit, verify="trt")
    trt_report = result.report.trt_after
    assert trt_report is not None
    if emit == "fp32" and version < (10, 8):
        # Pinned CumSums are unnamed loops there: the plan cannot reach them, and the report says so.
        assert any("TensorRT <= 10.7" in w for w in result.report.warnings)
        return
    out = trt_report.outputs[0]
    assert out.nan == 0 and out.inf == 0
    if emit == "fp32" and version >= (11, 0):
        assert trt_report.mode == "fp32" and "fix --emit mixed" in trt_report.notes[0]
    if not any(p.code == "cumsum-axes" for p in find_pitfalls(result.model, trt_version=version)):
        assert out.rel_l2 <= 1e-2  # where NVIDIA/TensorRT#4551 applies, the CumSum axes may be wrong


def test_trt_check_cli_on_the_demo(capsys):
    version = _trt_version()
    code = main(["check", "--demo", "nafnet", "--backend", "trt"])
    out = capsys.readouterr().out
    assert out.startswith("TensorRT ")
    if version < (11, 0):
        assert code == 4

