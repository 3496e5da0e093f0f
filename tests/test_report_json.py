"""The JSON report: it validates against report_schema.json for check, fix and fix --auto on every
test model, holds no inf/NaN (null + a `nonfinite` flag instead), names the input by sha256, and is
written 0644 by the CLI."""

import hashlib
import json
import math
import os
import stat

import jsonschema
import pytest

from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.fix import EXIT_FP16_FAILS, MAX_FINDINGS
from onnx_fp16_rewrite.report.json_report import check_document, finite, load_schema
from onnx_fp16_rewrite.report.outputs import fix_reports
from tests.report_cases import NAMES, case, fixed

VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def _validate(doc: dict) -> dict:
    """Validate as written: through json with allow_nan=False (inf would raise here)."""
    text = json.dumps(doc, allow_nan=False)
    back = json.loads(text)
    VALIDATOR.validate(back)
    assert all(_flags_only(back))
    return back


def _flags_only(doc):
    """Every "inf"/"nan" string in the document sits in a `nonfinite` map."""
    def walk(v, in_flags=False):
        if isinstance(v, dict):
            for k, x in v.items():
                yield from walk(x, in_flags or k == "nonfinite")
        elif isinstance(v, list):
            for x in v:
                yield from walk(x, in_flags)
        elif isinstance(v, str) and v in ("inf", "-inf", "nan"):
            yield in_flags
    return list(walk(doc))


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(load_schema())


@pytest.mark.parametrize("name", NAMES)
def test_check_document_validates(name):
    model, feeds = case(name)
    report = check_fp16(model, feeds, max_findings=MAX_FINDINGS)
    doc = _validate(check_document(report, argv=["check", "--demo", name], model_path=None, demo=name,
                                   exit_code=0 if report.passed else EXIT_FP16_FAILS, backend="emulation"))
    assert doc["failing_tensors"][0]["count"] == report.failing_tensors == doc["failing_tensors"][0]["listed"]
    assert [v["ok"] for v in doc["verdicts"]] == [o.ok for o in report.outputs]


@pytest.mark.parametrize("how", ["pass", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_fix_document_validates(name, how):
    model, feeds = case(name)
    result = fixed(name, how)
    texts = fix_reports(result, model, feeds, argv=["fix", "--demo", name, "-o", "x.onnx"], model_path=None,
                        demo=name, output_path="x.onnx", want_json=True)
    doc = _validate(json.loads(texts.json))
    assert doc["exit_code"] == result.report.exit_code
    stages = {v["stage"] for v in doc["verdicts"]}
    assert stages == {"before", "after"}
    if how == "auto":
        # Every float tensor the profiler measured, with its statistics.
        ranges = result.report.auto.ranges
        assert doc["ranges"]["count"] == len(ranges) == len(doc["ranges"]["tensors"]) > 0
        r0 = doc["ranges"]["tensors"][0]
        assert set(r0) >= {"absmax", "p999", "subnormal_fraction"}
        assert math.isclose(r0["absmax"], ranges[0].absmax)
        assert "ranges" not in doc["details"]["auto"]  # once, at the top level
    else:
        assert doc["ranges"] is None
    assert set(doc["diff"]["pinned"]) == set(PrecisionPlan.from_model(result.model).fp32_nodes)
    assert doc["flops"]["fp16_fraction_after"] == pytest.approx(result.report.fp16_flop_fraction)


def test_nonfinite_numbers_are_null_with_a_flag():
    doc = finite({"rel_l2": float("inf"), "x": [1.0, float("nan")], "inner": {"a": -math.inf, "b": 2.0}})
    assert doc == {"rel_l2": None, "nonfinite": {"rel_l2": "inf"}, "x": [1.0, None],
                   "inner": {"a": None, "b": 2.0, "nonfinite": {"a": "-inf"}}}


def test_nafnet_check_report_flags_the_inf_rel_l2():
    model, feeds = case("nafnet")
    report = check_fp16(model, feeds, max_findings=MAX_FINDINGS)
    doc = _validate(check_document(report, argv=[], model_path=None, demo="nafnet", exit_code=4, backend="emulation"))
    v = doc["verdicts"][0]
    assert v["rel_l2"] is None and v["nonfinite"] == {"rel_l2": "inf"} and v["nan"] == 786432
    # Every failing tensor is listed (the old report kept 5 of 80).
    assert doc["failing_tensors"][0]["count"] == 80 and doc["failing_tensors"][0]["complete"]


def test_cli_check_report_names_input_exit_code_and_mode(tmp_path, onnx_file):
    path = onnx_file(case("nafnet")[0])
    report = tmp_path / "check.json"
    old = os.umask(0o022)
    try:
        rc = main(["check", str(path), "--report", str(report), "-q"])
    finally:
        os.umask(old)
    assert rc == EXIT_FP16_FAILS
    assert stat.S_IMODE(report.stat().st_mode) == 0o644
    doc = _validate(json.loads(report.read_text()))
    assert doc["exit_code"] == rc
    assert doc["input"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc["input"]["path"] == str(path.resolve())
    assert doc["argv"] == ["check", str(path), "--report", str(report), "-q"]
    assert doc["command_line"].startswith("onnx-rewrite check ")
    assert doc["tool"]["name"] == "onnx-fp16-rewrite" and doc["versions"]["onnxruntime"]
    assert doc["trtexec"] and doc["trtexec"][0].startswith("trtexec ")


@pytest.fixture
def onnx_file(tmp_path):
    import onnx

    def save(model):
        path = tmp_path / "model.onnx"
        onnx.save(model, str(path))
        return path

    return save
