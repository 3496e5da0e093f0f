"""The JSON report of ``check`` and ``fix``: one document, described by ``report_schema.json``.

Top-level keys are the same for both commands (schema version, tool and library versions, the
exact command, the input's path and sha256, the exit code, per-output verdicts, every failing
tensor with its count, the measured ranges when ``--auto`` profiled them, the trtexec lines,
FLOP fractions, the node diff); ``details`` keeps the full report data of the command.
JSON has no inf/NaN: a non-finite number is written as ``null`` and its object gets a
``nonfinite`` map from the field's name to ``"inf"``, ``"-inf"`` or ``"nan"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from importlib import resources

from onnx_fp16_rewrite.report.provenance import command_line, input_info, tool_version, versions

SCHEMA_VERSION = 1
SCHEMA_FILE = "report_schema.json"


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) every report validates against."""
    text = resources.files("onnx_fp16_rewrite.report").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def check_document(report, *, argv: Sequence[str], model_path: str | None, demo: str | None, exit_code: int,
                   backend: str, trtexec: Sequence[str] = (), pitfalls: Sequence = (),
                   fp16_flop_fraction: float | None = None) -> dict:
    """The report of ``check`` (an Fp16Report from the emulation or TensorRT)."""
    stage = "check"
    doc = _header("check", argv, model_path, demo, exit_code)
    doc.update(
        verdicts=_verdicts(report, stage, backend),
        failing_tensors=[_failures(report, stage)],
        ranges=None,
        trtexec=list(trtexec),
        flops={"fp16_fraction_before": fp16_flop_fraction, "fp16_fraction_after": None},
        diff=None,
        warnings=[getattr(p, "message", str(p)) for p in pitfalls],
        details={"check": _data(report), "trt_pitfalls": [_data(p) for p in pitfalls]},
    )
    return finite(doc)


def fix_document(rep, *, argv: Sequence[str], model_path: str | None, demo: str | None, output_path: str,
                 diff=None) -> dict:
    """The report of ``fix`` (a FixReport); ``diff``: a ModelDiff of the input and the output."""
    doc = _header("fix", argv, model_path, demo, rep.exit_code)
    verdicts = _verdicts(rep.fp16_before, "before", "emulation") + _verdicts(rep.fp16_after, "after", "emulation")
    failing = [_failures(rep.fp16_before, "before"), _failures(rep.fp16_after, "after")]
    if rep.trt_after is not None:
        verdicts += _verdicts(rep.trt_after, "after", "tensorrt")
        failing.append(_failures(rep.trt_after, "after-tensorrt"))
    details = rep.to_dict()
    ranges = None
    if rep.auto is not None:
        ranges = {"source": "fix --auto: FP32 profiling of the input model", "count": len(rep.auto.ranges),
                  "tensors": [_range(r) for r in rep.auto.ranges]}
        details["auto"].pop("ranges", None)  # once, at the top level
    doc.update(
        output={"path": output_path, "emit": rep.emit},
        verdicts=verdicts,
        failing_tensors=failing,
        ranges=ranges,
        trtexec=[rep.trtexec],
        flops={"fp16_fraction_before": 1.0, "fp16_fraction_after": rep.fp16_flop_fraction},
        diff=diff_data(diff) if diff is not None else None,
        warnings=list(rep.warnings),
        details=details,
    )
    return finite(doc)


def diff_data(diff) -> dict:
    ch = diff.changes
    return {
        "summary": ch.summary(),
        "added": ch.added, "removed": ch.removed, "changed": ch.changed, "retyped": ch.retyped,
        "pinned": ch.pinned, "unpinned": ch.unpinned,
        "by_origin": diff.by_origin, "ops_added": diff.ops_added, "ops_removed": diff.ops_removed,
        "passes": diff.passes,
    }


def finite(value):
    """``value`` with every non-finite float replaced by None, flagged in its object's ``nonfinite``."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        out, flags = {}, {}
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k], flags[k] = None, _flag(v)
            else:
                out[k] = finite(v)
        if flags:
            out["nonfinite"] = {**out.get("nonfinite", {}), **flags}
        return out
    if isinstance(value, (list, tuple)):
        return [None if isinstance(v, float) and not math.isfinite(v) else finite(v) for v in value]
    if isinstance(value, float) or value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)  # versions, enums: their text


def _flag(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _header(command: str, argv: Sequence[str], model_path: str | None, demo: str | None, exit_code: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "onnx-fp16-rewrite", "version": tool_version()},
        "versions": versions(),
        "command": command,
        "argv": list(argv),
        "command_line": command_line(argv),
        "input": input_info(model_path, demo),
        "exit_code": exit_code,
    }


def _verdicts(report, stage: str, backend: str) -> list[dict]:
    return [{"stage": stage, "backend": backend, "output": o.name, "ok": o.ok, "nan": o.nan, "inf": o.inf,
             "max_abs_error": o.max_abs_error, "rel_l2": o.rel_l2, "rel_l2_tolerance": report.rel_l2_tolerance,
             "reference_absmax": o.reference_absmax} for o in report.outputs]


def _failures(report, stage: str) -> dict:
    listed = [_data(f) for f in report.first_failures]
    return {"stage": stage, "count": report.failing_tensors, "listed": len(listed),
            "complete": len(listed) == report.failing_tensors, "tensors": listed}


def _range(r) -> dict:
    return {"tensor": r.tensor, "node": r.node, "op": r.op, "absmax": r.absmax, "p999": r.p999,
            "subnormal_fraction": r.subnormal_fraction, "fp32_nonfinite": r.fp32_nonfinite,
            "sentinels": r.sentinels, "overflows_fp16": r.overflows_fp16}


def _data(obj):
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj
