"""Small models, one per FP16 failure pattern, for the automatic fixer (``fix --auto``).

Each builder returns (model, feeds): the feeds are realistic inputs under which the FP32 model is
fine and an all-FP16 engine is not. Weights are seeded numpy; names follow the PyTorch exporter.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = [
    "build_attention_logits",
    "build_causal_linear_attention",
    "build_integral_mean",
    "build_masked_sentinels",
    "build_rmsnorm_pow",
]

Feeds = list[dict[str, np.ndarray]]


def build_integral_mean(*, size: int = 1024, window: int = 17, scale: float = 1.0, seed: int = 0,
                        opset: int = 17) -> tuple[onnx.ModelProto, Feeds]:
    """``x[1,1,S,S] -> CumSum(W) -> CumSum(H) -> four-corner window sum -> / window^2``.

    At 1024x1024 with U(0,1) inputs the integral reaches ~5.2e5 (overflow); at 224x224 it stays at
    ~2.5e4 < 65504 but FP16's spacing there (16) swamps the 17x17 box sums (~144): a precision-only
    failure that no range rule sees.
    """
    b = GraphBuilder(opset)
    s, k = size, window
    h = b.op("/pool", "Mul", ["x", b.const("/pool", np.float32(scale))])
    h = b.op("/pool", "CumSum", [h, b.ints("/pool", 3)])
    integral = b.op("/pool", "CumSum", [h, b.ints("/pool", 2)])
    axes = b.ints("/pool", [2, 3])
    n = s - k

    def corner(r0: int, c0: int) -> str:
        return b.op("/pool", "Slice", [integral, b.ints("/pool", [r0, c0]), b.ints("/pool", [r0 + n, c0 + n]), axes])

    s1, s2, s3, s4 = corner(0, 0), corner(0, k), corner(k, 0), corner(k, k)
    box = b.op("/pool", "Sub", [b.op("/pool", "Sub", [b.op("/pool", "Add", [s4, s1]), s2]), s3])
    b.op("/pool", "Div", [box, b.const("/pool", np.float32(k * k))], out_names=["y"])
    model = b.model(graph_name="integral_mean", inputs=[("x", [1, 1, s, s])], outputs=[("y", [1, 1, n, n])])
    rng = np.random.default_rng(seed)
    return model, [{"x": rng.random((1, 1, s, s), dtype=np.float32)}]


def build_rmsnorm_pow(*, tokens: int = 64, dim: int = 256, seed: int = 0, opset: int = 17) -> tuple[onnx.ModelProto, Feeds]:
    """Residual stream (|x| up to ~400) -> T5 RMSNorm: ``Pow(x, 2)`` reaches 1.6e5 and overflows,
    although the normalized output is O(1)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    w = (rng.normal(0, 1, (dim, dim)) * 40 / np.sqrt(dim)).astype(np.float32)
    h = b.op("/layer.0", "MatMul", ["x", b.const("/layer.0", w, name="layer.0.weight")])
    sq = b.op("/norm", "Pow", [h, b.const("/norm", np.float32(2.0))])
    var = b.reduce_mean("/norm", sq, [-1])
    var = b.op("/norm", "Add", [var, b.const("/norm", np.float32(1e-6))])
    inv = b.op("/norm", "Reciprocal", [b.op("/norm", "Sqrt", [var])])
    h = b.op("/norm", "Mul", [h, inv])
    h = b.op("/norm", "Mul", [h, b.const("/norm", np.ones(dim, np.float32), name="norm.weight")])
    w2 = (rng.normal(0, 1, (dim, dim)) / np.sqrt(dim)).astype(np.float32)
    b.op("/out", "MatMul", [h, b.const("/out", w2, name="out.weight")], out_names=["y"])
    model = b.model(graph_name="rmsnorm_pow", inputs=[("x", [1, tokens, dim])], outputs=[("y", [1, tokens, dim])])
    return model, [{"x": rng.normal(0, 10, (1, tokens, dim)).astype(np.float32)}]


