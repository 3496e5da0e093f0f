"""Runs the fixer no longer makes (issue 11), each shown to give the same answer as the run it replaces.

- A pinning round's plan is screened (no FP32 shadow, one sum a tensor) before it is diagnosed;
  a clean screen ends the pinning where the diagnosis would have (``pinning.SCREEN_PIN_ROUNDS``).
- A rewrite whose every failure site is computed exactly as before (upstream of all it changed)
  is refused without a diagnosis: that diagnosis would name every site again
  (``signatures.emulated_alike``).
- So is a rewrite that keeps every other value (``values_changed`` or ``rounding_only``) and left
  every site's node and inputs as they were (``signatures.rewritten_at``): only the rounding
  reaching the sites differs (real NAFNet: box-filter after rescale-accumulation).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_fp16_rewrite.analysis import auto_fix, pinning
from onnx_fp16_rewrite.analysis import diagnosis as diagnosis_module
from onnx_fp16_rewrite.analysis.signatures import emulated_alike, rewritten_at
from onnx_fp16_rewrite.fix import fix_model
from onnx_fp16_rewrite.models.t5_encoder import build_t5_encoder, demo_inputs
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from tests.site_models import upstream_site_model


def _answer(result):
    r = result.report
    a = r.auto
    return {
        "sites": [(s.kind, s.op, s.tensor, s.fix, sorted(s.pinned_nodes)) for s in a.sites],
        "fp32_nodes": a.fp32_nodes, "kept": a.passes_kept, "passed": a.passed, "rounds": a.rounds,
        "after": [(o.name, o.nan, o.inf, o.rel_l2, o.ok) for o in r.fp16_after.outputs],
        "auto_after": [(o.name, o.rel_l2, o.ok) for o in a.after.outputs],
        "failing": a.after.failing_tensors, "flop": r.fp16_flop_fraction,
        "tried": [(t.name, t.status) for t in a.rewrites_tried],
        "model": onnx.printer.to_text(result.model.graph),
    }


def _count_diagnoses(monkeypatch):
    calls = []
    real = diagnosis_module.error_run
    monkeypatch.setattr(diagnosis_module, "error_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("rewrites", [(), None], ids=["pin-only", "rewrites"])
def test_screened_pinning_round_gives_the_diagnosed_answer(monkeypatch, rewrites):
    model = build_t5_encoder()
    feeds = [demo_inputs(model, seed=0)]
    calls = _count_diagnoses(monkeypatch)
    screened = fix_model(model, [], feeds, auto=True, auto_rewrites=rewrites)
    with_screen = len(calls)
    monkeypatch.setattr(pinning, "SCREEN_PIN_ROUNDS", False)
    calls.clear()
    diagnosed = fix_model(model, [], feeds, auto=True, auto_rewrites=rewrites)
    assert _answer(screened) == _answer(diagnosed)
    rounds = diagnosed.report.auto.rounds
    assert rounds == 1 and diagnosed.report.auto.fp32_nodes > 0 and screened.report.auto.passed
    assert len(calls) - with_screen == rounds  # each round's shadow diagnosis replaced by a screen


class _FoldBranch(Pass):
    """Folds branch_out's constant into branch (x*3*2 -> x*6): exact, and nowhere near the site."""

    name = "fold-branch"
    summary = "test pass"

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.name == "branch")
        out = next(n for n in graph.nodes if n.name == "branch_out")
        node.inputs[1].values = np.array(6.0, np.float32)
        out.op = "Identity"
        out.inputs = out.inputs[:1]
        return PassResult(True, rewritten=[Site("branch", "Mul", "folded")])


