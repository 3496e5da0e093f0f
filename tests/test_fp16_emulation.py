"""The CPU FP16 emulation, tested on its own against numpy float16 arithmetic."""

import numpy as np
import onnx
import pytest

from conftest import WINDOW, parse_named
from onnx_fp16_rewrite.emulation.fp16_emulation import build_emulation, check_fp16
from onnx_fp16_rewrite.io.ort_runner import run_model
from onnx_fp16_rewrite.emit.precision_plan import PrecisionPlan

F16, F32 = np.float16, np.float32


def r16(a):
    with np.errstate(over="ignore"):
        return np.asarray(a, F32).astype(F16).astype(F32)


parse = parse_named


CUMSUM = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,N] x) => (float[1,N] y) {
  ax = Constant<value=int64 {1}>()
  c = CumSum<exclusive=0>(x, ax)
  n = Constant<value=float {4096.0}>()
  y = Div(c, n)
}"""

def test_rounding_is_fp16_storage_fp32_compute_bitwise():
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1000] x) => (float[1000] y) {
      k = Constant<value=float {3.3}>()
      m = Mul(x, k)
      y = Add(m, x)
    }""")
    x = np.random.default_rng(0).normal(0, 100, 1000).astype(F32)
    emu = build_emulation(model)
    y = run_model(emu.model, [{"x": x}], ["y"])[0]["y"]
    # Each node reads FP16 inputs, computes in FP32 and stores its output in FP16.
    m = r16(r16(x) * r16(F32(3.3)))
    expected = r16(m + r16(x))
    assert np.array_equal(y, expected)


def test_overflow_detected_and_located():
    model = parse(CUMSUM.replace("N", "4096"))
    x = np.full((1, 4096), 30.0, F32)
    report = check_fp16(model, [{"x": x}])
    assert not report.passed
    assert report.mode == "weak"
    out = report.outputs[0]
    # Prefix sums pass 65504 at index 2183 (30 * 2184 = 65520 rounds to inf): 4096 - 2183 infs.
    assert out.inf == 4096 - 2183 and out.nan == 0
    first = report.first_failures[0]
    assert (first.op, first.kind, first.absmax) == ("CumSum", "overflow", 30.0 * 4096)


def test_onnxruntime_fp16_run_is_fooled_but_emulation_is_not():
    """The premise of the emulator: ORT CPU runs an FP16 CumSum chain in FP32 and reports no inf."""
    fp16 = _as_fp16(parse(CUMSUM.replace("N", "4096")))
    x = np.full((1, 4096), 30.0, F16)
    ort_y = run_model(fp16, [{"x": x}])[0]["y"]
    assert np.isfinite(ort_y).all()  # ORT says fine...
    report = check_fp16(fp16, [{"x": x}], reference=[{"y": np.cumsum(np.full((1, 4096), 30.0), axis=1) / 4096}])
    assert report.mode == "strong"
    assert report.outputs[0].inf == 4096 - 2183  # ...an FP16 engine is not


def _as_fp16(model):
    """The whole model typed FLOAT16, as a naive FP16 conversion leaves it."""
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT:
                attr.t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(attr.t).astype(F16)))
    onnx.checker.check_model(model)
    return model


def test_pinning_only_the_cumsum_still_overflows_on_the_fp16_edge():
    model = parse(WINDOW)
    x = np.random.default_rng(1).uniform(20, 40, (1, 4096)).astype(F32)
    only_cumsum = check_fp16(model, [{"x": x}], plan=PrecisionPlan({"cumsum1": "t"}))
    assert not only_cumsum.passed
    # The FP32 prefix sums are rounded where the FP16 Slices read them: the Slices overflow.
    assert only_cumsum.first_failures[0].op == "Slice"
    assert only_cumsum.outputs[0].inf > 0
    region = PrecisionPlan({n: "t" for n in ("cumsum1", "slice7", "slice8", "sub9", "div11")})
    fixed = check_fp16(model, [{"x": x}], plan=region)
    assert fixed.passed and fixed.failing_tensors == 0
    assert fixed.outputs[0].rel_l2 < 1e-3


