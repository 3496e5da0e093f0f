"""``onnx-rewrite check`` runs its preflight beside canonicalisation (io.background_preflight): the
verdict and report are those of a preflight run first, and its refusal still wins (exit 2, one line)."""

from __future__ import annotations

import json
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.cli import main
from onnx_fp16_rewrite.io import ort_runner
from onnx_fp16_rewrite.io.background_preflight import BackgroundPreflight


def _reshape_model(path) -> None:
    """x (n x 6) reshaped to 2x3 and squared: a batch of two cannot run (ORT refuses the Reshape)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
         helper.make_node("Mul", ["r", "r"], ["y"], name="square")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _threads_of_preflight(monkeypatch) -> list:
    names: list = []
    real = ort_runner.preflight

    def spy(*a, **k):
        names.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(ort_runner, "preflight", spy)
    return names


def test_preflight_runs_on_its_own_thread_with_the_same_outputs(tmp_path):
    _reshape_model(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    feed = {"x": np.arange(6, dtype=np.float32).reshape(1, 6) * 300}
    pending = BackgroundPreflight(model, feed, "m")
    assert len(pending) == 1 and bool(pending)
    got = list(pending)[0]
    want = ort_runner.preflight(model, feed, "m")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    np.testing.assert_array_equal(got["y"], (np.arange(6, dtype=np.float32).reshape(2, 3) * 300) ** 2)
    with pytest.raises(IndexError):
        pending[1]


def test_cli_check_gives_the_same_report_with_the_preflight_beside_it(tmp_path, monkeypatch):
    """x*300 squared overflows FP16 (exit 4): the report is the same whether the preflight ran on
    its thread beside canonicalisation or was done before it (its outputs read when it ended)."""
    _reshape_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 6) * 300)
    names = _threads_of_preflight(monkeypatch)
    reports = []
    for run in ("beside", "before"):
        if run == "before":  # the preflight done and read before load returns (as before this change)
            real_init = BackgroundPreflight.__init__

            def done_first(self, *a, **k):
                real_init(self, *a, **k)
                self.raise_failure()

            monkeypatch.setattr(BackgroundPreflight, "__init__", done_first)
        out = tmp_path / "report.json"
        out.unlink(missing_ok=True)
        code = main(["check", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz"), "--report", str(out),
                     "-q"])
        assert code == 4
        data = json.loads(out.read_text())
        del data["details"]["check"]["seconds"]
        reports.append(data)
    assert names == ["onnx-rewrite-preflight"] * 2
    assert reports[0] == reports[1] and reports[0]["failing_tensors"]


@pytest.mark.parametrize("later_failure", [None, "canonicalisation"])
def test_cli_check_says_when_the_inputs_are_at_fault_whatever_failed_after(tmp_path, monkeypatch, capsys,
                                                                         later_failure):
    """A batch of two cannot run: one line naming ORT's refusal, exit 2, no report written, also
    when the work beside the preflight failed first (our error would otherwise be exit 1)."""
    from onnx_fp16_rewrite import canonical

    _reshape_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((2, 6), np.float32))
    if later_failure:
        def broken(*a, **k):
            raise RuntimeError("a bug of ours")

        monkeypatch.setattr(canonical, "canonicalize", broken)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["check", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz"), "--report",
                 str(out / "r.json")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "ONNX Runtime cannot run input model" in err and len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []
    if later_failure:  # the same bug with inputs that run is ours: exit 1
        np.savez(tmp_path / "in.npz", x=np.ones((1, 6), np.float32))
        assert main(["check", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz")]) == 1
        assert "a bug of ours" in capsys.readouterr().err


def test_check_fp16_waits_after_building_and_before_running(tmp_path, monkeypatch):
    """``before_run`` comes after the emulation graph's build (the preflight overlaps it) and
    before the emulation's ORT run (never two ORT runs at once)."""
    from onnx_fp16_rewrite.emulation import fp16_emulation

    _reshape_model(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    feed = {"x": np.ones((1, 6), np.float32) * 300}
    events: list = []
    real_build, real_run = fp16_emulation.build_emulation, fp16_emulation.run_cached
    monkeypatch.setattr(fp16_emulation, "build_emulation",
                        lambda *a, **k: events.append("build") or real_build(*a, **k))
    monkeypatch.setattr(fp16_emulation, "run_cached", lambda *a, **k: events.append("run") or real_run(*a, **k))
    pending = BackgroundPreflight(model, feed, "m")
    report = fp16_emulation.check_fp16(model, [feed], fp32_run=pending,
                                       before_run=lambda: events.append("wait") or pending.raise_failure())
    assert events == ["build", "wait", "run"]
    assert not report.passed and report.outputs[0].inf == 6  # (300^2 = 90000 > 65504: every element overflows)
