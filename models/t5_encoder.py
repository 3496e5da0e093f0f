"""A T5 v1.1-style encoder as torch.onnx exports it (opset 17): RMSNorm, attention, gated-GELU FFN.

Per block (``/encoder/block.{i}/layer.{0,1}/...``)::

    x -> layer_norm (T5LayerNorm: Pow(x,2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(1,.) -> Mul(x,.) -> Mul(w))
      -> SelfAttention (q,k,v MatMul, no 1/sqrt(d) scaling, + relative position bias, Softmax, o MatMul) -> Add(x)
      -> layer_norm -> DenseReluDense (wi_0 -> NewGELU (tanh form, with Pow(x,3)), * wi_1, -> wo) -> Add(x)
    final_layer_norm -> last_hidden_state

T5 is known for large activations in a few hidden dimensions of its residual stream: here the embedding table has
two outlier dimensions, ~120 for every token and ~420 for a few rare tokens, whose squares already pass 65504 in
the first RMSNorm (in FP16 that token's norm divides by inf: its hidden state silently becomes 0). The last
block's FFN has a few hidden units (wi_0 and wi_1 outputs ~50, so ``Pow(x, 3)`` passes 65504 too -- harmless,
the tanh saturates) that wo sends into an outlier dimension: its output reaches 7-8e4, the FP16 overflow of
transformers#5651 ("wo output 66246"), and the stream after the residual Add is past 65504. The final RMSNorm
then squares inf and multiplies inf by 0: NaN for every token.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = ["OUTLIER_DIMS", "RARE_TOKENS", "build_t5_encoder", "demo_inputs"]

logger = logging.getLogger(__name__)

OUTLIER_DIMS = (3, 40)
RARE_TOKENS = 4          # the last ids of the vocabulary
_OUTLIER = 120.0
_RARE_GAIN = 3.5
_EPS = 1e-6


def build_t5_encoder(*, seq_len: int = 16, d_model: int = 64, heads: int = 4, d_ff: int = 128, layers: int = 2,
                     vocab: int = 64, seed: int = 0, opset: int = 17,
                     position_buckets: bool = False) -> onnx.ModelProto:
    """Input ``input_ids`` int64 [1,T], output ``last_hidden_state`` [1,T,d_model]. With
    ``position_buckets`` the relative position bias is computed in the graph as HF T5 exports it
    (Shape -> Range -> bucket float math (Log, Div, Min) -> Cast int64 -> Gather), not folded."""
    if d_model % heads or max(OUTLIER_DIMS) >= d_model:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads}) and > {max(OUTLIER_DIMS)}")
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    d_kv = d_model // heads

    table = rng.standard_normal((vocab, d_model)) * 8.0
    table[:, OUTLIER_DIMS] = _OUTLIER * (1.0 + 0.1 * rng.standard_normal((vocab, len(OUTLIER_DIMS))))
    table[-RARE_TOKENS:, OUTLIER_DIMS] *= _RARE_GAIN  # rare tokens: outliers ~420, their squares pass 65504
    table[1] *= 1e-3  # a token with a tiny embedding: its first RMSNorm is dominated by eps
    x = b.op("/encoder/embed_tokens", "Gather", [b.const("/encoder/embed_tokens", table, name="shared.weight"),
                                                  "input_ids"], axis=0)
    # T5's relative position bias, computed from buckets in layer 0 and constant-folded for a static length.
    position_bias = (rng.standard_normal((1, heads, seq_len, seq_len)) * 2.0).astype(np.float32)
    if position_buckets:
        bias_name = _bucket_bias(b, "/encoder/block.0/layer.0/SelfAttention", rng, heads)
    else:
        bias_name = b.const("/encoder/block.0/layer.0/SelfAttention", position_bias)

    for i in range(layers):
        blk = f"/encoder/block.{i}"
        pre = f"encoder.block.{i}.layer"
        h = _rms_norm(b, f"{blk}/layer.0/layer_norm", x, rng, f"{pre}.0.layer_norm.weight", d_model)
        h = _attention(b, f"{blk}/layer.0/SelfAttention", h, rng, bias_name, f"{pre}.0.SelfAttention",
                       seq_len, d_model, heads, d_kv)
        x = b.op(f"{blk}/layer.0", "Add", [x, h])
        h = _rms_norm(b, f"{blk}/layer.1/layer_norm", x, rng, f"{pre}.1.layer_norm.weight", d_model)
        h = _gated_gelu(b, f"{blk}/layer.1/DenseReluDense", h, rng, f"{pre}.1.DenseReluDense", d_model, d_ff,
                        hot=i == layers - 1)
        x = b.op(f"{blk}/layer.1", "Add", [x, h])
    _rms_norm(b, "/encoder/final_layer_norm", x, rng, "encoder.final_layer_norm.weight", d_model,
              out_name="last_hidden_state")
    logger.debug("t5 encoder: %d layers, d_model %d, seq %d", layers, d_model, seq_len)
    model = b.model(graph_name="t5_encoder", inputs=[("input_ids", [1, seq_len])],
                    outputs=[("last_hidden_state", [1, seq_len, d_model])],
                    doc="T5 v1.1-style encoder with outlier dimensions and a wo output past 65504")
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64  # the builder types inputs float
    return model


def _bucket_bias(b: GraphBuilder, scope: str, rng: np.random.Generator, heads: int,
                 num_buckets: int = 32, max_distance: int = 128) -> str:
    """HF ``T5Attention._relative_position_bucket`` (bidirectional) and its bias lookup, op by op:
    distance 16 lands exactly on a bucket boundary (8 * log(16/8) / log(16) = 2), which FP16's
    rounded Log moves to bucket 1."""
    half, exact = num_buckets // 2, num_buckets // 4
    length = b.op(scope, "Gather", [b.op(scope, "Shape", ["input_ids"]), b.ints(scope, 1)], axis=0)
    pos = b.op(scope, "Range", [b.ints(scope, 0), length, b.ints(scope, 1)])
    ctx = b.op(scope, "Unsqueeze", [pos, b.ints(scope, [1])])
    mem = b.op(scope, "Unsqueeze", [pos, b.ints(scope, [0])])
    rel = b.op(scope, "Sub", [mem, ctx])
    side = b.op(scope, "Cast", [b.op(scope, "Greater", [rel, b.ints(scope, 0)])], to=onnx.TensorProto.INT64)
    buckets = b.op(scope, "Mul", [side, b.ints(scope, half)])
    dist = b.op(scope, "Abs", [rel])
    is_small = b.op(scope, "Less", [dist, b.ints(scope, exact)])
    f = b.op(scope, "Cast", [dist], to=onnx.TensorProto.FLOAT)
    f = b.op(scope, "Log", [b.op(scope, "Div", [f, b.const(scope, np.float32(exact))])])
    f = b.op(scope, "Div", [f, b.const(scope, np.float32(np.log(max_distance / exact)))])
    f = b.op(scope, "Mul", [f, b.const(scope, np.float32(half - exact))])
    large = b.op(scope, "Add", [b.ints(scope, exact), b.op(scope, "Cast", [f], to=onnx.TensorProto.INT64)])
    large = b.op(scope, "Min", [large, b.ints(scope, half - 1)])
    buckets = b.op(scope, "Add", [buckets, b.op(scope, "Where", [is_small, dist, large])])
    table = (rng.standard_normal((num_buckets, heads)) * 2.0).astype(np.float32)
    values = b.op(scope, "Gather", [b.const(scope, table, name="encoder.block.0.layer.0.SelfAttention."
                                                              "relative_attention_bias.weight"), buckets], axis=0)
    return b.op(scope, "Unsqueeze", [b.op(scope, "Transpose", [values], perm=[2, 0, 1]), b.ints(scope, [0])])


def _rms_norm(b: GraphBuilder, scope: str, x: str, rng: np.random.Generator, weight: str, d: int,
              out_name: str | None = None) -> str:
    var = b.reduce_mean(scope, b.op(scope, "Pow", [x, b.const(scope, np.float32(2.0))]), [-1])
    std = b.op(scope, "Sqrt", [b.op(scope, "Add", [var, b.const(scope, np.float32(_EPS))])])
    inv = b.op(scope, "Div", [b.const(scope, np.float32(1.0)), std])   # torch.rsqrt
    h = b.op(scope, "Mul", [x, inv])
    w = (1.0 + rng.uniform(-0.1, 0.1, d)).astype(np.float32)
    return b.op(scope, "Mul", [b.const(scope, w, name=weight), h], out_names=[out_name] if out_name else None)


def _attention(b: GraphBuilder, scope: str, x: str, rng: np.random.Generator, bias: str, prefix: str,
               t: int, d: int, heads: int, d_kv: int) -> str:
    def proj(name: str, gain: float) -> str:
        w = rng.standard_normal((d, d)) * gain / np.sqrt(d)
        w[list(OUTLIER_DIMS)] *= 0.05  # the outlier dimensions barely steer attention
        return b.op(f"{scope}/{name}", "MatMul", [x, b.const(scope, w, name=f"{prefix}.{name}.weight")])

    shape = b.ints(scope, [1, t, heads, d_kv])
    q = b.op(scope, "Transpose", [b.op(scope, "Reshape", [proj("q", 1.0), shape])], perm=[0, 2, 1, 3])
    k = b.op(scope, "Transpose", [b.op(scope, "Reshape", [proj("k", 1.0), shape])], perm=[0, 2, 3, 1])
    v = b.op(scope, "Transpose", [b.op(scope, "Reshape", [proj("v", 1.0), shape])], perm=[0, 2, 1, 3])
    scores = b.op(scope, "Add", [b.op(scope, "MatMul", [q, k]), bias])
    ctx = b.op(scope, "MatMul", [b.op(scope, "Softmax", [scores], axis=-1), v])
    ctx = b.op(scope, "Reshape", [b.op(scope, "Transpose", [ctx], perm=[0, 2, 1, 3]), b.ints(scope, [1, t, d])])
    wo = rng.standard_normal((d, d)) * 4.0 / np.sqrt(d)
    return b.op(f"{scope}/o", "MatMul", [ctx, b.const(scope, wo, name=f"{prefix}.o.weight")])


def _gated_gelu(b: GraphBuilder, scope: str, x: str, rng: np.random.Generator, prefix: str, d: int, d_ff: int,
                *, hot: bool) -> str:
    """``wo(gelu_new(wi_0(x)) * wi_1(x))``; with ``hot``, four hidden units read the outlier dimensions strongly
    and wo writes them into an outlier dimension (the T5 FFN overflow)."""
    w0 = rng.standard_normal((d, d_ff)) / np.sqrt(d)
    w1 = rng.standard_normal((d, d_ff)) / np.sqrt(d)
    wo = rng.standard_normal((d_ff, d)) * 2.0 / np.sqrt(d_ff)
    w0[list(OUTLIER_DIMS)] *= 0.05
    w1[list(OUTLIER_DIMS)] *= 0.05
    if hot:
        units = [5, 17, 60, 99]
        for dim in OUTLIER_DIMS:
            w0[dim, units] = 4.5
            w1[dim, units] = 4.5
        wo[units, OUTLIER_DIMS[1]] = 8.0
    g = b.op(f"{scope}/wi_0", "MatMul", [x, b.const(scope, w0, name=f"{prefix}.wi_0.weight")])
    g = _gelu_new(b, f"{scope}/act", g)
    lin = b.op(f"{scope}/wi_1", "MatMul", [x, b.const(scope, w1, name=f"{prefix}.wi_1.weight")])
    h = b.op(scope, "Mul", [g, lin])
    return b.op(f"{scope}/wo", "MatMul", [h, b.const(scope, wo, name=f"{prefix}.wo.weight")])


def _gelu_new(b: GraphBuilder, scope: str, x: str) -> str:
    """HF NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))), op by op."""
    half = b.op(scope, "Mul", [x, b.const(scope, np.float32(0.5))])
    cube = b.op(scope, "Pow", [x, b.const(scope, np.float32(3.0))])
    inner = b.op(scope, "Add", [x, b.op(scope, "Mul", [b.const(scope, np.float32(0.044715)), cube])])
    t = b.op(scope, "Tanh", [b.op(scope, "Mul", [b.const(scope, np.float32(np.sqrt(2.0 / np.pi))), inner])])
    return b.op(scope, "Mul", [half, b.op(scope, "Add", [b.const(scope, np.float32(1.0)), t])])


def demo_inputs(model: onnx.ModelProto, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids over the whole vocabulary, with token 1 (the tiny embedding) at position 2 and the last
    (rare, largest outliers) at position 5."""
    seq = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    vocab = next(i.dims[0] for i in model.graph.initializer if i.name == "shared.weight")
    ids = np.random.default_rng(seed).integers(0, vocab, (1, seq)).astype(np.int64)
    ids[0, 2], ids[0, 5] = 1, vocab - 1
    return {"input_ids": ids}
