"""rescale-accumulation: bit-exact in FP32, and kept only where the FP16 emulation says it helps."""

import functools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper, numpy_helper

from onnx_fp16_rewrite.models import build_cumsum_chain, build_integral_box_filter, build_nafnet
from onnx_fp16_rewrite.models.nafnet import demo_inputs
from onnx_fp16_rewrite.passes import ProtectFp32
from onnx_fp16_rewrite.passes.rescale_accumulation import RescaleAccumulation, _apply, _grow
from onnx_fp16_rewrite.analysis.cutout_judge import Cutout, fetch_values, judge_alone, judge_cutouts
from onnx_fp16_rewrite.errors import BadInputError
from onnx_fp16_rewrite.emulation.fp16_emulation import check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.pipeline.pass_manager import PassManager
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan
from tests.adversarial import adversarial_feeds
from tests.conftest import parse_named


def run(model, pass_, feeds):
    fixed, report = PassManager([pass_], feeds).run(model)
    return fixed, report.passes[0]


def assert_bit_exact(model, fixed, feeds):
    for want, got in zip(run_model(model, feeds), run_model(fixed, feeds)):
        for name in want:
            assert np.array_equal(want[name], got[name]), name


def test_fold_into_the_following_divide_is_bit_exact_and_fixes_fp16():
    model = build_cumsum_chain(length=4096, scale=64.0)  # prefix sums to ~1.3e5, then / 4096
    feeds = [demo_inputs(model)]
    fixed, record = run(model, RescaleAccumulation(), feeds)
    assert record.status == "kept"
    detail = record.rewritten[0].detail
    assert "scaled by 2^-4" in detail and "1 folded into a constant Div/Mul" in detail and "inf ->" in detail
    assert_bit_exact(model, fixed, feeds + adversarial_feeds(model))
    div = next(n for n in fixed.graph.node if n.op_type == "Div")
    const = next(i for i in fixed.graph.initializer if i.name == div.input[1])
    assert numpy_helper.to_array(const) == np.float32(4096 / 16)  # 4096 * 2^-4
    report = check_fp16(fixed, feeds, plan=PrecisionPlan())
    assert report.passed and report.outputs[0].inf == 0


def test_nafnet_512_bit_exact_and_all_fp16_beside_protect_fp32():
    """NAFNet's 384x384 windows cover most of the 512x512 image, so the box sum is as large as the
    integral image and little cancels: here rescaling alone is enough."""
    model = build_nafnet()
    feeds = [demo_inputs(model)]
    reference = run_model(model, feeds)
    fixed, record = run(model, RescaleAccumulation(), feeds)
    assert record.status == "kept" and len(record.rewritten) == 2
    # The 147456 = 384*384 divisor does not fit FP16; folded with 2^-6 it is 2304.
    assert all("scaled by 2^-6" in s.detail and "1 folded" in s.detail for s in record.rewritten)
    assert_bit_exact(model, fixed, feeds)
    after = check_fp16(fixed, feeds, reference, plan=PrecisionPlan()).outputs[0]
    pinned, _ = run(model, ProtectFp32(match="sca"), feeds)
    protect = check_fp16(pinned, feeds, reference).outputs[0]
    assert after.nan == after.inf == 0 and after.rel_l2 <= 1e-2, after
    assert protect.rel_l2 <= 1e-2 and after.rel_l2 < 2 * protect.rel_l2, (after.rel_l2, protect.rel_l2)


def test_bit_exact_on_adversarial_inputs():
    model = build_nafnet(height=64, width=64, kernel=(48, 48))
    feeds = adversarial_feeds(model)
    fixed, record = run(model, RescaleAccumulation(target_absmax=1024.0, max_rel_l2=1.0), feeds)
    assert record.status == "kept" and len(record.rewritten) == 2
    assert_bit_exact(model, fixed, feeds)
    assert all(o.max_abs_error == 0.0 for o in record.validation.outputs)


def test_box_filter_3x3_is_refused_by_the_fp16_judge():
    """The notes' 256x256 integral image with 3x3 windows: in range after scaling, but the FP16
    cancellation in s4 + s1 - s2 - s3 leaves an error of order 1, so the pass must not keep it."""
    model = build_integral_box_filter()
    fixed, record = run(model, RescaleAccumulation(), [demo_inputs(model)])
    assert record.status == "unchanged" and not record.rewritten
    site = record.skipped[0]
    assert site.node == "/box/CumSum" and "still wrong: rel L2 at the exits inf ->" in site.detail
    after = float(site.detail.split("inf -> ")[1].split(" ")[0])
    assert after > 0.5


CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4096] x) => (float[1,2048] d, float[1,2048] r) {
  ax = Constant<value=int64 {1}>()
  c = CumSum(x, ax)
  b = Constant<value=float {100.0}>()
  cb = Add(c, b)
  s0 = Constant<value=int64[1] {0}>()
  e0 = Constant<value=int64[1] {2048}>()
  s1 = Constant<value=int64[1] {2048}>()
  e1 = Constant<value=int64[1] {4096}>()
  one = Constant<value=int64[1] {1}>()
  lo = Slice(cb, s0, e0, one)
  hi = Slice(cb, s1, e1, one)
  d = Sub(hi, lo)
  r = Relu(d)
}"""


def test_chain_ending_in_a_graph_output_and_a_nonlinear_reader():
    """The window sums leave the chain twice (as a graph output and into a Relu): both get the exact
    values back through Mul(2^k); the constant added inside the chain is scaled with it."""
    model = parse_named(CHAIN)
    feeds = [{"x": np.random.default_rng(2).uniform(20, 40, (1, 4096)).astype(np.float32)}]
    fixed, record = run(model, RescaleAccumulation(), feeds)
    assert record.status == "kept", record.skipped
    assert "undone by Mul(2^4)" in record.rewritten[0].detail and "5 node(s)" in record.rewritten[0].detail
    assert_bit_exact(model, fixed, feeds)
    assert check_fp16(model, feeds).outputs[0].inf > 0
    assert check_fp16(fixed, feeds, plan=PrecisionPlan()).passed


@pytest.mark.parametrize("model, feeds, pass_, reason", [
    (build_cumsum_chain(length=4096), None, RescaleAccumulation(), "in range: the chain's FP32 absmax"),
    (parse_named(CHAIN.replace("r = Relu(d)", "r = Relu(d)\n  q = Relu(c)").replace(
        "float[1,2048] r)", "float[1,2048] r, float[1,4096] q)")),
     [{"x": np.full((1, 4096), 30.0, np.float32)}], RescaleAccumulation(), "beyond FP16 whatever the scale"),
    (build_cumsum_chain(length=4096), [{"x": np.full((1, 4096), 1e-5, np.float32)}],
     RescaleAccumulation(target_absmax=1e-5), "below FP16's smallest subnormal"),
])
def test_refusals_come_with_reasons(model, feeds, pass_, reason):
    _, record = run(model, pass_, feeds or [demo_inputs(model)])
    assert record.status == "unchanged" and reason in record.skipped[0].detail, record.skipped


def test_bad_options():
    with pytest.raises(BadInputError, match="target_absmax"):
        RescaleAccumulation(target_absmax=1e5)
    with pytest.raises(BadInputError, match="max_rel_l2"):
        RescaleAccumulation(max_rel_l2=0)
    with pytest.raises(BadInputError, match="linear accumulations, not Softmax"):
        RescaleAccumulation(seed_ops=("CumSum", "Softmax"))


SERIES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4096] x, float[1,4096] y) => (float[1,4096] e, float[1,4096] f) {
  ax = Constant<value=int64 {1}>()
  n = Constant<value=float {4096.0}>()
  c = CumSum(x, ax)
  d = Div(c, n)
  cd = CumSum(d, ax)
  e = Div(cd, n)
  cy = CumSum(y, ax)
  f = Div(cy, n)
}"""


def _cutouts(model):
    """The pass's chains as the judge's cut-outs (every chain, whatever its range)."""
    graph = gs.import_onnx(model)
    graph.toposort()
    taken, cuts = set(), []
    for node in [n for n in graph.nodes if n.op in ("CumSum", "ReduceSum")]:
        if node.name not in taken:
            chain = _grow(node, graph, taken)
            cuts.append(Cutout(chain.seed, chain.entries, chain.exits, functools.partial(_apply, chain=chain, k=4)))
    return cuts


@pytest.mark.parametrize("case", ["nafnet-demo", "nafnet-64", "series"])
def test_chains_judged_together_score_as_each_alone(case):
    """One cut-out for all chains, its exits' reference from the model's own FP32 run: every
    chain's (before, after) is what judging it alone (its own cut-out, FP32 run and check_fp16
    twice) gives, bit for bit on one sample. In ``series`` the first chain's exit is the second one's entry: its
    nodes would be missing from the union, so it is judged alone."""
    rng = np.random.default_rng(1)
    model = {"nafnet-demo": lambda: build_nafnet(),
             "nafnet-64": lambda: build_nafnet(height=64, width=64, kernel=(48, 48), blocks=3),
             "series": lambda: parse_named(SERIES)}[case]()
    feeds = [demo_inputs(model)] if case != "series" else \
        [{n: rng.uniform(20, 40, (1, 4096)).astype(np.float32) for n in "xy"} for _ in range(2)]
    cuts = _cutouts(model)
    assert len(cuts) >= 2
    values = fetch_values(model, feeds, [t for c in cuts for t in c.entries + c.exits])
    together = judge_cutouts(model, cuts, feeds)
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    for c in cuts:
        alone = judge_alone(extractor, c, values)
        if len(feeds) == 1:
            assert together[c.key] == alone, (c.key, together[c.key], alone)
        else:  # streamed samples: the sums of squares add up per sample (the last bits may differ)
            assert np.allclose(together[c.key], alone, rtol=1e-12, atol=0), (c.key, together[c.key], alone)
    if case == "nafnet-64":  # in FP16 range: a power-of-two scale changes no FP16 rounding either
        assert all(before == after < 1e-3 for before, after in together.values())
    else:  # the overflowing chains are fixed in the union too, each by its own edit
        assert any(before == np.inf and after < 1e-3 for before, after in together.values())