def test_weights_are_clamped_not_overflowed():
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[8] x) => (float[8] y) {
      k = Constant<value=float {147456.0}>()
      y = Div(x, k)
    }""")
    x = np.linspace(1, 8, 8).astype(F32)
    report = check_fp16(model, [{"x": x}])
    out = report.outputs[0]
    # k is clamped to 65504 (as TensorRT does with out-of-range weights): finite but 2.25x too large.
    assert out.inf == 0 and out.nan == 0
    assert out.rel_l2 == pytest.approx(147456 / 65504 - 1, rel=2e-3)
    assert not report.passed
    pinned = check_fp16(model, [{"x": x}], plan=PrecisionPlan({"div1": "t"}))
    assert pinned.passed


def _sequential_fp16_cumsum(x, reverse=False, exclusive=False):
    seq = x[::-1] if reverse else x
    acc, out = F16(0), []
    for v in seq:
        prev = acc
        acc = F16(F32(acc) + F32(v))
        out.append(prev if exclusive else acc)
    out = np.array(out, F16).astype(F32)
    return out[::-1] if reverse else out


@pytest.mark.parametrize("reverse,exclusive", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_strict_cumsum_accumulates_in_fp16(reverse, exclusive):
    model = parse(f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,4096] x) => (float[1,4096] y) {{
      ax = Constant<value=int64 {{-1}}>()
      y = CumSum<exclusive={exclusive}, reverse={reverse}>(x, ax)
    }}""")
    x = np.full((1, 4096), 0.01, F32)
    emu = build_emulation(model, strict_cumsum=True)
    assert not emu.notes
    y = run_model(emu.model, [{"x": x}], ["y"])[0]["y"]
    expected = _sequential_fp16_cumsum(r16(x)[0], bool(reverse), bool(exclusive))
    assert np.array_equal(y[0], expected)
    # The FP16 running sum stalls (0.01 is below half the FP16 spacing past 32): far from 40.96.
    assert abs(y.max() - 40.96) > 5


def test_strict_cumsum_changes_the_verdict():
    model = parse(CUMSUM.replace("N", "4096"))
    feeds = [{"x": np.full((1, 4096), 0.01, F32)}]
    assert check_fp16(model, feeds).passed
    strict = check_fp16(model, feeds, strict_cumsum=True)
    assert not strict.passed and strict.outputs[0].rel_l2 > 0.1


def test_strong_mode_keeps_float_islands_in_fp32():
    mixed = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float16[1,4096] x) => (float16[1,4096] y) {
      x32 = Cast<to=1>(x)
      ax = Constant<value=int64 {1}>()
      c = CumSum(x32, ax)
      n = Constant<value=float {4096.0}>()
      d = Div(c, n)
      y = Cast<to=10>(d)
    }""")
    x = np.full((1, 4096), 30.0, F16)
    ref = [{"y": np.cumsum(np.full((1, 4096), 30.0), axis=1) / 4096}]
    report = check_fp16(mixed, [{"x": x}], reference=ref)
    assert report.mode == "strong" and report.passed
    assert (report.fp16_nodes, report.fp32_nodes) == (1, 3)
    assert report.outputs[0].max_abs_error <= 30 * 2**-11


def test_nan_in_fp16_only_is_reported_as_nonfinite():
    model = parse("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) {
      k = Constant<value=float {1000.0}>()
      a = Mul(x, k)
      b = Mul(a, k)
      y = Sub(b, b)
    }""")
    report = check_fp16(model, [{"x": np.array([1, 2, 0.01, 0.001], F32)}])
    # b = x * 1e6 overflows for the first two values; inf - inf is NaN downstream.
    assert report.outputs[0].nan == 2
    kinds = [(f.tensor, f.kind) for f in report.first_failures]
    assert kinds == [("b", "overflow"), ("y", "non-finite")]


