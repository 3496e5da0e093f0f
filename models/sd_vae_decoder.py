"""An SD-VAE-style decoder whose residual stream passes 65504 on its way into GroupNorm.

Layout as diffusers' ``AutoencoderKL`` decoder exports it (opset 17, scaled down)::

    latent[1,4,h,w] -> post_quant_conv (1x1) -> decoder.conv_in (3x3, 4 -> C)
      -> mid_block: resnets.0 -> attentions.0 -> resnets.1
      -> up_blocks.0: resnets.0 -> upsamplers.0 (Resize nearest x2 -> conv) -> resnets.1        (optional)
      -> conv_norm_out (GroupNorm) -> SiLU -> conv_out (C -> 3) -> sample
    resnet:    x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))
    attention: x + to_out(softmax(q kT / sqrt(C)) v), with q, k, v = Linear(GN(x)) over the h*w positions

GroupNorm is ``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add`` and SiLU is ``Sigmoid -> Mul``, as
torch.onnx writes them at opset 17; SiLU always comes *after* the norm. Like the SDXL VAE ("internal activation
values are too big"), a few channels of the stream carry huge values: conv_in gives two channels a bias of
~2.4e4 and every resnet's conv2 adds ~1.4e4 more (the upsampler's conv passes them through), so the stream
passes 65504 in the up block (6.6e4, then 8e4 into conv_norm_out). Each tensor fits FP16 until a residual Add sums them; from there on the FP16 stream is inf and the
next GroupNorm turns it into NaN.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnx_fp16_rewrite.models.small import GraphBuilder

__all__ = ["MASSIVE_CHANNELS", "build_sd_vae_decoder", "demo_inputs"]

logger = logging.getLogger(__name__)

MASSIVE_CHANNELS = (5, 37)
_CONV_IN_BIAS = 2.4e4
_RESNET_BIAS = 1.4e4
_GROUPS = 32
_EPS = 1e-6


class _Decoder:
    def __init__(self, b: GraphBuilder, rng: np.random.Generator, channels: int, size: int) -> None:
        self.b, self.rng, self.c, self.size = b, rng, channels, size

    def conv(self, scope: str, x: str, prefix: str, c_in: int, c_out: int, k: int = 3, gain: float = 1.0,
             bias: np.ndarray | None = None, keep_massive: bool = False) -> str:
        fan_in = c_in * k * k
        w = (self.rng.uniform(-1, 1, (c_out, c_in, k, k)) * gain / np.sqrt(fan_in)).astype(np.float32)
        if keep_massive:  # the massive channels pass through (centre tap), without leaking into the others
            w[:, list(MASSIVE_CHANNELS)] = 0.0
            for ch in MASSIVE_CHANNELS:
                w[ch] = 0.0
                w[ch, ch, k // 2, k // 2] = 1.0
        if bias is None:
            bias = self.rng.uniform(-0.05, 0.05, c_out)
        return self.b.conv(scope, x, w, bias.astype(np.float32), prefix=prefix, pad=k // 2)

    def group_norm(self, scope: str, x: str, prefix: str) -> str:
        b, c = self.b, self.c
        shape = b.op(scope, "Shape", [x])
        grouped = b.op(scope, "Reshape", [x, b.ints(scope, [0, _GROUPS, -1])])
        normed = b.op(scope, "InstanceNormalization", [grouped, b.const(scope, np.ones(_GROUPS, np.float32)),
                                                       b.const(scope, np.zeros(_GROUPS, np.float32))], epsilon=_EPS)
        y = b.op(scope, "Reshape", [normed, shape])
        gamma = (1.0 + self.rng.uniform(-0.2, 0.2, (c, 1, 1))).astype(np.float32)
        y = b.op(scope, "Mul", [y, b.const(scope, gamma, name=f"{prefix}.weight")])
        return b.op(scope, "Add", [y, b.const(scope, self.rng.uniform(-0.1, 0.1, (c, 1, 1)), name=f"{prefix}.bias")])

    def silu(self, scope: str, x: str) -> str:
        return self.b.op(scope, "Mul", [x, self.b.op(scope, "Sigmoid", [x])])

    def resnet(self, scope: str, x: str, prefix: str) -> str:
        c = self.c
        h = self.silu(f"{scope}/nonlinearity", self.group_norm(f"{scope}/norm1", x, f"{prefix}.norm1"))
        h = self.conv(f"{scope}/conv1", h, f"{prefix}.conv1", c, c)
        h = self.silu(f"{scope}/nonlinearity_1", self.group_norm(f"{scope}/norm2", h, f"{prefix}.norm2"))
        bias = self.rng.uniform(-0.05, 0.05, c)
        bias[list(MASSIVE_CHANNELS)] = _RESNET_BIAS * np.array([1.0, -1.0])
        h = self.conv(f"{scope}/conv2", h, f"{prefix}.conv2", c, c, gain=0.5, bias=bias)
        return self.b.op(scope, "Add", [x, h])

    def attention(self, scope: str, x: str, prefix: str, hw: int) -> str:
        b, c = self.b, self.c
        h = self.group_norm(f"{scope}/group_norm", x, f"{prefix}.group_norm")
        h = b.op(scope, "Transpose", [b.op(scope, "Reshape", [h, b.ints(scope, [1, c, hw])])], perm=[0, 2, 1])

        def linear(name: str, inp: str, gain: float = 1.0) -> str:
            w = (self.rng.standard_normal((c, c)) * gain / np.sqrt(c)).astype(np.float32)
            y = b.op(f"{scope}/{name}", "MatMul", [inp, b.const(scope, w, name=f"{prefix}.{name}.weight")])
            return b.op(f"{scope}/{name}", "Add", [y, b.const(scope, self.rng.uniform(-0.05, 0.05, c),
                                                           name=f"{prefix}.{name}.bias")])

        q, k, v = linear("to_q", h), linear("to_k", h), linear("to_v", h)
        scores = b.op(scope, "MatMul", [q, b.op(scope, "Transpose", [k], perm=[0, 2, 1])])
        scores = b.op(scope, "Mul", [scores, b.const(scope, np.float32(1.0 / np.sqrt(c)))])
        ctx = b.op(scope, "MatMul", [b.op(scope, "Softmax", [scores], axis=-1), v])
        out = linear("to_out.0", ctx, gain=0.5)
        out = b.op(scope, "Reshape", [b.op(scope, "Transpose", [out], perm=[0, 2, 1]),
                                      b.ints(scope, [1, c, self.size, self.size])])
        return b.op(scope, "Add", [out, x])


def build_sd_vae_decoder(*, latent_size: int = 8, channels: int = 64, upsample: bool = True, seed: int = 0,
                         opset: int = 17) -> onnx.ModelProto:
    """Input ``latent`` [1,4,h,w], output ``sample`` [1,3,H,W] (H = 2h with ``upsample``)."""
    if channels % _GROUPS or max(MASSIVE_CHANNELS) >= channels:
        raise ValueError(f"channels must be a multiple of {_GROUPS} and > {max(MASSIVE_CHANNELS)}, got {channels}")
    rng = np.random.default_rng(seed)
    b = GraphBuilder(opset)
    c = channels
    dec = _Decoder(b, rng, c, latent_size)
    x = dec.conv("/post_quant_conv", "latent", "post_quant_conv", 4, 4, k=1)
    bias = rng.uniform(-0.05, 0.05, c)
    bias[list(MASSIVE_CHANNELS)] = _CONV_IN_BIAS * np.array([1.0, -1.0])
    x = dec.conv("/decoder/conv_in", x, "decoder.conv_in", 4, c, bias=bias)
    x = dec.resnet("/decoder/mid_block/resnets.0", x, "decoder.mid_block.resnets.0")
    x = dec.attention("/decoder/mid_block/attentions.0", x, "decoder.mid_block.attentions.0", latent_size ** 2)
    x = dec.resnet("/decoder/mid_block/resnets.1", x, "decoder.mid_block.resnets.1")
    up = "/decoder/up_blocks.0"
    x = dec.resnet(f"{up}/resnets.0", x, "decoder.up_blocks.0.resnets.0")
    size = latent_size
    if upsample:
        scales = b.const(f"{up}/upsamplers.0", np.array([1.0, 1.0, 2.0, 2.0], np.float32))
        x = b.op(f"{up}/upsamplers.0", "Resize", [x, "", scales], mode="nearest",
                 coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        x = dec.conv(f"{up}/upsamplers.0/conv", x, "decoder.up_blocks.0.upsamplers.0.conv", c, c, gain=0.5,
                     keep_massive=True)
        size *= 2
        dec.size = size
    x = dec.resnet(f"{up}/resnets.1", x, "decoder.up_blocks.0.resnets.1")
    x = dec.silu("/decoder/conv_act", dec.group_norm("/decoder/conv_norm_out", x, "decoder.conv_norm_out"))
    w = (rng.uniform(-1, 1, (3, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
    b.conv("/decoder/conv_out", x, w, np.zeros(3, np.float32), prefix="decoder.conv_out", pad=1, out_name="sample")
    logger.debug("sd vae decoder: latent %d, %d channels, upsample %s", latent_size, c, upsample)
    return b.model(graph_name="sd_vae_decoder", inputs=[("latent", [1, 4, latent_size, latent_size])],
                   outputs=[("sample", [1, 3, size, size])],
                   doc="SD-VAE-style decoder; residual stream past 65504 into GroupNorm (exported form)")


def demo_inputs(model: onnx.ModelProto, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A latent ~ N(0, 1), as the diffusion model hands it over (after 1/scaling_factor)."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"latent": np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}
