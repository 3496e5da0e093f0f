"""diffusers ``AutoencoderKL`` decoder (small config, random weights) whose residual stream passes 65504.

``vae-decoder``: ``vae.decode(latent)`` (post_quant_conv, conv_in, mid block with attention, two up blocks of two
resnets, one upsampler, GroupNorm, SiLU, conv_out). Like the SD/SDXL VAE ("internal activation values are too
big", madebyollin/sdxl-vae-fp16-fix), two channels of the stream carry huge values: conv_in gives them a bias of
+-2.4e4 and every resnet's conv2 adds +-1.4e4 more (the upsampler's conv passes them through), so the stream passes
65504 in the first up block and reaches ~1.1e5 at conv_norm_out. Every tensor fits FP16 until a residual Add sums
them; in FP16 the next GroupNorm turns the inf into NaN.
"""

from __future__ import annotations

import numpy as np

from onnx_fp16_rewrite.models.exported.export import import_torch
from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["SPECS"]

_LATENT = (1, 4, 16, 16)
_CHANNELS, _MASSIVE = 32, (5, 21)
_CONV_IN_BIAS, _RESNET_BIAS = 2.4e4, 1.4e4


def _vae_decoder():
    torch = import_torch()
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(_CHANNELS,) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64).eval()
    dec, ch, sign = vae.decoder, list(_MASSIVE), torch.tensor([1.0, -1.0])
    resnets = [*dec.mid_block.resnets, *(r for block in dec.up_blocks for r in block.resnets)]
    with torch.no_grad():
        dec.conv_in.bias[ch] = _CONV_IN_BIAS * sign
        for resnet in resnets:
            resnet.conv2.bias[ch] += _RESNET_BIAS * sign
        for block in dec.up_blocks:
            for up in block.upsamplers or []:
                # The massive channels pass through the upsampler's conv without leaking into the others.
                w = up.conv.weight
                w[:, ch] = 0.0
                w[ch] = 0.0
                for c in ch:
                    w[c, c, 1, 1] = 1.0
                up.conv.bias[ch] = 0.0

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return Decode().eval()


def _vae_feeds() -> list[Feed]:
    return [{"latent": np.random.default_rng(0).standard_normal(_LATENT).astype(np.float32)}]


SPECS = [
    Spec("vae-decoder", _vae_decoder, _vae_feeds, ("latent",), ("sample",),
         about="diffusers AutoencoderKL decoder, residual stream past 65504 into GroupNorm (SDXL-VAE-like)"),
]