@pytest.mark.parametrize("pin_every", [0, 4])
def test_a_tensor_an_fp16_node_produced_is_rounded_once(pin_every):
    """Weakly typed, an FP16 node reads a tensor another FP16 node produced as it is: rounded
    where it was produced, not again on the edge (NAFNet-9: 762 rounding Cast pairs -> 337). The
    second rounding changes no bit: the graph with it restored gives every output (statistics
    and FP32 twin included) bit for bit, with FP32 islands pinned too (``pin_every``)."""
    from onnx import TensorProto, helper

    from onnx_fp16_rewrite.models import build_nafnet
    from onnx_fp16_rewrite.models.nafnet import demo_inputs

    model = build_nafnet()  # its CumSums overflow FP16: inf and NaN go through the roundings too
    plan = PrecisionPlan({n.name: "test" for i, n in enumerate(model.graph.node) if pin_every and i % pin_every == 0})
    emu = build_emulation(model, plan, fp32_shadow=True)
    g = emu.model.graph
    rounded = {n.output[0] for n in g.node if n.op_type == "Cast" and n.name.endswith("__round")}
    casts = [n for n in g.node if n.op_type == "Cast" and n.input[0] in rounded]
    assert rounded and not casts  # nothing rounds a rounded tensor again
    if pin_every:  # an FP32 node's output is still rounded where an FP16 node reads it
        assert any(n.name.endswith("__r16__half") for n in g.node)
    # The second rounding restored on every edge from a rounded tensor to a non-Cast reader.
    twice = onnx.ModelProto()
    twice.CopyFrom(emu.model)
    nodes = []
    for node in twice.graph.node:
        if node.op_type != "Cast" and not node.op_type.startswith("Reduce"):
            for i, name in enumerate(node.input):
                if name in rounded:
                    again = f"{name}__again{len(nodes)}"
                    nodes += [helper.make_node("Cast", [name], [again + "_h"], to=TensorProto.FLOAT16),
                              helper.make_node("Cast", [again + "_h"], [again], to=TensorProto.FLOAT)]
                    node.input[i] = again
        nodes.append(node)
    del twice.graph.node[:]
    twice.graph.node.extend(nodes)
    feed = demo_inputs(model)
    once, again = (run_model(m, [feed])[0] for m in (emu.model, twice))
    assert len(once) == len(again) > 100
    assert all(np.array_equal(once[k], again[k], equal_nan=True) for k in once)
    assert any(not np.isfinite(v).all() for v in once.values())


def test_compare_output_sample_by_sample_is_the_joined_samples_bit_for_bit():
    """compare_output builds its float64 vectors sample by sample (16 NAFNet samples held ~0.5 GB
    of temporaries joined): every field equals the definition over the joined samples, NaN, inf,
    zero references and mixed dtypes included."""
    from onnx_fp16_rewrite.emulation.fp16_report import compare_output

    def joined(got, ref, tol):
        g64 = np.concatenate([np.ravel(a) for a in got]).astype(np.float64)
        r64 = np.concatenate([np.ravel(a) for a in ref]).astype(np.float64)
        nan = int(np.isnan(g64).sum() - np.isnan(r64).sum())
        inf = int(np.isinf(g64).sum() - np.isinf(r64).sum())
        both = np.isfinite(g64) & np.isfinite(r64)
        diff = np.abs(g64[both] - r64[both])
        finite = r64[np.isfinite(r64)]
        norm = float(np.linalg.norm(finite))
        rel = float("inf") if nan > 0 or inf > 0 else (
            float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff)))
        return (max(nan, 0), max(inf, 0), float(diff.max()) if diff.size else 0.0, rel,
                float(np.abs(finite).max()) if finite.size else 0.0, nan <= 0 and inf <= 0 and rel <= tol)

    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = (int(rng.integers(0, 40)), 7)
        ref = [rng.normal(0, 10 ** rng.uniform(-3, 4), shape).astype(rng.choice([F32, F16, np.float64]))
               for _ in range(int(rng.integers(1, 5)))]
        got = [(r + rng.normal(0, 1e-2, r.shape)).astype(F32) for r in ref]
        for a in got + ref:
            if a.size and rng.random() < 0.3:
                a.flat[rng.integers(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        if rng.random() < 0.2:
            ref = [np.zeros_like(r) for r in ref]
        c = compare_output("y", got, ref, 1e-2)
        assert (c.nan, c.inf, c.max_abs_error, c.rel_l2, c.reference_absmax, c.ok) == joined(got, ref, 1e-2)
