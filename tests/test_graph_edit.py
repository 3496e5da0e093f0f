"""graph_edit.const_value: literal constants, and small constant subgraphs folded with onnx.reference."""

import numpy as np
import onnx_graphsurgeon as gs

from conftest import parse_named
from onnx_fp16_rewrite.pipeline.graph_edit import NameSource, const_value


def tensor(model, name):
    return gs.import_onnx(model).tensors()[name]


def test_torchscript_pad_pads_from_constant_of_shape_concat_reshape_slice_transpose_cast():
    # What TorchScript writes for F.pad(x, (1, 0, 1, 0)) on a rank-4 tensor.
    model = parse_named("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,1,8,8] x) => (float[1,1,9,9] y) {
      n = Constant<value=int64[1] {4}>()
      zeros = ConstantOfShape(n)
      head = Constant<value=int64[4] {1, 0, 1, 0}>()
      cat = Concat<axis=0>(head, zeros)
      shape = Constant<value=int64[2] {-1, 2}>()
      pairs = Reshape(cat, shape)
      s0 = Constant<value=int64[1] {-1}>()
      e0 = Constant<value=int64[1] {-9223372036854775807}>()
      ax = Constant<value=int64[1] {0}>()
      st = Constant<value=int64[1] {-1}>()
      rev = Slice(pairs, s0, e0, ax, st)
      tr = Transpose<perm=[1, 0]>(rev)
      flat_shape = Constant<value=int64[1] {-1}>()
      flat = Reshape(tr, flat_shape)
      pads = Cast<to=7>(flat)
      y = Pad(x, pads)
    }""")
    assert const_value(tensor(model, "pads")).tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert const_value(tensor(model, "pads"), fold=False) is None
    assert const_value(tensor(model, "y")) is None            # reads the graph input


def test_shape_of_a_static_tensor_folds_and_a_dynamic_one_does_not():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[{dims}] x) => (float s) {{
      sh = Shape<start=-1>(x)
      d = Cast<to=1>(sh)
      half = Constant<value=float {{0.5}}>()
      r = Pow(d, half)
      s = Squeeze(r)
    }}"""
    static = parse_named(text.format(dims="1,4,64"))
    assert const_value(tensor(static, "s")) == np.float32(8.0)
    dynamic = parse_named(text.format(dims="1,4,D"))
    assert const_value(tensor(dynamic, "s")) is None


def test_attribute_forms_are_evaluated_at_their_own_opset():
    """Unsqueeze with an ``axes`` attribute (opset <= 12) folds under opset 12 semantics."""
    x = gs.Constant("c", np.arange(3, dtype=np.int64))
    out = gs.Variable("u", np.int64)
    gs.Node("Unsqueeze", "unsq", {"axes": [0]}, [x], [out])
    assert const_value(out).shape == (1, 3)


def test_name_source_gives_each_copy_its_own_name():
    graph = gs.import_onnx(parse_named("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { fill = Constant<value=float {-1.0}>()
      y = Add(x, fill) }"""))
    names = NameSource(graph)
    assert [names("fill_fp16fill"), names("fill_fp16fill"), names("fill")] == [
        "fill_fp16fill", "fill_fp16fill_1", "fill_1"]
