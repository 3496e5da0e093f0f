"""Canonicalisation on graphs real exporters emit: folding, no-op Casts, names, dynamic dims kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from canonical_exports import export, padded_attention_module, rand, t5_layer_norm_module
from conftest import parse_named
from onnx_fp16_rewrite.canonical import canonicalize, confirm, restore_dynamic, unshare_constant
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from onnx_fp16_rewrite.io.ort_runner import run_model

pytest.importorskip("torch")

DYNAMIC = {"x": {0: "N", 2: "H", 3: "W"}, "v": {0: "B", 1: "T"}}


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """TorchScript export of F.pad + ones_like count image + full([], d ** 0.5) scale, dynamic axes."""
    import torch

    path = tmp_path_factory.mktemp("canon") / "padded.onnx"
    return export(padded_attention_module(), (torch.rand(1, 3, 8, 12), torch.rand(2, 5, 16)), path,
                  input_names=["x", "v"], output_names=["y", "h"], dynamic_axes=DYNAMIC)


def _feeds(x=(1, 3, 8, 12), v=(2, 5, 16), seed=0):
    return [{"x": rand(*x, seed=seed), "v": rand(*v, seed=seed + 1)}]


def _close(model_a, model_b, feeds, rtol=1e-5, atol=1e-5):
    a, b = run_model(model_a, feeds), run_model(model_b, feeds)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_allclose(rb[k], ra[k], rtol=rtol, atol=atol)


def _dims(model, name):
    vi = next(i for i in model.graph.input if i.name == name)
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def test_torchscript_shape_arithmetic_folds_to_literals(padded):
    ops = [n.op_type for n in padded.graph.node]
    assert ops.count("ConstantOfShape") == 3 and ops.count("Shape") == 2 and len(ops) == 43
    feeds = _feeds()
    canon, report = canonicalize(padded, feeds)
    # Pads chain (12 nodes), the sqrt(d) scale (10), the count image (3), 18 Constants, 1 no-op Cast.
    assert [n.op_type for n in canon.graph.node] == ["Conv", "Transpose", "Pad", "MatMul", "Div", "Div"]
    assert (report.nodes_before, report.nodes_after, report.folded) == (43, 6, 36)
    assert report.casts_removed == ["/Cast_2"] and report.specialised
    assert report.specialised_shapes == {"x": [1, 3, 8, 12], "v": [2, 5, 16]}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in canon.graph.initializer}
    pad = next(n for n in canon.graph.node if n.op_type == "Pad")
    assert inits[pad.input[1]].tolist() == [0, 0, 2, 1, 0, 0, 2, 1]  # literal pads, ONNX order
    div = next(n for n in canon.graph.node if n.name == "/Div_1")
    assert float(inits[div.input[1]]) == pytest.approx(4.0)  # sqrt(16), a literal the matchers can read
    # Names the plan refers to survive; graph outputs keep their names.
    assert {n.name for n in canon.graph.node} <= {n.name for n in padded.graph.node}
    assert [o.name for o in canon.graph.output] == ["y", "h"]
    _close(padded, canon, feeds)


def test_emitted_model_keeps_dynamic_dims(padded):
    feeds = _feeds()
    canon, report = canonicalize(padded, feeds)
    assert _dims(canon, "x") == [1, 3, 8, 12]  # analysed specialised
    plan = PrecisionPlan({"/conv/Conv": "test"})
    plan.store_in(canon)
    emitted = restore_dynamic(canon, report)
    assert report.emitted_dynamic is True and report.specialised_warning() is None
    assert _dims(emitted, "x") == ["N", 3, "H", "W"] and _dims(emitted, "v") == ["B", "T", 16]
    assert PrecisionPlan.from_model(emitted).is_fp32("/conv/Conv")
    # Restored count-image arithmetic is computed from shapes only: FP32, as the analysis saw it.
    assert PrecisionPlan.from_model(emitted).is_fp32("/ConstantOfShape_1")
    for shapes in [((1, 3, 8, 12), (2, 5, 16)), ((2, 3, 10, 6), (1, 7, 16)), ((1, 3, 48, 192), (3, 9, 16))]:
        _close(padded, emitted, _feeds(*shapes, seed=3))


def test_restoration_refused_when_a_rewrite_baked_a_shape_in(padded):
    feeds = _feeds()
    canon, report = canonicalize(padded, feeds)
    # A "rewrite" that replaces the count-image sum with a literal derived from it: shape-specific.
    graph = gs.import_onnx(canon)
    div = next(n for n in graph.nodes if n.name == "/Div")
    div.inputs[1] = gs.Constant("baked_count", np.array(96.0, np.float32))
    graph.cleanup()
    baked = gs.export_onnx(graph)
    baked.metadata_props.extend(canon.metadata_props)
    emitted = restore_dynamic(baked, report)
    assert report.emitted_dynamic is False
    assert "specialised to x:1x3x8x12" in report.specialised_warning()
    assert _dims(emitted, "x") == [1, 3, 8, 12]  # honest: still specialised


def test_specialise_never_folds_only_shape_independent_values(padded):
    feeds = _feeds()
    canon, report = canonicalize(padded, feeds, specialise="never")
    assert not report.specialised and _dims(canon, "x") == ["N", 3, "H", "W"]
    ops = [n.op_type for n in canon.graph.node]
    # Pads and sqrt(16) hold for every shape (head dim 16 is static); the count image needs H, W.
    assert "Pow" not in ops and "Concat" not in ops and ops.count("Shape") == 1
    assert report.shape_nodes_dynamic == 3
    _close(padded, canon, feeds)
    _close(padded, canon, _feeds((2, 3, 5, 7), (1, 3, 16)))


@pytest.mark.parametrize("dynamo", [False, True])
def test_t5_layernorm_noop_cast_removed(tmp_path, dynamo):
    import torch

    module = t5_layer_norm_module()
    x = torch.rand(2, 5, 16)
    if dynamo:
        model = export(module, (x,), tmp_path / "t5ln.onnx", input_names=["x"], output_names=["y"], dynamo=True,
                       dynamic_shapes={"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}})
    else:
        model = export(module, (x,), tmp_path / "t5ln.onnx", input_names=["x"], output_names=["y"],
                       dynamic_axes={"x": {0: "batch", 1: "seq"}})
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    feeds = [{"x": rand(2, 5, 16)}]
    canon, report = canonicalize(model, feeds)
    assert not any(n.op_type == "Cast" for n in canon.graph.node)
    assert sorted(report.casts_removed) == sorted(n.name for n in casts)
    if not dynamo:
        assert len(casts) == 1  # TorchScript keeps .to(torch.float32); dynamo drops it itself
    assert not report.specialised and _dims(canon, "x") == ["batch", "seq", 16]
    assert {n.name for n in canon.graph.node} <= {n.name for n in model.graph.node}
    _close(model, canon, feeds)
    _close(model, canon, [{"x": rand(3, 11, 16, seed=2)}])


NOOP_OUTPUT_CAST = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y, float[2,3] z, float[2,3] w) {
  r = Relu(x)
  y = Cast<to=1>(r)
  z = Cast<to=1>(x)
  s = Sigmoid(r)
  w = Cast<to=1>(s)
}"""