def test_rewrite_that_reaches_no_site_is_refused_without_a_diagnosis(monkeypatch):
    model = upstream_site_model()
    feeds = [{"x": np.random.default_rng(0).uniform(0.5, 2.0, (4, 8)).astype(np.float32)}]
    calls = _count_diagnoses(monkeypatch)
    refused = fix_model(model, [], feeds, auto=True, auto_rewrites=[_FoldBranch()])
    record = refused.report.auto.rewrites_tried[0]
    assert record.status == "refused" and record.error == "no failure site depends on what it changed"
    assert len(calls) == 1  # the first diagnosis only (the pinning round is screened)
    # Without the refusal the candidate is diagnosed, validated and turned down: same answer.
    monkeypatch.setattr(auto_fix, "emulated_alike", lambda *a: set())
    tried = fix_model(model, [], feeds, auto=True, auto_rewrites=[_FoldBranch()])
    assert tried.report.auto.rewrites_tried[0].status == "kept"  # valid in FP32, fixed no site
    got, want = _answer(refused), _answer(tried)
    assert got.pop("tried") != want.pop("tried")
    assert got == want and len(calls) == 1 + 2  # this fix: the first diagnosis and the candidate's
    assert [s.node for s in tried.report.auto.sites] == ["blow_up"]


def _box_then_offset_model() -> onnx.ModelProto:
    """A 48x48 box mean of a 64x64 integral image (its CumSums pass 65504: rescale-accumulation fixes
    them, and the box sums are then good to 5e-4), and downstream of it, past a Relu, a cancellation
    ((box + 3000) - 3000: FP16's spacing 2 at 3000, a site at rel L2 5e-3 that still passes)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    import meaning_exports

    class BoxThenOffset(torch.nn.Module):
        def forward(self, x):
            r = 48
            c = F.pad(x, (1, 0, 1, 0)).cumsum(2).cumsum(3)
            h, w = x.shape[2], x.shape[3]
            s = c[:, :, r:, r:] - c[:, :, :h + 1 - r, r:] - c[:, :, r:, :w + 1 - r] + c[:, :, :h + 1 - r, :w + 1 - r]
            box = s / (r * r)
            return box, (torch.relu(box) + 3000.0) - 3000.0

    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (1, 1, 64, 64)).astype(np.float32))
    return meaning_exports.export(BoxThenOffset(), (x,), dynamo=False)


def test_rewrite_that_leaves_every_site_as_it_was_is_refused_without_a_diagnosis(monkeypatch):
    from onnx_fp16_rewrite.pipeline.registry import auto_rewrites

    model = _box_then_offset_model()
    feeds = [{"x": np.random.default_rng(s).uniform(0, 255, (1, 1, 64, 64)).astype(np.float32)} for s in (0, 1)]
    calls = _count_diagnoses(monkeypatch)
    refused = fix_model(model, [], feeds, auto=True, auto_rewrites=auto_rewrites())
    tried = {t.name: t for t in refused.report.auto.rewrites_tried}
    assert refused.report.auto.passes_kept == ["rescale-accumulation"]
    assert tried["box-filter"].status == "refused" and tried["box-filter"].rounding_only
    assert tried["box-filter"].error.startswith("it rewrote no failure site's node or inputs")
    assert [s.op for s in refused.report.auto.sites if s.fix == "unfixed"] == []  # the cancellation passes
    assert all(o.ok and o.nan == 0 for o in refused.report.fp16_after.outputs)
    refusing = len(calls)
    # Without it box-filter's candidate is diagnosed and not kept (the cancellation stays): same answer.
    monkeypatch.setattr(auto_fix, "rewritten_at", lambda before, after, tensors, *a: set(tensors))
    calls.clear()
    diagnosed = fix_model(model, [], feeds, auto=True, auto_rewrites=auto_rewrites())
    assert {t.name: t.status for t in diagnosed.report.auto.rewrites_tried}["box-filter"] == "kept"  # FP32-valid
    got, want = _answer(refused), _answer(diagnosed)
    assert got.pop("tried") != want.pop("tried")
    assert got == want and len(calls) == refusing + 1


def test_rewritten_at_names_sites_at_or_reading_a_rewritten_node():
    model = upstream_site_model()
    same = onnx.ModelProto()
    same.CopyFrom(model)
    assert rewritten_at(model, same, ["a", "y", "b", "z"]) == set()
    assert rewritten_at(model, same, ["a", "y", "z"], values_changed=["y"]) == {"y"}  # declared by the pass
    assert rewritten_at(model, same, ["a", "y", "z"], values_changed=["a"]) == {"a", "y"}  # y reads a
    op = onnx.ModelProto()
    op.CopyFrom(model)
    op.graph.node[2].op_type = "Add"  # branch: remade, and branch_out reads it; blow_up/back untouched
    assert rewritten_at(model, op, ["a", "y", "b", "z"]) == {"b", "z"}
    weight = onnx.ModelProto()
    weight.CopyFrom(model)
    weight.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(1e4, np.float32), "big"))
    assert rewritten_at(model, weight, ["a", "y", "b", "z"]) == {"a"}  # a changed weight feeds blow_up only
    gone = onnx.ModelProto()
    gone.CopyFrom(model)
    del gone.graph.node[1]
    assert rewritten_at(model, gone, ["a", "y"]) == {"y"}


def test_emulated_alike_sees_renames_and_changed_inputs():
    model = upstream_site_model()
    same = onnx.ModelProto()
    same.CopyFrom(model)
    assert emulated_alike(model, same, ["a", "y", "b", "z"]) == {"a", "y", "b", "z"}
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[0].name = "blow_up_2"  # the plan is keyed by names: not alike downstream
    assert emulated_alike(model, renamed, ["a", "y", "z"]) == {"z"}
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(1e4, np.float32), "big"))
    assert emulated_alike(model, changed, ["a", "y", "b"]) == {"b"}


@pytest.mark.parametrize("builder,change", [("nafnet", None), ("nafnet", "noop-cast"), ("nafnet", "float-fold"),
                                            ("t5", None)])
def test_cli_check_takes_the_fp32_twin_from_the_preflight(tmp_path, monkeypatch, builder, change):
    """``onnx-rewrite check`` on one input: the preflight's FP32 outputs stand in for the emulation
    graph's FP32 twin, and the JSON report is the one the twin gives (findings, rel L2 and all),
    where the canonical form computes what the model does: as given, or proved so (a no-op Cast
    removed: canonical.same_computation). A folded float value that an implementation may round
    differently (Pow) is not proved: the twin then. On MatMul weights (T5) too: every session of
    ours handles its weights alike (ORT's prepacking off: a packed MatMul rounds differently)."""
    from onnx_fp16_rewrite import canonical
    from onnx_fp16_rewrite.models import build_nafnet
    from onnx_fp16_rewrite.models.nafnet import demo_inputs as nafnet_inputs

    # NAFNet's CumSums and T5's outlier dims overflow FP16: a failing check with findings.
    model = build_nafnet() if builder == "nafnet" else build_t5_encoder()
    inputs = nafnet_inputs if builder == "nafnet" else demo_inputs
    first = model.graph.node[0]
    if change == "noop-cast":
        model.graph.node.insert(0, helper.make_node("Cast", ["input"], ["input_f32"], name="noop", to=TensorProto.FLOAT))
        first.input[0] = "input_f32"
    elif change == "float-fold":  # input * 4 ** 0.5 / 2: a constant Pow that folds
        model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), n)
                                       for n, v in (("four", 4.0), ("half", 0.5), ("two", 2.0)))
        for k, node in enumerate([helper.make_node("Pow", ["four", "half"], ["root"], name="root"),
                                  helper.make_node("Mul", ["input", "root"], ["input_x2"], name="times_root"),
                                  helper.make_node("Div", ["input_x2", "two"], ["input_f32"], name="halve")]):
            model.graph.node.insert(k, node)
        first.input[0] = "input_f32"
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "in.npz", **inputs(model))
    shadows = _count_twins(monkeypatch)

    fast = _cli_check_report(tmp_path)
    fast_shadows = list(shadows)
    monkeypatch.setattr(canonical, "computes_as_given", lambda _report: False)  # the twin, as before
    shadows.clear()
    twin = _cli_check_report(tmp_path)
    assert shadows == [True]
    assert fast_shadows == ([True] if change == "float-fold" else [False])
    assert fast[0] == twin[0] == 4  # EXIT_FP16_FAILS
    assert fast[1]["failing_tensors"] and fast[1] == twin[1]


