"""A GPT-2 style attention block whose raw q.kT logits pass 65504 before the 1/sqrt(d) divide.

As HF GPT-2 exports below opset 17 (``/h.0/...`` names)::

    hidden_states[1,T,C] -> ln_1 (decomposed LayerNorm: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add)
      -> c_attn (MatMul + Add) -> Split -> q, k, v (Reshape/Transpose into heads, kT as [1,H,D,T])
      -> MatMul(q, kT) -> Div(sqrt(D) = 8) -> Add(causal mask: finfo(float32).min above the diagonal)
      -> Softmax (or Exp/ReduceSum/Div, no max subtraction) -> MatMul(., v) -> c_proj -> Add(residual) -> output

"Massive activations" (Sun et al., 2024): ``demo_inputs`` gives the first token (BOS) and the last one (a
delimiter) a hidden state of ~3000 in one dimension each; ordinary tokens are N(0,1) and near zero in those two
dimensions. c_attn maps the first into a large channel of every head's q and the second into the same channel of
k, so q_0 . k_{T-1} is ~1e5 raw (~1.2e4 after the divide). That entry lies above the diagonal: the causal mask
removes it, and every unmasked logit is moderate (|logit| < 88, so even the decomposed softmax is finite in FP32).

In FP16 the raw product overflows to inf, inf + mask is inf, and the softmax row turns to NaN; the decomposed
LayerNorm's Pow(x - mean, 2) overflows as well (3000^2), and a decomposed softmax's Exp overflows past 11.09.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = ["MASSIVE_DIMS", "build_gpt2_attention", "demo_inputs"]

logger = logging.getLogger(__name__)

MASSIVE_DIMS = (7, 77)   # hidden dimensions carrying the BOS / delimiter massive activation
_MASSIVE = 3000.0
_BIG_QK = 28.0           # c_attn weight from a massive dimension into one q (resp. k) channel per head
_EPS = 1e-5


def build_gpt2_attention(*, seq_len: int = 16, hidden: int = 128, heads: int = 2, softmax: str = "fused",
                         layer_norm: str = "fused", seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Input ``hidden_states`` [1,T,C], output ``output`` [1,T,C]. ``softmax``: fused or decomposed;
    ``layer_norm``: decomposed or fused (LayerNormalization, opset >= 17)."""
    if softmax not in ("fused", "decomposed") or layer_norm not in ("decomposed", "fused"):
        raise ValueError(f"softmax must be fused|decomposed, layer_norm decomposed|fused: {softmax}, {layer_norm}")
    if hidden % heads or max(MASSIVE_DIMS) >= hidden:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}) and > {max(MASSIVE_DIMS)}")
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    c, t, d = hidden, seq_len, hidden // heads

    gamma = (1.0 + rng.uniform(-0.1, 0.1, c)).astype(np.float32)
    beta = rng.uniform(-0.05, 0.05, c).astype(np.float32)
    if layer_norm == "fused":
        h = b.op("/h.0/ln_1", "LayerNormalization",
                 ["hidden_states", b.const("/h.0/ln_1", gamma, name="h.0.ln_1.weight"),
                  b.const("/h.0/ln_1", beta, name="h.0.ln_1.bias")], axis=-1, epsilon=_EPS)
    else:
        h = _layer_norm(b, "/h.0/ln_1", "hidden_states", gamma, beta)

    # c_attn: ordinary weights give q, k entries of std ~2 (logits of std ~4), plus the massive routes.
    w = (rng.standard_normal((c, 3 * c)) * 2.0 / np.sqrt(c)).astype(np.float32)
    for head in range(heads):
        ch = head * d
        w[MASSIVE_DIMS[0], ch] = _BIG_QK           # BOS -> q channel
        w[MASSIVE_DIMS[1], c + ch] = _BIG_QK       # delimiter -> k channel
        w[MASSIVE_DIMS[1], ch] = w[MASSIVE_DIMS[0], c + ch] = 0.0
    scope = "/h.0/attn"
    qkv = b.op(f"{scope}/c_attn", "MatMul", [h, b.const(scope, w, name="h.0.attn.c_attn.weight")])
    qkv = b.op(f"{scope}/c_attn", "Add", [qkv, b.const(scope, rng.uniform(-0.1, 0.1, 3 * c),
                                                     name="h.0.attn.c_attn.bias")])
    q, k, v = b.op_multi(scope, "Split", [qkv, b.ints(scope, [c, c, c])], n_out=3, axis=2)
    heads_shape = b.ints(scope, [1, t, heads, d])
    q = b.op(scope, "Transpose", [b.op(scope, "Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])
    k = b.op(scope, "Transpose", [b.op(scope, "Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])
    v = b.op(scope, "Transpose", [b.op(scope, "Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])

    scores = b.op(scope, "MatMul", [q, k])
    scores = b.op(scope, "Div", [scores, b.const(scope, np.float32(np.sqrt(d)))])
    mask = np.triu(np.full((t, t), np.finfo(np.float32).min, np.float32), 1).reshape(1, 1, t, t)
    scores = b.op(scope, "Add", [scores, b.const(scope, mask)])
    if softmax == "fused":
        probs = b.op(scope, "Softmax", [scores], axis=-1)
    else:
        e = b.op(scope, "Exp", [scores])
        total = b.op(scope, "ReduceSum", [e, b.ints(scope, [-1])], keepdims=1)
        probs = b.op(scope, "Div", [e, total])
    ctx = b.op(scope, "MatMul", [probs, v])
    ctx = b.op(scope, "Reshape", [b.op(scope, "Transpose", [ctx], perm=[0, 2, 1, 3]), b.ints(scope, [1, t, c])])
    wo = (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
    out = b.op(f"{scope}/c_proj", "MatMul", [ctx, b.const(scope, wo, name="h.0.attn.c_proj.weight")])
    out = b.op(f"{scope}/c_proj", "Add", [out, b.const(scope, rng.uniform(-0.1, 0.1, c),
                                                     name="h.0.attn.c_proj.bias")])
    b.op("/h.0", "Add", ["hidden_states", out], out_names=["output"])
    dims = [1, t, c]
    logger.debug("gpt2 attention: %s, %d heads, softmax %s, layer norm %s", dims, heads, softmax, layer_norm)
    return b.model(graph_name="gpt2_attention", inputs=[("hidden_states", dims)], outputs=[("output", dims)],
                   doc=f"GPT-2 style attention ({softmax} softmax, {layer_norm} ln_1) with a finfo.min causal mask")


def _layer_norm(b: GraphBuilder, scope: str, x: str, gamma: np.ndarray, beta: np.ndarray) -> str:
    """LayerNorm over the last axis as torch.onnx writes it below opset 17."""
    mean = b.reduce_mean(scope, x, [-1])
    centred = b.op(scope, "Sub", [x, mean])
    var = b.reduce_mean(scope, b.op(scope, "Pow", [centred, b.const(scope, np.float32(2.0))]), [-1])
    std = b.op(scope, "Sqrt", [b.op(scope, "Add", [var, b.const(scope, np.float32(_EPS))])])
    y = b.op(scope, "Div", [centred, std])
    y = b.op(scope, "Mul", [y, b.const(scope, gamma, name="h.0.ln_1.weight")])
    return b.op(scope, "Add", [y, b.const(scope, beta, name="h.0.ln_1.bias")])


def demo_inputs(model: onnx.ModelProto, *, seed: int = 0, massive: float = _MASSIVE) -> dict[str, np.ndarray]:
    """Hidden states N(0,1) with the BOS (first) and delimiter (last) massive activations; ordinary tokens are
    near zero in the two massive dimensions."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dims).astype(np.float32)
    x[..., list(MASSIVE_DIMS)] *= 0.05
    x[0, 0, MASSIVE_DIMS[0]] = massive
    x[0, -1, MASSIVE_DIMS[1]] = massive
    return {"hidden_states": x}