def test_noop_cast_that_is_a_graph_output_keeps_the_output_name():
    model = parse_named(NOOP_OUTPUT_CAST)
    feeds = [{"x": rand(2, 3) - 0.5}]
    canon, report = canonicalize(model, feeds)
    assert sorted(report.casts_removed) == ["cast1", "cast4"]
    assert report.casts_kept == ["cast2"]  # casts a graph input: renaming is not possible
    assert [o.name for o in canon.graph.output] == ["y", "z", "w"]
    relu = next(n for n in canon.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["y"]  # the producer took the output's name
    _close(model, canon, feeds)


MINUS_ONE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[-1,3,-1,-1] x) => (float[-1,3,-1,-1] y) {
  s = Shape(x)
  i0 = Constant<value=int64 {0}>()
  n = Gather<axis=0>(s, i0)
  nf = Cast<to=1>(n)
  y = Mul(x, nf)
}"""


def test_minus_one_dims_are_dynamic_not_sizes():
    model = parse_named(MINUS_ONE)
    feeds = [{"x": rand(2, 3, 4, 5)}]
    canon, report = canonicalize(model, feeds, specialise="never")
    assert report.unknown_dims == 6  # three -1 dims in the input and three in the output
    # Shape(x)[0] must not fold to -1: the batch size stays computed.
    assert "Gather" in [n.op_type for n in canon.graph.node]
    _close(model, canon, feeds)
    spec, report = canonicalize(model, feeds)
    assert report.specialised and [n.op_type for n in spec.graph.node] == ["Mul"]
    emitted = restore_dynamic(spec, report)
    assert report.emitted_dynamic
    _close(model, emitted, [{"x": rand(5, 3, 2, 2)}])


SHARED = """<ir_version: 8, opset_import: ["" : 17]>
g (bool[4] m1, bool[4] m2, float[4] a, float[4] b) => (float[4] y1, float[4] y2) {
  fill = Constant<value=float {-3.4e38}>()
  y1 = Where(m1, a, fill)
  y2 = Where(m2, b, fill)
}"""


def test_unshare_constant_gives_one_consumer_its_own_copy():
    model = parse_named(SHARED)
    graph = gs.import_onnx(model)
    first, second = [n for n in graph.nodes if n.op == "Where"]
    shared = first.inputs[2]
    own = unshare_constant(graph, shared, first)
    own.values = np.array(-1e4, np.float32)  # the rewrite changes only its own copy
    assert own.name != shared.name and first.inputs[2] is own and second.inputs[2] is shared
    assert unshare_constant(graph, own, first) is own  # already its own: no copy
    out = gs.export_onnx(graph.cleanup())
    onnx.checker.check_model(out)
    names = [i.name for i in out.graph.initializer]
    assert len(names) == len(set(names))
    feed = {"m1": np.zeros(4, bool), "m2": np.zeros(4, bool), "a": rand(4), "b": rand(4)}
    y1, y2 = run_model(out, [feed])[0].values()
    assert (y1 == np.float32(-1e4)).all() and (y2 == np.float32(-3.4e38)).all()
    with pytest.raises(ValueError, match="not a constant"):
        unshare_constant(graph, graph.inputs[2], first)


def test_already_canonical_models_are_not_canonicalised_twice(padded):
    feeds = _feeds()
    canon, _ = canonicalize(padded, feeds)
    again, report = canonicalize(canon, feeds)
    assert again is canon and report.skipped and not report.changed()


def test_feeds_of_different_shapes_are_not_specialised(padded):
    feeds = _feeds() + _feeds((2, 3, 10, 6), (1, 7, 16), seed=4)
    canon, report = canonicalize(padded, feeds)
    assert not report.specialised and "different shapes" in report.notes[0]
    assert _dims(canon, "x") == ["N", 3, "H", "W"] and len(canon.graph.node) == 10
    _close(padded, canon, feeds)


def test_deferred_validation_reads_given_outputs_and_matches_immediate_validation(padded):
    """confirm_later: the result is the same model, validated on outputs the caller already has
    (the fixer's first diagnosis), with the same validation text; wrong outputs refuse it."""
    feeds = _feeds()
    now, report_now = canonicalize(padded, feeds)
    later, report_later = canonicalize(padded, feeds, confirm_later=True)
    assert onnx.printer.to_text(later.graph) == onnx.printer.to_text(now.graph)
    assert report_later.validation == "" and report_now.validation.startswith("FP32 outputs match the original")
    outputs = run_model(later, feeds)
    assert confirm(report_later, later, outputs) and report_later.validation == report_now.validation
    assert confirm(report_later, later, outputs)  # nothing left to confirm: True, unchanged
    _, report_bad = canonicalize(padded, feeds, confirm_later=True)
    wrong = [{k: v + 1.0 for k, v in o.items()} for o in outputs]
    assert not confirm(report_bad, later, wrong) and report_bad.validation == ""


def test_fix_validates_its_canonical_form_on_the_first_diagnosis(padded, monkeypatch):
    """fix --auto runs the original once for canonical validation (not the canonical form too),
    reports the same validation as canonicalize alone; a refused canonical form is redone with
    each step validated (here forced by a confirm that refuses once)."""
    from onnx_fp16_rewrite import fix as fix_module
    from onnx_fp16_rewrite.io import ort_runner

    feeds = _feeds()
    _, alone = canonicalize(padded, feeds)
    runs = []
    real = ort_runner.run_model
    monkeypatch.setattr(ort_runner, "run_model", lambda m, *a, **k: runs.append(len(m.graph.node)) or real(m, *a, **k))
    from onnx_fp16_rewrite.pipeline import validate
    monkeypatch.setattr(validate, "run_model", ort_runner.run_model)
    result = fix_module.fix_model(padded, [], feeds, auto=True, auto_rewrites=())
    assert result.report.canonical.validation == alone.validation
    # The original once; the canonical form (6 nodes) never by itself (restore_dynamic's own
    # check on a second input shape runs the restored model and the dynamic form: 10 nodes).
    assert runs.count(len(padded.graph.node)) == 1 and runs.count(10) == 2 and len(runs) == 3
    calls = []
    real_confirm = fix_module.confirm_canonical
    monkeypatch.setattr(fix_module, "confirm_canonical",
                        lambda *a: calls.append(1) or (len(calls) > 1 and real_confirm(*a)))
    redone = fix_module.fix_model(padded, [], feeds, auto=True, auto_rewrites=())
    assert redone.report.canonical.validation == alone.validation and len(calls) == 1
    assert onnx.printer.to_text(redone.model.graph) == onnx.printer.to_text(result.model.graph)


def test_graphs_with_nothing_to_fold_skip_the_folding_round_trip(padded):
    """fold_dynamic returns a graph with nothing to fold as it is, without graphsurgeon's round
    trip; the full folding gives these graphs back node for node, so the skip changes nothing."""
    from onnx_fp16_rewrite.canonical import fold
    from onnx_fp16_rewrite.models.nafnet import build_nafnet
    from onnx_fp16_rewrite.models.t5_encoder import build_t5_encoder

    for model in (build_t5_encoder(), build_nafnet(height=32, width=32, channels=8, blocks=1)):
        assert fold._nothing_to_fold(model) and fold.fold_dynamic(model) is model
        folded = fold._fold_rounds(model, 6)
        # (in graphsurgeon's topological order: canonicalize keeps the graph as given when no node folds)
        assert sorted((n.name, n.op_type) for n in folded.graph.node) == sorted((n.name, n.op_type)
                                                                               for n in model.graph.node)
    assert not fold._nothing_to_fold(padded)  # Shape/ConstantOfShape chains fold
    dead = build_t5_encoder()
    dead.graph.node.append(onnx.helper.make_node("Relu", [dead.graph.node[0].output[0]], ["unread"], name="dead"))
    assert not fold._nothing_to_fold(dead)  # cleanup would drop the dead node


def test_cli_runs_the_original_once_and_validates_on_the_check_shadow(padded, tmp_path, monkeypatch, capsys):
    """CLI check and fix: the original runs once (check: the preflight, its FP32 reference for the
    canonical form's validation; fix: that validation's own run, no preflight), the canonical
    form never by itself (check validates it on its FP32 shadow's outputs); the report says the
    same as canonicalize's own validation."""
    from onnx_fp16_rewrite.cli import main
    from onnx_fp16_rewrite.io import ort_runner

    path = tmp_path / "padded.onnx"
    onnx.save(padded, str(path))
    np.savez(tmp_path / "in.npz", **_feeds()[0])
    _, alone = canonicalize(padded, _feeds())
    sessions = []
    real = ort_runner.make_session
    monkeypatch.setattr(ort_runner, "make_session", lambda m, **k: sessions.append(len(m.graph.node)) or real(m, **k))
    from onnx_fp16_rewrite.pipeline import validate
    monkeypatch.setattr(validate, "run_model", ort_runner.run_model)
    report = tmp_path / "check.json"
    assert main(["check", str(path), "--inputs", str(tmp_path / "in.npz"), "--report", str(report)]) in (0, 1)
    assert sessions.count(len(padded.graph.node)) == 1  # the preflight
    assert 6 not in sessions  # the canonical form (6 nodes) never ran by itself
    capsys.readouterr()
    sessions.clear()
    assert main(["fix", str(path), "--auto", "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "f.onnx"),
                 "--report", str(tmp_path / "fix.json")]) == 0
    # fix runs no preflight: the original's sessions are the load check's and the validation's own run
    assert sessions.count(len(padded.graph.node)) == 2 and 6 not in sessions
    import json

    assert json.loads((tmp_path / "fix.json").read_text())["details"]["canonical"]["validation"] == alone.validation


def _failing_once(real, calls):
    """``real``, except that its first call raises (each call is counted in ``calls``)."""
    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("forced")
        return real(*a, **k)
    return wrapped


def test_an_unconfirmed_canonical_form_that_fails_to_run_is_redone_step_by_step(padded, tmp_path, monkeypatch, capsys):
    """CLI check and fix --auto: when the run that should confirm the canonical form fails (here
    forced once), the model is canonicalised again with each step validated, and the result is
    the one a normal run gives; a failure with nothing left to confirm is raised (exit 1)."""
    from onnx_fp16_rewrite import fix as fix_module
    from onnx_fp16_rewrite.cli import main
    from onnx_fp16_rewrite.emulation import fp16_emulation

    path = tmp_path / "padded.onnx"
    onnx.save(padded, str(path))
    np.savez(tmp_path / "in.npz", **_feeds()[0])
    argv = ["check", str(path), "--inputs", str(tmp_path / "in.npz"), "--report", str(tmp_path / "a.json")]
    code = main(argv)
    normal = capsys.readouterr().out
    calls = []
    real_check = fp16_emulation.check_fp16
    monkeypatch.setattr(fp16_emulation, "check_fp16", _failing_once(real_check, calls))
    assert main(argv[:-1] + [str(tmp_path / "b.json")]) == code and len(calls) == 2
    redone = capsys.readouterr().out
    strip = lambda text: [line for line in text.splitlines() if " s)" not in line and "wrote" not in line]
    assert strip(redone) == strip(normal)
    monkeypatch.setattr(fp16_emulation, "check_fp16", real_check)
    firsts = []
    monkeypatch.setattr(fix_module, "_first_diagnosis", _failing_once(fix_module._first_diagnosis, firsts))
    feeds = _feeds()
    redone_fix = fix_module.fix_model(padded, [], feeds, auto=True, auto_rewrites=())
    _, alone = canonicalize(padded, feeds)
    assert len(firsts) == 2 and redone_fix.report.canonical.validation == alone.validation
    monkeypatch.setattr(fix_module, "_first_diagnosis", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        fix_module.fix_model(padded, [], feeds, auto=True, auto_rewrites=())