def _count_twins(monkeypatch) -> list:
    """Each emulation built from now on appends whether its graph carries the FP32 twin."""
    from onnx_fp16_rewrite.emulation import fp16_emulation

    shadows: list = []
    real = fp16_emulation.build_emulation

    def built(*a, **k):
        emu = real(*a, **k)
        shadows.append(bool(emu.twin_outputs))
        return emu

    monkeypatch.setattr(fp16_emulation, "build_emulation", built)
    return shadows


def _cli_check_report(folder) -> tuple[int, dict]:
    """``onnx-rewrite check m.onnx --inputs in.npz`` in ``folder``: its exit code and JSON report (less its time)."""
    from onnx_fp16_rewrite.cli import main

    out = folder / "report.json"
    out.unlink(missing_ok=True)
    code = main(["check", str(folder / "m.onnx"), "--inputs", str(folder / "in.npz"), "--report", str(out), "-q"])
    data = json.loads(out.read_text())
    del data["details"]["check"]["seconds"]
    return code, data


def _mixed_model(*, keep_io_types: bool) -> onnx.ModelProto:
    """A strongly typed model, as --emit mixed writes one: x*300 squared in FP16 overflows for |x| > 0.85.
    ``keep_io_types``: FP32 input and output around Casts; else FP16 in and out."""
    x16, y16 = ("x16", "y16") if keep_io_types else ("x", "y")
    nodes = [helper.make_node("Mul", [x16, "scale"], ["big"], name="scale_up"),
             helper.make_node("Mul", ["big", "big"], [y16], name="square")]
    if keep_io_types:
        nodes = [helper.make_node("Cast", ["x"], [x16], name="to16", to=TensorProto.FLOAT16), *nodes,
                 helper.make_node("Cast", [y16], ["y"], name="to32", to=TensorProto.FLOAT)]
    io = TensorProto.FLOAT if keep_io_types else TensorProto.FLOAT16
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", io, [4, 8])],
                              [helper.make_tensor_value_info("y", io, [4, 8])],
                              [numpy_helper.from_array(np.array(300.0, np.float16), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cli_check_of_a_mixed_model_builds_its_emulation_once(tmp_path, monkeypatch):
    """A strongly typed model (FP16 tensors: a plain run computes them in FP16, the twin in FP32)
    keeps the twin, and its emulation is built once, twin included; the report is the twin's."""
    from onnx_fp16_rewrite import canonical

    onnx.save(_mixed_model(keep_io_types=True), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "in.npz", x=np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8))
    shadows = _count_twins(monkeypatch)

    given = _cli_check_report(tmp_path)
    assert shadows == [True]  # once, with the twin (it was built without it, then again with it)
    shadows.clear()
    monkeypatch.setattr(canonical, "computes_as_given", lambda _report: False)
    twin = _cli_check_report(tmp_path)
    assert shadows == [True]
    assert given[0] == twin[0] == 4 and given[1] == twin[1]  # EXIT_FP16_FAILS: the square overflows
    assert len(given[1]["failing_tensors"]) >= 1 and given[1]["details"]["check"]["mode"] == "strong"


def test_cli_fix_runs_no_preflight_but_says_when_the_inputs_are_at_fault(tmp_path, monkeypatch, capsys):
    """``onnx-rewrite fix`` runs the model as given only when the fix fails: a model the inputs
    cannot run (a Reshape to 2x3 of a batch of two) still gets one line and exit 2, nothing
    written; a model that runs is fixed without that run (the FP32 twin of the first diagnosis
    and the canonical validation's own run are its FP32 runs)."""
    from onnx_fp16_rewrite.cli import main
    from onnx_fp16_rewrite.io import ort_runner

    shape = numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
         helper.make_node("Mul", ["r", "r"], ["y"], name="square")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [shape])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    (tmp_path / "out").mkdir()
    preflights = []
    real = ort_runner.preflight
    monkeypatch.setattr(ort_runner, "preflight", lambda *a, **k: preflights.append(1) or real(*a, **k))
    for n, code in ((2, 2), (1, 0)):
        np.savez(tmp_path / "in.npz", x=np.ones((n, 6), np.float32))
        preflights.clear()
        got = main(["fix", str(path), "--auto", "--inputs", str(tmp_path / "in.npz"), "-o",
                    str(tmp_path / "out" / f"fixed{n}.onnx")])
        err = capsys.readouterr().err
        assert got == code, err
        if code == 2:
            assert "ONNX Runtime cannot run input model" in err and len(err.strip().splitlines()) == 1
            assert list((tmp_path / "out").iterdir()) == [] and preflights == [1]
        else:
            assert (tmp_path / "out" / "fixed1.onnx").exists() and preflights == []


