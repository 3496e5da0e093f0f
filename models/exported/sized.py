"""Corpus builders at a realistic size, for ``benchmarks/auto_fix_cost.py``; not in the corpus (no test builds them).

Each function returns a ``Spec`` whose name carries every size parameter, so the disk cache (``cache``: keyed on
name, exporter, library versions and the builder's source) keeps one export per size; build it with
``exported.build(spec, exporter)`` and feed it ``spec.feeds()``. They overflow FP16 as their corpus models do.

- ``t5_encoder``: transformers ``T5EncoderModel``, T5 v1.1 config, t5-small-like by default (d_model 512, 6
  layers, 8 heads of 64, gated-GELU d_ff 1024, vocabulary 32128, sequence 256; 450 nodes, 124 MB): one ORT
  session + run ~1 s on 2 cores (the run 0.2 s: the 124 MB of weights make the session the larger part).
  Residual stream past 65504 in the last block, NaN after the final RMSNorm in FP16.
- ``vae_decoder``: diffusers ``AutoencoderKL`` decoder (latent 32 -> 256x256 image by default, widths 128, 128,
  64, 32, two resnets per up block, GroupNorm of 32 groups; 386 nodes, 9 MB): one ORT session + run ~1-1.5 s on
  2 cores. Two massive channels push the stream past 65504; GroupNorm turns the FP16 inf into NaN. The width
  changes (1x1 conv_shortcut, which passes the massive channels through) are as in SD's VAE; with them,
  rescale-residual's exact 2^-3 leaves FP16 rel L2 0.29 (not overflow), so fix --auto pins instead.
- ``nafnet``: megvii's ``NAFNetLocal`` UNet, GoPro config at 512x512 by default (see its docstring).
"""

from __future__ import annotations

from onnx_fp16_rewrite.models.exported.hf_text import t5_encoder_maker
from onnx_fp16_rewrite.models.exported.filters import nafnet_local_maker
from onnx_fp16_rewrite.models.exported.spec import Spec
from onnx_fp16_rewrite.models.exported.vae import vae_decoder_maker

__all__ = ["nafnet", "t5_encoder", "vae_decoder"]


def t5_encoder(*, seq: int = 256, vocab: int = 32128, d_model: int = 512, d_kv: int = 64, d_ff: int = 1024,
               layers: int = 6, heads: int = 8) -> Spec:
    module, feeds = t5_encoder_maker(seq=seq, vocab=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, layers=layers,
                                     heads=heads)
    name = f"t5-encoder-seq{seq}-v{vocab}-d{d_model}-kv{d_kv}-ff{d_ff}-l{layers}-h{heads}"
    return Spec(name, module, feeds, ("input_ids",), ("last_hidden_state",),
                about="transformers T5EncoderModel at a realistic size, residual stream past 65504")


def vae_decoder(*, latent: int = 32, channels: tuple[int, ...] = (32, 64, 128, 128), layers_per_block: int = 1,
                groups: int = 32) -> Spec:
    module, feeds = vae_decoder_maker(latent=latent, channels=channels, layers_per_block=layers_per_block,
                                      groups=groups)
    name = f"vae-decoder-lat{latent}-c{'x'.join(map(str, channels))}-lpb{layers_per_block}-g{groups}"
    return Spec(name, module, feeds, ("latent",), ("sample",),
                about="diffusers AutoencoderKL decoder at a realistic size, residual stream past 65504")


def nafnet(*, size: int = 512, width: int = 32, enc: tuple[int, ...] = (1, 1, 1, 28), middle: int = 1,
           dec: tuple[int, ...] = (1, 1, 1, 1), train: int = 256, base: int = 384) -> Spec:
    """megvii's ``NAFNetLocal`` UNet (``filters.nafnet_local_maker``), by default the GoPro deblurring config (width
    32, blocks 1-1-1-28 / 1 / 1-1-1-1; ~2 GMAC a block at the 1/8 level) at 512x512, converted at train size 256
    with base size 384 (``Local_Base.convert``): 1783 nodes once canonical, 69 MB; one ORT session + run ~2 s on
    2 cores. Every output value is NaN in FP16 (the full-resolution integral images pass 65504)."""
    module, feeds = nafnet_local_maker(size=size, width=width, enc=enc, middle=middle, dec=dec, train=train, base=base)
    name = (f"nafnet-local-s{size}-w{width}-e{'x'.join(map(str, enc))}-m{middle}-d{'x'.join(map(str, dec))}"
            f"-t{train}-b{base}")
    return Spec(name, module, feeds, ("image",), ("output",),
                about="megvii NAFNetLocal (UNet of NAFBlocks with local sca pooling) at a realistic size")
