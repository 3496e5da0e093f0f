import onnx
import pytest


def parse_named(text: str) -> onnx.ModelProto:
    """Parse ONNX text format and name unnamed nodes <optype><index> (e.g. cumsum1)."""
    model = onnx.parser.parse_model(text)
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type.lower()}{i}"
    return model


@pytest.fixture
def window_model() -> onnx.ModelProto:
    """x -> CumSum -> two Slices -> Sub -> Div: a 1-D integral-image window mean."""
    return parse_named(WINDOW)


WINDOW = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4096] x) => (float[1,4064] y) {
  ax = Constant<value=int64 {1}>()
  c = CumSum(x, ax)
  s0 = Constant<value=int64[1] {0}>()
  e0 = Constant<value=int64[1] {4064}>()
  s1 = Constant<value=int64[1] {32}>()
  e1 = Constant<value=int64[1] {4096}>()
  one = Constant<value=int64[1] {1}>()
  lo = Slice(c, s0, e0, one)
  hi = Slice(c, s1, e1, one)
  d = Sub(hi, lo)
  k = Constant<value=float {32.0}>()
  y = Div(d, k)
}"""
