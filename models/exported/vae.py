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

__all__ = ["SPECS", "vae_decoder_maker"]

_LATENT, _CHANNELS, _MASSIVE = 16, (32, 32), (5, 21)
_CONV_IN_BIAS, _STREAM_PEAK = 2.4e4, 1.08e5  # with the corpus' 6 resnets: +-1.4e4 per resnet


def _pass_through(conv, channels: list[int]) -> None:
    """The massive channels pass through ``conv`` (centre tap) without leaking into the others."""
    w = conv.weight
    w[:, channels] = 0.0
    w[channels] = 0.0
    for c in channels:
        w[c, c, w.shape[2] // 2, w.shape[3] // 2] = 1.0
    conv.bias[channels] = 0.0


def vae_decoder_maker(*, latent: int = _LATENT, channels: tuple[int, ...] = _CHANNELS, layers_per_block: int = 1,
                      groups: int = 8):
    """An ``AutoencoderKL`` decoder of that size and its feeds, as ``(module, feeds)`` callables: the corpus'
    ``vae-decoder`` at the defaults; the benchmark passes a realistic size. However many resnets, the stream
    peaks near ``_STREAM_PEAK`` (each resnet's conv2 adds an equal share)."""

    def feeds() -> list[Feed]:
        return [{"latent": np.random.default_rng(0).standard_normal((1, 4, latent, latent)).astype(np.float32)}]

    def module():
        torch = import_torch()
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        n = len(channels)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels),
                            layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=groups,
                            sample_size=64).eval()
        dec, ch, sign = vae.decoder, list(_MASSIVE), torch.tensor([1.0, -1.0])
        resnets = [*dec.mid_block.resnets, *(r for block in dec.up_blocks for r in block.resnets)]
        with torch.no_grad():
            dec.conv_in.bias[ch] = _CONV_IN_BIAS * sign
            for resnet in resnets:
                resnet.conv2.bias[ch] += (_STREAM_PEAK - _CONV_IN_BIAS) / len(resnets) * sign
                if resnet.conv_shortcut is not None:  # a width change: the stream goes through a 1x1 conv
                    _pass_through(resnet.conv_shortcut, ch)
            for block in dec.up_blocks:
                for up in block.upsamplers or []:
                    _pass_through(up.conv, ch)

        class Decode(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.vae = vae

            def forward(self, latent):
                return self.vae.decode(latent, return_dict=False)[0]

        return Decode().eval()

    return module, feeds


_vae_decoder, _vae_feeds = vae_decoder_maker()


SPECS = [
    Spec("vae-decoder", _vae_decoder, _vae_feeds, ("latent",), ("sample",),
         about="diffusers AutoencoderKL decoder, residual stream past 65504 into GroupNorm (SDXL-VAE-like)"),
]
