"""The CLI end to end on the NAFNet-style demo, and every bad input giving one line and its code."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_fp16_rewrite.models import DEMO_MODELS
from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.io.model_io import save_model
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan


@pytest.fixture(scope="module")
def nafnet_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("nafnet") / "nafnet.onnx"
    save_model(DEMO_MODELS["nafnet"](), path)
    return path


def test_check_names_a_sca_cumsum_as_first_overflow(nafnet_path, tmp_path, capsys):
    code = main(["check", str(nafnet_path), "--report", str(tmp_path / "r.json")])
    assert code == 4
    report = json.loads((tmp_path / "r.json").read_text())["details"]["check"]
    out = report["outputs"][0]
    assert out["nan"] + out["inf"] > 0
    first = report["first_failures"][0]
    assert first["op"] == "CumSum" and "/sca/" in first["node"] and first["kind"] == "overflow"
    assert first["absmax"] > 65504
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("emit", ["mixed", "fp32"])
def test_fix_protect_sca(nafnet_path, tmp_path, capsys, emit):
    out_path, rep_path = tmp_path / f"fixed_{emit}.onnx", tmp_path / "report.json"
    code = main(["fix", str(nafnet_path), "-o", str(out_path), "--pass", "protect-fp32", "--match", "sca",
                 "--emit", emit, "--report", str(rep_path)])
    assert code == 0, capsys.readouterr()
    report = json.loads(rep_path.read_text())["details"]
    assert report["fp16_before"]["outputs"][0]["nan"] > 0
    (record,) = report["passes"]["passes"]
    assert record["status"] == "kept"
    # FP32 validation held at rtol 1e-5 / atol 1e-5 (the plan does not change FP32 numerics).
    assert all(o["ok"] and o["max_abs_error"] <= 1e-5 for o in record["validation"]["outputs"])
    after = report["fp16_after"]["outputs"][0]
    assert after["nan"] == 0 and after["inf"] == 0 and after["rel_l2"] <= 1e-2
    fixed = onnx.load(str(out_path))
    onnx.checker.check_model(fixed, full_check=True)
    plan = PrecisionPlan.from_model(fixed)
    assert plan.fp32_nodes and all("sca" in n for n in plan.fp32_nodes)
    if emit == "mixed":
        assert "--stronglyTyped" in report["trtexec_argv"] and "--fp16" not in report["trtexec_argv"]
        # FP16 weights alone cost ~1e-4 when the mixed model runs in ORT: expected and reported.
        assert 1e-6 < report["mixed_ort_error"][0]["rel_l2"] < 1e-2
        types = {i.type.tensor_type.elem_type for i in fixed.graph.input}
        assert types == {onnx.TensorProto.FLOAT16}
    else:
        assert "--precisionConstraints=obey" in report["trtexec_argv"]
        spec = next(a for a in report["trtexec_argv"] if a.startswith("--layerPrecisions="))
        assert spec.count(":fp32") == len(plan.fp32_nodes)
        assert any("TensorRT < 10.8" in w and "unnamed loops" in w for w in report["warnings"])
    assert "trtexec --onnx=" in capsys.readouterr().out


def test_residual_groupnorm_flagged(tmp_path):
    code = main(["check", "--demo", "residual-groupnorm", "--report", str(tmp_path / "r.json")])
    assert code == 4
    first = json.loads((tmp_path / "r.json").read_text())["details"]["check"]["first_failures"][0]
    assert (first["op"], first["kind"]) == ("Add", "overflow")


def test_passes_lists_protect_fp32(capsys):
    assert main(["passes"]) == 0
    assert "protect-fp32" in capsys.readouterr().out


def _bad_input_cases(tmp_path, nafnet_path):
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("hello, I am not a model")
    truncated = tmp_path / "truncated.onnx"
    data = nafnet_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    wrong_name, wrong_shape, wrong_dtype = tmp_path / "n.npz", tmp_path / "s.npz", tmp_path / "d.npz"
    np.savez(wrong_name, image=np.zeros((1, 3, 512, 512), np.float32))
    np.savez(wrong_shape, input=np.zeros((1, 3, 256, 256), np.float32))
    np.savez(wrong_dtype, input=np.zeros((1, 3, 512, 512), np.float64))
    dynamic = tmp_path / "dynamic.onnx"
    from onnx_fp16_rewrite.models.nafnet import build_nafnet

    save_model(build_nafnet(dynamic=True), dynamic)
    out = str(tmp_path / "out" / "o.onnx")
    fix = ["fix", "-o", out]
    return {
        "missing file": (fix + [str(tmp_path / "nope.onnx")], "model file not found"),
        "not onnx": (fix + [str(not_onnx)], "not a valid ONNX model"),
        "truncated": (fix + [str(truncated)], "ONNX"),
        "unknown pass": (fix + [str(nafnet_path), "--pass", "protect-fp33"], "did you mean 'protect-fp32'"),
        "wrong input name": (fix + [str(nafnet_path), "--inputs", str(wrong_name)], "unknown input 'image'"),
        "wrong shape": (fix + [str(nafnet_path), "--inputs", str(wrong_shape)], "has shape"),
        "wrong dtype": (fix + [str(nafnet_path), "--inputs", str(wrong_dtype)], "dtype float64"),
        "dynamic dims": (fix + [str(dynamic)], "dynamic dims"),
        "output is input": (["fix", str(nafnet_path), "-o", str(nafnet_path)], "refusing to overwrite"),
        "bad regex": (fix + [str(nafnet_path), "--pass", "protect-fp32", "--match", "sca("], "not a regular expression"),
        "flag of a pass that does not run": (fix + [str(nafnet_path), "--match", "sca"], "add --pass protect-fp32"),
        "unknown pass option": (fix + [str(nafnet_path), "--pass-option", "rescale-accumulation.target_absmx=4096"],
                                "did you mean 'target_absmax'"),
        "ambiguous short flag": (fix + [str(nafnet_path), "--target-absmax", "4096"],
                                 "--pass-option rescale-accumulation.target_absmax=4096"),
        "-v with -q": (fix + [str(nafnet_path), "-v", "-q"], "contradict"),
    }


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, nafnet_path, capsys):
    (tmp_path / "out").mkdir()
    before = nafnet_path.read_bytes()
    for label, (argv, message) in _bad_input_cases(tmp_path, nafnet_path).items():
        assert main(argv) == 2, label
        err = capsys.readouterr().err
        assert message in err, (label, err)
        assert len(err.strip().splitlines()) == 1, (label, err)
        assert "Traceback" not in err
        assert list((tmp_path / "out").iterdir()) == [], label
    assert nafnet_path.read_bytes() == before


def test_console_script_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnx_fp16_rewrite.cli", "check", str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"onnx-rewrite: error: model file not found: {tmp_path / 'missing.onnx'}"



def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fix", "m.onnx", "-o", "x.onnx", "--exit-absmax", "big"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid float value" in err


def test_plain_fix_prefers_exact_rescaling(nafnet_path, tmp_path, capsys):
    """No --pass: the automatic fix (what --auto did before), strongly typed by default."""
    code = main(["fix", str(nafnet_path), "-o", str(tmp_path / "auto.onnx"), "--report", str(tmp_path / "a.json")])
    assert code == 0
    report = json.loads((tmp_path / "a.json").read_text())["details"]
    assert report["emit"] == "mixed" and "--stronglyTyped" in report["trtexec_argv"]
    auto = report["auto"]
    # The cheapest rewrite (bit-exact power-of-two rescaling) fixes the sca blocks: nothing is
    # pinned, all FLOPs stay FP16 and trtexec needs no --layerPrecisions.
    assert auto["passes_kept"] == ["rescale-accumulation"]
    assert {s["fix"] for s in auto["sites"]} == {"pass:rescale-accumulation"}
    assert auto["fp32_nodes"] == 0 and report["fp16_flop_fraction"] == 1.0
    assert auto["rewrites_tried"][0]["validation"]["outputs"][0]["max_abs_error"] == 0.0
    assert not any(a.startswith("--layerPrecisions") for a in report["trtexec_argv"])
    assert auto["profiling_runs"] == 1
    after = report["fp16_after"]["outputs"][0]
    assert after["nan"] == 0 and after["inf"] == 0 and after["rel_l2"] <= 1e-2
    assert "pass:rescale-accumulation" in capsys.readouterr().out