def test_a_chain_that_cannot_be_judged_is_refused_alone():
    """A cut-out missing an entry (its exit reads ``y``, not given) fails by itself; the others keep
    the scores they have alone."""
    model = parse_named(SERIES)
    feeds = [{n: np.random.default_rng(3).uniform(20, 40, (1, 4096)).astype(np.float32) for n in "xy"}]
    cuts = _cutouts(model)
    broken = next(c for c in cuts if c.entries == ["y"])
    broken.entries = []
    values = fetch_values(model, feeds, ["x", "y"] + [t for c in cuts for t in c.exits])
    scores = judge_cutouts(model, cuts, feeds)
    assert isinstance(scores[broken.key], Exception)
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    for c in cuts:
        if c is not broken:
            assert scores[c.key] == judge_alone(extractor, c, values)


def test_cut_outs_sharing_nodes_are_judged_alone():
    """Two cut-outs of one region (x -> d, and x -> e through d): judged together the second would
    lose the nodes it shares with the first, so it is judged alone; both score as alone."""
    model = parse_named(SERIES)
    feeds = [{n: np.random.default_rng(4).uniform(20, 40, (1, 4096)).astype(np.float32) for n in "xy"}]
    first, second = (Cutout(key, ["x"], [out], lambda g: None) for key, out in (("d", "d"), ("e", "e")))
    other = next(c for c in _cutouts(model) if c.entries == ["y"])
    cuts = [first, other, second]
    values = fetch_values(model, feeds, ["x", "y", "d", "e"] + other.exits)
    scores = judge_cutouts(model, cuts, feeds)
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    assert all(scores[c.key] == judge_alone(extractor, c, values) for c in cuts)
    assert scores["e"][0] == scores["e"][1] == np.inf and scores[other.key][0] == np.inf


@pytest.mark.parametrize("fail_on", [None, 1])
def test_samples_stream_through_the_judges(monkeypatch, fail_on):
    """Two samples, one at a time: each reaches ``on_values`` once, in order, and the scores are
    judge_alone's on both (to the last bits: the sums of squares add up per sample). When the
    union fails on the second sample (``fail_on``), its sites are judged alone over every sample
    again and ``on_values`` still sees each sample once."""
    from onnx_fp16_rewrite.analysis import cutout_judge

    model = build_nafnet()
    feeds = [demo_inputs(model, seed=s) for s in range(2)]
    cuts = _cutouts(model)
    assert len(cuts) >= 2
    if fail_on is not None:
        add, calls = cutout_judge._Judge.add, []

        def failing_add(judge, values):
            if not judge.own_reference:
                calls.append(1)
                if len(calls) == fail_on + 1:
                    raise RuntimeError("the union fails here")
            add(judge, values)

        monkeypatch.setattr(cutout_judge._Judge, "add", failing_add)
    seen = []
    scores = judge_cutouts(model, cuts, feeds, fetch=["input"], on_values=lambda v: seen.append(v["input"]))
    assert len(seen) == 2 and all(np.array_equal(a, f["input"]) for a, f in zip(seen, feeds))
    values = fetch_values(model, feeds, [t for c in cuts for t in c.entries + c.exits])
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    for c in cuts:
        want = judge_alone(extractor, c, values)
        assert np.allclose(scores[c.key], want, rtol=1e-12, atol=0), (c.key, scores[c.key], want)
    assert any(before == np.inf and after < 1e-3 for before, after in scores.values())


def test_fetched_values_are_those_of_the_whole_model():
    """The FP32 values come from the nodes they need alone, bit for bit those of a whole-model run."""
    model = build_nafnet(height=64, width=64, kernel=(48, 48), blocks=3)
    feeds = [demo_inputs(model), demo_inputs(model, seed=1)]
    names = [n.output[0] for n in model.graph.node if n.op_type in ("CumSum", "Mul")][:6] + ["input"]
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names[:-1])
    for got, want, feed in zip(fetch_values(model, feeds, names), run_model(whole, feeds), feeds):
        assert sorted(got) == sorted(names)
        assert all(np.array_equal(got[n], want[n]) for n in names[:-1]) and got["input"] is not None
        assert np.array_equal(got["input"], feed["input"])
