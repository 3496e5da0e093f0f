import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import parse_named
from onnx_fp16_rewrite.passes.protect_fp32 import ProtectFp32
from onnx_fp16_rewrite.errors import UnknownPassError
from onnx_fp16_rewrite.pipeline.pass_base import Pass, PassResult, Site
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager, name_nodes
from onnx_fp16_rewrite.pipeline.registry import get_pass_class, parse_pipeline

FEEDS = [{"x": np.random.default_rng(1).uniform(20, 40, (1, 4096)).astype(np.float32)}]


class Raises(Pass):
    name = "raises"
    summary = "test pass that raises half way through an edit"

    def run(self, graph, ctx):
        graph.nodes[1].op = "Relu"  # a half-done edit that the rollback must undo
        raise RuntimeError("boom")


class BreaksChecker(Pass):
    name = "breaks-checker"
    summary = "test pass that leaves a node reading an undefined tensor"

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.op == "Div")
        node.inputs[0] = gs.Variable("undefined", dtype=np.float32, shape=[1, 4064])
        return PassResult(True, [Site(node.name, node.op, "rewired")])


class ScalesOutput(Pass):
    name = "scales-output"
    summary = "test pass that multiplies the output by 1.001 (a wrong rewrite)"

    def run(self, graph, ctx):
        out = graph.outputs[0]
        node = out.inputs[0]
        tmp = gs.Variable("pre_scale", dtype=np.float32)
        node.outputs = [tmp]
        graph.nodes.append(gs.Node("Mul", "wrong_scale", inputs=[tmp, gs.Constant("s", np.array(1.001, np.float32))], outputs=[out]))
        return PassResult(True, [Site("wrong_scale", "Mul", "scaled")])


class DoubleCumSum(Pass):
    name = "double-cumsum"
    summary = "test pass computing CumSum in float64 (more accurate than the FP32 original)"

    def run(self, graph, ctx):
        result = PassResult(False)
        for node in [n for n in graph.nodes if n.op == "CumSum"]:
            x, out = node.inputs[0], node.outputs[0]
            x64 = gs.Variable(node.name + "_in64", dtype=np.float64)
            y64 = gs.Variable(node.name + "_out64", dtype=np.float64)
            graph.nodes.append(gs.Node("Cast", node.name + "_up", {"to": onnx.TensorProto.DOUBLE}, [x], [x64]))
            node.inputs[0], node.outputs = x64, [y64]
            graph.nodes.append(gs.Node("Cast", node.name + "_down", {"to": onnx.TensorProto.FLOAT}, [y64], [out]))
            result.modified = True
            result.rewritten.append(Site(node.name, "CumSum", "float64"))
        return result


def test_raising_pass_is_rolled_back_and_the_run_goes_on(window_model):
    before = window_model.SerializeToString()
    fixed, report = PassManager([Raises(), ProtectFp32()], FEEDS).run(window_model)
    first, second = report.passes
    assert first.status == "rolled-back" and "raises failed: RuntimeError: boom" in first.error
    assert second.status == "kept"
    assert [n.op_type for n in fixed.graph.node].count("Relu") == 0
    onnx.checker.check_model(fixed)
    assert window_model.SerializeToString() == before  # the caller's model is never touched


def test_checker_failure_is_rolled_back(window_model):
    fixed, report = PassManager([BreaksChecker()], FEEDS).run(window_model)
    rec = report.passes[0]
    assert rec.status == "rolled-back" and "fails the ONNX checker" in rec.error
    assert "undefined" not in {i for n in fixed.graph.node for i in n.input}


def test_wrong_numerics_are_rolled_back_with_output_and_amount(window_model):
    fixed, report = PassManager([ScalesOutput()], FEEDS).run(window_model)
    rec = report.passes[0]
    assert rec.status == "rolled-back"
    assert "failed FP32 validation" in rec.error and "y:" in rec.error
    out = rec.validation.outputs[0]
    assert out.name == "y" and not out.ok
    # Outputs are window means of U(20,40): |y| <= 40, so 0.1% is at most 0.04.
    assert 0.02 < out.max_abs_error < 0.041
    assert "wrong_scale" not in {n.name for n in fixed.graph.node}


