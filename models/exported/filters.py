"""Integral-image filters written in torch as their authors wrote them: ``F.pad``, ``cumsum`` and slicing.

``guided-filter``: He et al.'s guided filter, every box mean an integral image of the zero-padded input, the
window counts ``N = box(ones_like(I))`` computed from the input's shape (TorchScript: Shape -> ConstantOfShape),
and the pads of ``F.pad`` a Pad whose ``pads`` the exporter computes. At 256x256 the prefix sums of U(0,1) images
reach ~3.3e4: inside FP16's range, yet FP16's spacing there (16-32) swamps the 17x17 window sums they cancel to.

``nafnet-local-pool``: a NAFNet block whose ``sca`` runs NAFNet's test-time local average pooling
(``basicsr/models/archs/local_arch.py``, ``fast_imp=False``): ``x.cumsum(-1).cumsum(-2)``, ``F.pad(s, (1,0,1,0))``,
four corner slices, ``/ (k1*k2)`` and a replicate ``F.pad`` back to the input size with pads computed from
``x.shape``. The gated features have a mean of ~3 (as a trained model's are, not ~0), so the 192x192 integral
image passes 65504 (~1.1e5).

``nafnet-local-unet``: megvii's whole ``NAFNetLocal`` UNet (``nafnet_local_maker``: stride-2 downs, PixelShuffle
ups, skip Adds, five local windows of three sizes), small: the 256x256 level's integral images pass 65504.
"""

from __future__ import annotations

import numpy as np

from onnx_fp16_rewrite.models.exported.export import import_torch
from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["SPECS", "nafnet_block", "nafnet_local_maker"]

_GF_SIZE, _GF_RADIUS, _GF_EPS = 256, 8, 1e-2
_NAF_SIZE, _NAF_KERNEL, _NAF_WIDTH = 192, 96, 16
# nafnet-local-unet: two levels of width 8 -> 16 -> 32 at 256x256, converted at train size 128 / base 192:
# windows 192, 96 and 48 on feature maps of 256, 128 and 64.
_UNET = dict(size=256, width=8, enc=(1, 1), middle=1, dec=(1, 1), train=128, base=192)


def _guided_filter():
    torch = import_torch()
    F = torch.nn.functional

    def box_sum(x, r: int):
        k = 2 * r + 1
        s = F.pad(x, (r + 1, r, r + 1, r)).cumsum(-1).cumsum(-2)
        return s[..., k:, k:] - s[..., :-k, k:] - s[..., k:, :-k] + s[..., :-k, :-k]

    class GuidedFilter(torch.nn.Module):
        def __init__(self, r: int, eps: float) -> None:
            super().__init__()
            self.r, self.eps = r, eps

        def forward(self, guide, src):
            r = self.r
            n = box_sum(torch.ones_like(guide[:, :1]), r)
            mean_i, mean_p = box_sum(guide, r) / n, box_sum(src, r) / n
            cov_ip = box_sum(guide * src, r) / n - mean_i * mean_p
            var_i = box_sum(guide * guide, r) / n - mean_i * mean_i
            a = cov_ip / (var_i + self.eps)
            b = mean_p - a * mean_i
            return (box_sum(a, r) / n) * guide + box_sum(b, r) / n

    return GuidedFilter(_GF_RADIUS, _GF_EPS).eval()


def _guided_filter_feeds() -> list[Feed]:
    rng = np.random.default_rng(0)
    s = _GF_SIZE
    return [{"guide": rng.random((1, 1, s, s), dtype=np.float32), "src": rng.random((1, 3, s, s), dtype=np.float32)}]


def nafnet_block():
    """NAFNet's block as megvii's ``basicsr`` writes it, in its test-time local form: ``NAFBlock(c, kernel)``
    (DW and FFN expand 2) whose ``sca`` pools over a ``kernel``-square window (``local_arch.py``'s
    ``AvgPool2d(fast_imp=False, auto_pad=True)``). The corpus block below and ``sized.nafnet``'s UNet use it."""
    torch = import_torch()
    F, nn = torch.nn.functional, torch.nn

    class LocalAvgPool2d(nn.Module):
        """NAFNet's AvgPool2d(kernel_size, fast_imp=False, auto_pad=True) at test time."""

        def __init__(self, kernel: int) -> None:
            super().__init__()
            self.kernel = kernel

        def forward(self, x):
            k1, k2 = min(x.shape[-2], self.kernel), min(x.shape[-1], self.kernel)
            s = x.cumsum(dim=-1).cumsum(dim=-2)
            s = F.pad(s, (1, 0, 1, 0))
            s1, s2, s3, s4 = s[:, :, :-k1, :-k2], s[:, :, :-k1, k2:], s[:, :, k1:, :-k2], s[:, :, k1:, k2:]
            out = (s4 + s1 - s2 - s3) / (k1 * k2)
            _, _, h, w = x.shape
            _h, _w = out.shape[2:]
            pad2d = ((w - _w) // 2, (w - _w + 1) // 2, (h - _h) // 2, (h - _h + 1) // 2)
            return F.pad(out, pad2d, mode="replicate")

    class LayerNorm2d(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

        def forward(self, x):
            mu = x.mean(1, keepdim=True)
            var = (x - mu).pow(2).mean(1, keepdim=True)
            y = (x - mu) / (var + 1e-6).sqrt()
            return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)

    class SimpleGate(nn.Module):
        def forward(self, x):
            x1, x2 = x.chunk(2, dim=1)
            return x1 * x2

    class NAFBlock(nn.Module):
        def __init__(self, c: int, kernel: int) -> None:
            super().__init__()
            self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
            self.conv1 = nn.Conv2d(c, 2 * c, 1)
            self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
            self.sg = SimpleGate()
            self.sca = nn.Sequential(LocalAvgPool2d(kernel), nn.Conv2d(c, c, 1))
            self.conv3 = nn.Conv2d(c, c, 1)
            self.conv4, self.conv5 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(c, c, 1)
            self.beta = nn.Parameter(torch.full((1, c, 1, 1), 0.5))
            self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.5))

        def forward(self, inp):
            x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
            x = self.conv3(x * self.sca(x))
            y = inp + x * self.beta
            x = self.conv5(self.sg(self.conv4(self.norm2(y))))
            return y + x * self.gamma

    return NAFBlock