def build_attention_logits(*, tokens: int = 64, dim: int = 64, seed: int = 0, opset: int = 17) -> tuple[onnx.ModelProto, Feeds]:
    """``q·kᵀ`` (|logits| ~1e5) overflows before the ``/ sqrt(d)`` divide; softmax output is fine."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    wq = (rng.normal(0, 1, (dim, dim)) * 6 / np.sqrt(dim)).astype(np.float32)
    # Keys close to queries: the diagonal logits are |q|^2 ~ 1e5, as in attention sinks.
    wk = (wq + rng.normal(0, 1, (dim, dim)) * 0.5 / np.sqrt(dim)).astype(np.float32)
    q = b.op("/attn/q", "MatMul", ["x", b.const("/attn/q", wq, name="q.weight")])
    k = b.op("/attn/k", "MatMul", ["x", b.const("/attn/k", wk, name="k.weight")])
    kt = b.op("/attn", "Transpose", [k], perm=[0, 2, 1])
    logits = b.op("/attn", "MatMul", [q, kt])
    scaled = b.op("/attn", "Div", [logits, b.const("/attn", np.float32(np.sqrt(dim)))])
    probs = b.op("/attn", "Softmax", [scaled], axis=-1)
    b.op("/attn", "MatMul", [probs, "x"], out_names=["y"])
    model = b.model(graph_name="attention_logits", inputs=[("x", [1, tokens, dim])], outputs=[("y", [1, tokens, dim])])
    return model, [{"x": rng.normal(0, 8, (1, tokens, dim)).astype(np.float32)}]


def build_causal_linear_attention(*, tokens: int = 512, dim: int = 32, seed: int = 0,
                                  opset: int = 17) -> tuple[onnx.ModelProto, Feeds]:
    """Causal linear attention: ``S_t = cumsum(k_t ⊗ v_t)``, ``o_t = q_t · S_t / (q_t · z_t)``.

    The CumSum of keys (z) stays in range; the contraction ``q_t · S_t`` (a sum over ``dim`` of
    products with the prefix sums) passes 65504 before the normalizing divide.
    """
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    t, d = tokens, dim
    phi_q = b.op("/attn", "Relu", ["q"])
    phi_k = b.op("/attn", "Relu", ["k"])
    kv = b.op("/attn", "Mul", [b.op("/attn", "Unsqueeze", [phi_k, b.ints("/attn", [-1])]),
                               b.op("/attn", "Unsqueeze", ["v", b.ints("/attn", [-2])])])  # [1,t,d,d]
    s = b.op("/attn", "CumSum", [kv, b.ints("/attn", 1)])
    z = b.op("/attn", "CumSum", [phi_k, b.ints("/attn", 1)])  # [1,t,d]
    num = b.op("/attn", "MatMul", [b.op("/attn", "Unsqueeze", [phi_q, b.ints("/attn", [-2])]), s])  # [1,t,1,d]
    num = b.op("/attn", "Squeeze", [num, b.ints("/attn", [-2])])
    den = b.op("/attn", "ReduceSum", [b.op("/attn", "Mul", [phi_q, z]), b.ints("/attn", [-1])], keepdims=1)
    b.op("/attn", "Div", [num, den], out_names=["y"])
    shape = [1, t, d]
    model = b.model(graph_name="causal_linear_attention", inputs=[("q", shape), ("k", shape), ("v", shape)],
                    outputs=[("y", shape)])
    feed = {"q": rng.uniform(0, 8, shape).astype(np.float32), "k": rng.uniform(0, 1, shape).astype(np.float32),
            "v": rng.uniform(0, 8, shape).astype(np.float32)}
    return model, [feed]


def build_masked_sentinels(*, tokens: int = 16, seed: int = 0, opset: int = 17) -> tuple[onnx.ModelProto, Feeds]:
    """No FP16 problem at all, only things that look like one: ``log(0) = -inf`` masked by a
    Where, and an additive ``finfo(float32).min`` causal mask before a Softmax."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    zero = b.const("/log", np.float32(0.0))
    logx = b.op("/log", "Log", ["x"])
    safe = b.op("/log", "Where", [b.op("/log", "Equal", ["x", zero]), zero, logx])
    mask = np.triu(np.full((tokens, tokens), np.finfo(np.float32).min, np.float32), 1)
    scores = b.op("/attn", "Add", [safe, b.const("/attn", mask, name="causal_mask")])
    b.op("/attn", "Softmax", [scores], axis=-1, out_names=["y"])
    model = b.model(graph_name="masked_sentinels", inputs=[("x", [1, tokens, tokens])], outputs=[("y", [1, tokens, tokens])])
    x = rng.uniform(0.5, 2, (1, tokens, tokens)).astype(np.float32)
    x[x < 0.8] = 0.0
    return model, [{"x": x}]