def test_more_accurate_rewrite_is_judged_against_float64():
    # 4x4 box sums from a 1024x1024 integral image: the FP32 prefix sums (~5e5) lose the
    # digits the small box sums (~8) need.
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,1,1024,1024] x) => (float[1,1,1020,1020] y) {
      a3 = Constant<value=int64 {3}>()
      a2 = Constant<value=int64 {2}>()
      w = CumSum(x, a3)
      s = CumSum(w, a2)
      axes = Constant<value=int64[2] {2, 3}>()
      z = Constant<value=int64[2] {0, 0}>()
      e = Constant<value=int64[2] {1020, 1020}>()
      k0 = Constant<value=int64[2] {0, 4}>()
      k1 = Constant<value=int64[2] {1020, 1024}>()
      k2 = Constant<value=int64[2] {4, 0}>()
      k3 = Constant<value=int64[2] {1024, 1020}>()
      f = Constant<value=int64[2] {4, 4}>()
      g4 = Constant<value=int64[2] {1024, 1024}>()
      s1 = Slice(s, z, e, axes)
      s2 = Slice(s, k0, k1, axes)
      s3 = Slice(s, k2, k3, axes)
      s4 = Slice(s, f, g4, axes)
      t = Add(s4, s1)
      u = Sub(t, s2)
      y = Sub(u, s3)
    }""")
    feeds = [{"x": np.random.default_rng(0).uniform(0, 1, (1, 1, 1024, 1024)).astype(np.float32)}]
    strict = PassManager([DoubleCumSum()], feeds)
    fixed, report = strict.run(model)
    rec = report.passes[0]
    assert rec.status == "kept", rec.error
    out = rec.validation.outputs[0]
    # The FP32 original's integral image is itself off by more than the 1e-5 tolerance...
    assert out.judged_against == "float64"
    ref64 = strict.validator.reference64()[0]["y"]
    orig_err = np.abs(strict.validator.reference[0]["y"] - ref64).max()
    assert orig_err > 1e-2
    # ...and the float64 rewrite is closer to the truth than the original.
    assert out.max_abs_error < orig_err
    assert "accepted" in out.detail


def test_unchanged_pass_keeps_the_model(window_model):
    fixed, report = PassManager([ProtectFp32(op_types=(), match="nothing-matches")], FEEDS).run(window_model)
    assert report.passes[0].status == "unchanged"
    assert [n.name for n in fixed.graph.node] == [n.name for n in window_model.graph.node]


def test_name_nodes_makes_names_unique():
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { a = Relu(x)  b = Relu(a)  y = Relu(b) }""")
    model.graph.node[0].name = ""
    model.graph.node[2].name = model.graph.node[1].name
    assert name_nodes(model) == 2
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == 3 and all(names)


def test_registry_did_you_mean():
    assert get_pass_class("protect-fp32") is ProtectFp32
    with pytest.raises(UnknownPassError, match="did you mean 'protect-fp32'"):
        parse_pipeline("protect-fp32,protect-fp3")


@pytest.mark.parametrize("pass_name", ["rescale-accumulation", "box-filter", "balance-conv-bn"])
def test_nothing_to_do_is_what_run_returns(pass_name, monkeypatch):
    """A pass whose ops are absent answers from the op types (``Pass.nothing_to_do``): the same
    record as running it (rewritten, skipped with its reasons), without importing the graph;
    where its ops are present it runs."""
    from onnx_fp16_rewrite.io import weights
    from onnx_fp16_rewrite.models.t5_encoder import build_t5_encoder, demo_inputs
    from onnx_fp16_rewrite.models.nafnet import build_nafnet
    from onnx_fp16_rewrite.pipeline.pass_context import PassContext
    from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

    cls = get_pass_class(pass_name)
    absent = build_t5_encoder(seq_len=16, d_model=128, heads=2, d_ff=128, layers=1)  # no CumSum/ReduceSum/BN
    assert not {n.op_type for n in absent.graph.node} & {"CumSum", "ReduceSum", "BatchNormalization"}
    feeds = [demo_inputs(absent, seed=0)]
    quick = cls().nothing_to_do(absent)
    assert quick is not None and not quick.modified
    ran = cls().run(weights.import_graph(absent), PassContext(model=absent, feeds=feeds, plan=PrecisionPlan()))
    assert (quick.rewritten, quick.skipped, quick.values_changed) == (ran.rewritten, ran.skipped, ran.values_changed)
    imports = []
    real = weights.import_graph
    monkeypatch.setattr(weights, "import_graph", lambda m: imports.append(1) or real(m))
    _, report = PassManager([cls()], feeds).run(absent)
    assert report.passes[0].status == "unchanged" and report.passes[0].skipped == ran.skipped and not imports
    if pass_name != "balance-conv-bn":  # NAFNet has CumSums (no BatchNormalization): the pass must run
        assert cls().nothing_to_do(build_nafnet(height=32, width=32, channels=8, blocks=1)) is None