def _nafnet_local_pool():
    torch = import_torch()
    nn = torch.nn
    NAFBlock = nafnet_block()

    class TinyNAFNet(nn.Module):
        def __init__(self, width: int, kernel: int) -> None:
            super().__init__()
            self.intro = nn.Conv2d(3, width, 3, padding=1)
            self.block = NAFBlock(width, kernel)
            self.ending = nn.Conv2d(width, 3, 3, padding=1)

        def forward(self, image):
            return self.ending(self.block(self.intro(image))) + image

    torch.manual_seed(0)
    model = TinyNAFNet(_NAF_WIDTH, _NAF_KERNEL)
    with torch.no_grad():
        # Trained gates are not centred: both halves ~1.7, their product (the integral image's input) ~3.
        model.block.conv2.bias.fill_(1.7)
    return model.eval()


def _nafnet_feeds() -> list[Feed]:
    s = _NAF_SIZE
    return [{"image": np.random.default_rng(0).random((1, 3, s, s), dtype=np.float32)}]


def nafnet_local_maker(*, size: int, width: int, enc: tuple[int, ...], middle: int, dec: tuple[int, ...],
                       train: int, base: int):
    """megvii's NAFNet UNet (``NAFNet_arch.py``: intro conv; encoder levels of NAFBlocks, each followed by a stride-2
    conv; middle blocks; decoder levels, each after a 1x1 conv + PixelShuffle(2) and the skip Add; ending conv;
    input residual) in its test-time local form (``NAFNetLocal``: ``Local_Base.convert(base_size=(base,) * 2,
    train_size=(1, 3, train, train))``, so each block's ``sca`` pools a window of ``base / train`` times its level's
    training-size feature map) on a ``size``-square image, as ``(module, feeds)`` callables. Every block's gate is
    biased as in ``nafnet-local-pool``, so the integral images of the full-resolution levels pass 65504."""

    def feeds() -> list[Feed]:
        return [{"image": np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)}]

    def module():
        torch = import_torch()
        nn = torch.nn
        NAFBlock = nafnet_block()

        def kernel(level: int) -> int:  # Local_Base: the window measured on the training-size feature map
            return (train >> level) * base // train

        class NAFNetLocal(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.intro = nn.Conv2d(3, width, 3, padding=1)
                self.ending = nn.Conv2d(width, 3, 3, padding=1)
                self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
                self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
                chan = width
                for level, num in enumerate(enc):
                    self.encoders.append(nn.Sequential(*[NAFBlock(chan, kernel(level)) for _ in range(num)]))
                    self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
                    chan *= 2
                self.middle = nn.Sequential(*[NAFBlock(chan, kernel(len(enc))) for _ in range(middle)])
                for level, num in reversed(list(enumerate(dec))):
                    self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
                    chan //= 2
                    self.decoders.append(nn.Sequential(*[NAFBlock(chan, kernel(level)) for _ in range(num)]))

            def forward(self, image):
                x, skips = self.intro(image), []
                for encoder, down in zip(self.encoders, self.downs):
                    x = encoder(x)
                    skips.append(x)
                    x = down(x)
                x = self.middle(x)
                for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
                    x = decoder(up(x) + skip)
                return self.ending(x) + image

        torch.manual_seed(0)
        model = NAFNetLocal()
        with torch.no_grad():
            for block in model.modules():
                if isinstance(block, NAFBlock):
                    block.conv2.bias.fill_(1.7)  # trained gates are not centred (as nafnet-local-pool's)
        return model.eval()

    return module, feeds


SPECS = [
    Spec("guided-filter", _guided_filter, _guided_filter_feeds, ("guide", "src"), ("output",),
         about=f"guided filter {_GF_SIZE}px, radius {_GF_RADIUS}: integral images with F.pad/cumsum/slicing"),
    Spec("nafnet-local-pool", _nafnet_local_pool, _nafnet_feeds, ("image",), ("output",),
         about=f"NAFNet block, sca with test-time local avg pool (kernel {_NAF_KERNEL}) on {_NAF_SIZE}px"),
    Spec("nafnet-local-unet", *nafnet_local_maker(**_UNET), ("image",), ("output",),
         about=f"megvii NAFNetLocal UNet (2 levels, width {_UNET['width']}) with local sca pooling on {_UNET['size']}px"),
]
