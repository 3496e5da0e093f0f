"""CLI conventions (issue 12): plain fix = the automatic fix, -v/-q anywhere, --version, pass options
from the pass signatures, Polygraphy/trtexec input flags, trtexec lines with the validated shapes and
no TensorRT-11-rejected flag unless labelled, and what is left when a run fails."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest

import onnx_fp16_rewrite
from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.cli_args import build_parser
from onnx_fp16_rewrite.cli_inputs import parse_shape_specs, parse_val_ranges
from onnx_fp16_rewrite.cli_passes import list_passes, make_passes, parse_pass_options
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emit.trtexec import layer_precision_spec
from onnx_fp16_rewrite.errors import BadInputError

# Prefix sums of 4000*U(0,1) over 64 steps reach ~1.3e5: FP16 overflows; the Div brings them back.
CUMSUM = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, C, L] x) => (float[N, C, L] y) {
  k = Constant <value = float {4000.0}> ()
  axis = Constant <value = int64 {2}> ()
  s = Mul(x, k)
  c = CumSum(s, axis)
  y = Div(c, k)
}
"""
TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] a, float[N, 4] b) => (float[N, 4] y) {
  y = Add(a, b)
}
"""
TRT11_REJECTS = ("--fp16", "--precisionConstraints", "--layerPrecisions")


@pytest.fixture
def dyn(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(onnx.parser.parse_model(CUMSUM), path)
    return path


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "onnx_fp16_rewrite", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"onnx-rewrite {onnx_fp16_rewrite.__version__}"
    proc = subprocess.run([sys.executable, "-m", "onnx_fp16_rewrite", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: onnx-rewrite") and "fix" in proc.stdout


@pytest.mark.parametrize("argv", [["-v", "fix", "m.onnx", "-o", "o.onnx"], ["fix", "m.onnx", "-o", "o.onnx", "-v"],
                                  ["fix", "-v", "m.onnx", "-o", "o.onnx"]])
def test_verbose_before_or_after_the_subcommand(argv):
    args = build_parser().parse_args(argv)
    assert args.verbose is True and getattr(args, "quiet", False) is False


@pytest.mark.parametrize("argv", [["-q", "passes"], ["passes", "-q"], ["-q", "check", "m.onnx"], ["check", "m.onnx", "-q"]])
def test_quiet_before_or_after_the_subcommand(argv):
    assert build_parser().parse_args(argv).quiet is True


def test_plain_fix_runs_the_automatic_fix(dyn, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out, _ = _run(["fix", str(dyn), "-o", str(tmp_path / "f.onnx"), "--shapes", "x:[2,3,64]",
                         "--report", str(report)], capsys)
    assert code == 0, out
    rep = json.loads(report.read_text())["details"]
    assert rep["fp16_before"]["outputs"][0]["inf"] > 0
    assert rep["auto"]["passes_kept"] == ["rescale-accumulation"] and rep["auto"]["fp32_nodes"] == 0
    after = rep["fp16_after"]["outputs"][0]
    assert after["nan"] == after["inf"] == 0 and after["rel_l2"] <= 1e-2
    # The default emit is strongly typed, and the line builds the shape that was validated.
    assert rep["emit"] == "mixed"
    assert rep["trtexec_argv"][2:] == ["--stronglyTyped", "--shapes=x:2x3x64"]
    assert f"trtexec --onnx={tmp_path / 'f.onnx'} --stronglyTyped --shapes=x:2x3x64" in out


@pytest.mark.parametrize("emit", ["mixed", "fp32"])
def test_no_trt11_rejected_flag_without_a_tensorrt10_label(dyn, tmp_path, capsys, emit):
    code, out, err = _run(["fix", str(dyn), "-o", str(tmp_path / "f.onnx"), "--shape", "x:1x2x64", "--emit", emit,
                           "--pass", "protect-fp32"], capsys)
    assert code == 0, out + err
    flagged = [line for line in (out + err).splitlines() if any(f in line for f in TRT11_REJECTS)]
    assert all("TensorRT 10 only" in line for line in flagged), flagged
    assert bool(flagged) == (emit == "fp32")  # the weak line is there, labelled, only when asked for
    if emit == "fp32":
        line = next(line for line in out.splitlines() if line.strip().startswith("trtexec"))
        assert "--layerPrecisions=" in line and "CumSum_3:fp32" in line and "--shapes=x:1x2x64" in line


def test_trtexec_subcommand_shapes_and_label(dyn, tmp_path, capsys):
    fixed = tmp_path / "f.onnx"
    assert main(["fix", str(dyn), "-o", str(fixed), "--shape", "x:1x2x64", "--emit", "fp32", "--pass", "protect-fp32"]) == 0
    capsys.readouterr()
    code, out, err = _run(["trtexec", str(fixed), "--shapes", "x:1x2x64"], capsys)
    assert code == 0
    spec = layer_precision_spec(PrecisionPlan.from_model(onnx.load(fixed)))
    assert "CumSum_3:fp32" in spec
    assert out.strip() == (f"trtexec --onnx={fixed} --fp16 --precisionConstraints=obey --layerPrecisions={spec} "
                           "--shapes=x:1x2x64")
    # stdout is the bare command (scripts run it); the TensorRT 10 label is the first line on stderr.
    assert err.splitlines()[0].startswith("warning: TensorRT 10 only: weakly typed")
    # Without --shapes: the shapes fix validated, stored in the model; a model fix never wrote has none.
    code, out2, err = _run(["trtexec", str(fixed)], capsys)
    assert code == 0 and out2 == out and "have no --shape" not in err
    code, out, err = _run(["trtexec", str(tmp_path / "dyn.onnx")], capsys)
    assert "dynamic input(s) x have no --shape" in err and "--shapes" not in out


def test_every_option_passes_shows_can_be_set():
    """Each `--pass-option P.O=<type>` line of `onnx-rewrite passes`, given its default back, builds the
    pass with that value (so every listed option is reachable and typed as listed)."""
    lines = [line.split()[1] for line in list_passes() if line.strip().startswith("--pass-option")]
    assert len(lines) >= 30
    for spelling in lines:
        key = spelling.split("=")[0]
        pass_name, option = key.split(".")
        default = next(line for line in list_passes() if f" {key}=" in line).split("default ", 1)[1].split(" (or")[0]
        value = eval(default)  # the repr `passes` printed
        text = ("none" if value is None else str(value).lower() if isinstance(value, bool)
                else ",".join(value) if isinstance(value, tuple) else str(value))
        options = parse_pass_options([f"{key}={text}"])
        (built,) = make_passes([pass_name], options)
        assert getattr(built, option) == value, key


def test_pass_option_types_and_errors():
    opts = parse_pass_options(["rescale-accumulation.target_absmax=4096", "split-cumsum.min-length=8",
                               "protect-fp32.grow=false", "protect-fp32.op_types=CumSum,ReduceSum",
                               "fuse-normalization.opset=none"])
    assert opts == {"rescale-accumulation": {"target_absmax": 4096.0}, "split-cumsum": {"min_length": 8},
                    "protect-fp32": {"grow": False, "op_types": ("CumSum", "ReduceSum")},
                    "fuse-normalization": {"opset": None}}
    for spec, message in [("split-cumsum.block_size=1.5", "not an integer"), ("box-filter.window_form=sum", "one of"),
                          ("protect-fp32.grow=maybe", "true or false"), ("protect-fp32", "PASS.OPTION=VALUE"),
                          ("protect-fp33.grow=true", "did you mean 'protect-fp32'")]:
        with pytest.raises(BadInputError, match=message):
            parse_pass_options([spec])


def test_short_flag_goes_to_its_one_pass(dyn, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["fix", str(dyn), "-o", str(tmp_path / "f.onnx"), "--shape", "x:1x2x64", "--target-absmax", "4096",
                 "--pass", "rescale-accumulation", "--report", str(report)]) == 0
    (record,) = json.loads(report.read_text())["details"]["passes"]["passes"]
    assert record["options"]["target_absmax"] == 4096.0 and record["status"] == "kept"


def test_shape_spellings():
    assert parse_shape_specs(["x:[2,32,16]"]) == {"x": (2, 32, 16)}
    assert parse_shape_specs(["x:2x32x16,y:1x3"]) == {"x": (2, 32, 16), "y": (1, 3)}
    assert parse_shape_specs(["x:[2, 32, 16]", "y:[1,3],z:4"]) == {"x": (2, 32, 16), "y": (1, 3), "z": (4,)}
    assert parse_shape_specs(["in:0:1x3", "'a:b':2"]) == {"in:0": (1, 3), "a:b": (2,)}
    assert parse_shape_specs(["s:[]"]) == {"s": ()}
    for bad in ["x", "x:1x", "x:[1,a]", "x:-1x3", ":1x2"]:
        with pytest.raises(BadInputError):
            parse_shape_specs([bad])
    with pytest.raises(BadInputError, match="two shapes"):
        parse_shape_specs(["x:1x2", "x:[1,3]"])


def test_val_range_spellings():
    assert parse_val_ranges(["[0,1]", "x:[-2.5,1e3]"]) == {"": (0.0, 1.0), "x": (-2.5, 1000.0)}
    for bad in ["[1]", "x:[2,1]", "x:0,1"]:
        with pytest.raises(BadInputError):
            parse_val_ranges([bad])


def test_polygraphy_flags_end_to_end(dyn, tmp_path, capsys):
    """--input-shapes, --seed, --val-range and --save-inputs write Polygraphy JSON that Polygraphy itself
    reads; --load-inputs reads it back as the same arrays; the model may come after the list flags."""
    saved = tmp_path / "inputs.json"
    assert main(["check", "--input-shapes", "x:[2,3,64]", "--seed", "7", "--val-range", "x:[-3,-1]",
                 "--save-inputs", str(saved), str(dyn)]) in (0, 4)
    from polygraphy.json import load_json

    (feed,) = load_json(str(saved))
    x = feed["x"]
    assert x.shape == (2, 3, 64) and x.dtype == np.float32 and -3 <= x.min() and x.max() <= -1
    again = tmp_path / "again.json"
    main(["check", str(dyn), "--load-inputs", str(saved), "--save-inputs", str(again)])
    (feed2,) = load_json(str(again))
    assert np.array_equal(feed2["x"], x)
    chained = tmp_path / "chained.json"
    main(["check", str(dyn), "--load-inputs", str(saved), str(again), "--save-inputs", str(chained)])
    assert [f["x"].shape for f in load_json(str(chained))] == [(2, 3, 64), (2, 3, 64)]  # several paths: chained
    other = tmp_path / "other.json"
    main(["check", str(dyn), "--shapes", "x:2x3x64", "--seed", "8", "--val-range", "[-3,-1]", "--save-inputs", str(other)])
    assert not np.array_equal(load_json(str(other))[0]["x"], x)
    capsys.readouterr()
    code, _, err = _run(["check", str(dyn), "--load-inputs", str(saved), "--seed", "3"], capsys)
    assert code == 2 and "--seed is for generated inputs" in err


def test_polygraphy_outputs_file_is_named(dyn, tmp_path, capsys):
    from polygraphy.comparator import RunResults

    results = RunResults()
    results.append(("onnxrt-runner", [{"y": np.zeros((1, 2, 64), np.float32)}]))
    outputs = tmp_path / "outputs.json"
    results.save(str(outputs))
    code, _, err = _run(["check", str(dyn), "--inputs", str(outputs)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is a Polygraphy outputs file (polygraphy run --save-outputs), not inputs" in err


def test_shared_dim_mismatch_and_rank_hint(tmp_path, dyn, capsys):
    two = tmp_path / "two.onnx"
    onnx.save(onnx.parser.parse_model(TWO_INPUTS), two)
    code, _, err = _run(["check", str(two), "--shape", "a:2x4", "b:3x4"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "input 'b' has N=3 where another input has N=2" in err  # not ONNX Runtime's log, not exit 1
    np.savez(tmp_path / "ab.npz", a=np.zeros((2, 4), np.float32), b=np.zeros((5, 4), np.float32))
    code, _, err = _run(["check", str(two), "--inputs", str(tmp_path / "ab.npz")], capsys)
    assert code == 2 and "input 'b' has N=5 where another input has N=2" in err
    code, _, err = _run(["check", str(dyn)], capsys)
    assert code == 2 and "give --shape x:1x64x64 (for example)" in err  # rank 3, like the input


def test_failed_run_says_what_is_left(dyn, tmp_path, capsys):
    # A pass that selects nothing: the overflow remains, and the way out is the automatic fix.
    report = tmp_path / "a.json"
    code, out, _ = _run(["fix", str(dyn), "-o", str(tmp_path / "a.onnx"), "--shape", "x:1x2x64",
                         "--pass", "protect-fp32", "--op-types", "Relu", "--report", str(report)], capsys)
    assert code == 4
    (after,) = json.loads(report.read_text())["details"]["fp16_after"]["outputs"]
    assert after["inf"] > 0
    assert f"y: 0 NaN, {after['inf']} Inf: overflow remains" in out
    assert "next: run the automatic fix" in out
    # The automatic fix holds, but an impossible tolerance leaves rounding error only.
    code, out, _ = _run(["fix", str(dyn), "-o", str(tmp_path / "b.onnx"), "--shape", "x:1x2x64", "--rel-l2", "1e-7"],
                        capsys)
    assert code == 4
    line = next(line for line in out.splitlines() if line.startswith("  y: finite"))
    assert "rounding error only, no overflow" in line
    assert "next: the outputs are finite; accept FP16 rounding with --rel-l2" in out


def test_quiet_prints_verdicts_only(dyn, tmp_path, capsys):
    code, out, err = _run(["fix", str(dyn), "-o", str(tmp_path / "q.onnx"), "--shape", "x:1x2x64", "-q"], capsys)
    assert code == 0 and err == ""
    assert out.splitlines()[0].startswith("after (mixed): FP16 emulation: PASS")
    assert "before:" not in out and "auto:" not in out and "trtexec --onnx=" in out


def test_passes_listing_keeps_its_columns():
    lines = list_passes()
    heads = [line for line in lines if not line.startswith(" ")]
    from onnx_fp16_rewrite.pipeline.registry import pass_classes

    names = list(pass_classes())
    assert [h.split()[0] for h in heads] == names
    column = max(map(len, names)) + 2
    for head, name in zip(heads, names):
        assert head[:column].rstrip() == name and head[column] != " ", head  # summaries start in one column