def test_cli_parses_the_model_file_once(tmp_path, monkeypatch):
    """The CLI reads the input model's file once: the parse that lists its external data (for the
    output checks) is the one load_model takes; outside the CLI nothing is kept between calls."""
    from onnx_fp16_rewrite.cli import main
    from onnx_fp16_rewrite.io import model_io

    model = build_t5_encoder()
    path = tmp_path / "t5.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "in.npz", **demo_inputs(model, seed=0))
    parses = []
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda f, *a, **k: parses.append(str(f)) or real(f, *a, **k))
    assert main(["check", str(path), "--inputs", str(tmp_path / "in.npz"), "-q"]) in (0, 4)
    assert parses.count(str(path)) == 1
    parses.clear()
    model_io.external_data_files(path)
    model_io.load_model(path)
    assert parses.count(str(path)) == 2 and model_io._parsed is None


@pytest.mark.parametrize("fed", ["float16", "float32"])
def test_check_of_fp16_inputs_takes_its_reference_from_the_twin(monkeypatch, fed):
    """FP16-typed inputs fed FP16 values: the FP32 twin in the emulation graph reads the very values
    a separate FP32 run would (one session instead of two), and gives its outputs bit for bit.
    Fed FP32 values, the FP16 side reads them rounded and a plain FP32 run does not: that run stays."""
    import dataclasses

    from onnx_fp16_rewrite.emulation import fp16_emulation

    model = _mixed_model(keep_io_types=False)
    x = np.linspace(-1, 1, 32, dtype=np.float64).reshape(4, 8) + 1e-4  # not FP16 values as FP32
    feeds = [{"x": x.astype(fed)}]
    separate = fp16_emulation._fp32_outputs(model, feeds)
    runs = []
    real = fp16_emulation._fp32_outputs
    monkeypatch.setattr(fp16_emulation, "_fp32_outputs", lambda *a, **k: runs.append(1) or real(*a, **k))
    got: list = []
    report = fp16_emulation.check_fp16(model, feeds, fp32_outputs=got)
    assert np.array_equal(got[0]["y"], separate[0]["y"])  # the same reference, bit for bit
    assert len(runs) == (0 if fed == "float16" else 1)
    assert not report.passed and report.failing_tensors >= 1 and report.mode == "strong"
    given = fp16_emulation.check_fp16(model, feeds, separate)  # the reference given: no twin, no FP32 run
    assert dataclasses.replace(given, seconds=report.seconds) == report
