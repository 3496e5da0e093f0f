"""The bad-input matrix (issue 10): every broken, unusual or hostile thing a user may give the CLI
ends with exit 2 and a one-line reason naming the file, node or option -- never exit 1 (our own
bug), never a traceback; the input files are unchanged (sha256) and no file is left behind."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnxruntime as ort
import pytest

from onnx_fp16_rewrite.cli import main
from tests import bad_inputs_cases as C

# (case id, builder(folder) -> argv, expected exit code, text the one-line reason must contain)
CASES = [
    # outputs onto what the run reads, onto each other, into nowhere
    ("out-is-external-data", C.out_is_external_data, 2, "input file"),
    ("out-data-is-input-data", C.out_data_is_input_data, 2, "input file"),
    ("out-is-input", C.out_is_input("same"), 2, "input file"),
    ("out-is-input-symlink", C.out_is_input("symlink"), 2, "input file"),
    ("out-is-input-hardlink", C.out_is_input("hardlink"), 2, "input file"),
    ("out-is-input-dotdot", C.out_is_input("dotdot"), 2, "input file"),
    ("report-is-output", C.report_is("output"), 2, "same file as --output"),
    ("report-is-model", C.report_is("model"), 2, "input file"),
    ("report-is-folder", C.report_is("folder"), 2, "is a folder"),
    ("report-is-inputs", C.report_is("inputs"), 2, "input file"),
    ("report-missing-folder", C.report_is("missing"), 2, "does not exist"),
    ("save-inputs-is-output", C.save_inputs_is_output, 2, "same file as --output"),
    ("output-in-inputs-folder", C.output_in_inputs_folder, 2, "--inputs folder"),
    ("output-missing-folder", C.output_missing_folder, 2, "does not exist"),
    ("output-is-folder", C.output_is_folder, 2, "is a folder"),
    # models ONNX Runtime or onnx refuse
    ("no-graph-outputs", C.no_outputs, 2, "output"),
    ("unknown-domain", C.unknown_domain, 2, "com.example.nosuch"),
    ("opset-30", C.opset_30, 2, "opset"),
    ("shapes-disagree", C.bad_shapes, 2, "mm"),
    ("bfloat16-cpu", C.bfloat16_model, 2, "sin"),
    ("bfloat16-cpu-fix", C.bfloat16_model_fix, 2, "ONNX Runtime cannot load input model"),
    ("zero-dim-input", C.zero_dim_input, 2, "'x'"),
    ("sequence-input", C.sequence_input, 2, "'s'"),
    ("optional-input", C.optional_input, 2, "'o'"),
    ("garbage-file", C.garbage_file, 2, "m.onnx"),
    ("truncated-model", C.truncated_model, 2, "m.onnx"),
    ("missing-external-data", C.missing_external_data, 2, "m.onnx.data"),
    ("short-external-data", C.short_external_data, 2, "too short"),
    ("escaping-external-data", C.escaping_external_data, 2, "outside.bin"),
    ("missing-model", C.missing_model, 2, "nosuch.onnx"),
    ("duplicate-node-names", C.duplicate_node_names, 2, "same node name (scale)"),
    # inputs files
    ("corrupt-npz", C.corrupt_npz, 2, "in.npz"),
    ("npz-member-not-npy", C.npz_member_not_npy, 2, "in.npz"),
    ("npz-pickled", C.npz_pickled, 2, "in.npz"),
    ("nested-json", C.nested_json, 2, "in.json"),
    ("json-not-feeds", C.json_not_feeds, 2, "in.json"),
    ("nan-inputs", C.nonfinite_inputs(math.nan), 2, "NaN"),
    ("inf-inputs", C.nonfinite_inputs(math.inf), 2, "Inf"),
    ("zero-size-npz", C.zero_size_npz, 2, "'x'"),
    ("huge-shape", C.huge_shape, 2, "--shape"),
    ("wrong-dtype-npz", C.wrong_dtype_npz, 2, "float64"),
    ("unknown-input-npz", C.unknown_input_npz, 2, "nosuch"),
    ("empty-inputs-folder", C.empty_inputs_folder, 2, "calib"),
    # options
    ("rtol-negative", C.fix_args("--rtol", "-1"), 2, "--rtol"),
    ("rtol-nan", C.fix_args("--rtol", "nan"), 2, "--rtol"),
    ("atol-inf", C.fix_args("--atol", "inf"), 2, "--atol"),
    ("rel-l2-nan", C.fix_args("--rel-l2", "nan"), 2, "--rel-l2"),
    ("rel-l2-zero", C.fix_args("--rel-l2", "0"), 2, "--rel-l2"),
    ("max-rel-l2-nan", C.fix_args("--pass", "rescale-accumulation", "--max-rel-l2", "nan"), 2, "max_rel_l2"),
    ("block-size-huge", C.fix_args("--pass", "split-cumsum", "--block-size", "1000000000000"), 2, "block_size"),
    ("block-size-zero", C.fix_args("--pass", "split-cumsum", "--pass-option", "split-cumsum.block_size=0"), 2, "block_size"),
    ("target-absmax-over-fp16", C.fix_args("--pass", "rescale-accumulation", "--pass-option", "rescale-accumulation.target_absmax=1e9"), 2, "target_absmax"),
    ("margin-negative", C.fix_args("--pass", "clamp-fp16", "--pass-option", "clamp-fp16.margin=-5"), 2, "margin"),
    ("tolerance-nan", C.fix_args("--tolerance", "y:nan,1e-5"), 2, "--tolerance"),
    ("unknown-node", C.unknown_node, 2, "did you mean 'scale'"),
    ("unknown-pass", C.fix_args("--pass", "protect-fp33"), 2, "did you mean"),
]


def _snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "link"
            for p in sorted(root.rglob("*")) if not p.is_dir()}


@pytest.mark.parametrize("build,code,says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, capfd, build, code, says):
    d = tmp_path / "case"
    (d / "out").mkdir(parents=True)
    argv = build(d)
    before = _snapshot(tmp_path)
    capfd.readouterr()
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        got = exc.code
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (argv, err)
    assert "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith("onnx-rewrite: error: "), err
    assert says.lower() in lines[0].lower(), lines[0]
    assert _snapshot(tmp_path) == before  # inputs unchanged, nothing written, no temporary left


def test_matrix_size():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build", [C.initializer_as_input, C.ir3_opset7], ids=["initializer-as-input", "ir3-opset7"])
@pytest.mark.parametrize("command", [["check"], ["fix", "--emit", "fp32"], ["fix", "--emit", "mixed"]], ids=" ".join)
def test_unusual_but_valid(tmp_path, capfd, build, command):
    """Models the tool's own graphs used to break on: they run (exit 0), and a fixed model
    computes what the original does."""
    src = C.save(build(), tmp_path / "m.onnx")
    out = tmp_path / "f.onnx"
    argv = [command[0], str(src), *command[1:], *(["-o", str(out)] if command[0] == "fix" else [])]
    assert main(argv) == 0, capfd.readouterr().err
    assert "Traceback" not in capfd.readouterr().err
    if command[0] == "fix":
        x = np.random.default_rng(0).random((2, 8), dtype=np.float32)
        want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        typed = x.astype(np.float16) if sess.get_inputs()[0].type == "tensor(float16)" else x
        got = sess.run(None, {"x": typed})[0].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5 if command[-1] == "fp32" else 2e-3, atol=1e-6)
