"""Tiny torch modules exported with both torch exporters, written the way real models write these patterns
(shape-computed scales, F.pad, cumsum, no-op casts, BatchNorm after Conv), for the meaning-level rewrites' tests.
Until ``models.exported`` lands these stay small: each export takes about a second (TorchScript) or a few
(dynamo). Exports are cached per process."""

from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
import onnx


def _torch():
    import torch

    return torch


def export(module, args: tuple, *, dynamo: bool, opset: int | None = None, names=("x",), fold: bool = True
           ) -> onnx.ModelProto:
    """TorchScript at opset 17, dynamo at 18 (its lowest without a version conversion). ``fold=False`` keeps
    BatchNormalization after Conv (both exporters fold it into the Conv otherwise; Paddle keeps it)."""
    torch = _torch()
    opset = opset or (18 if dynamo else 17)
    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(module, args, input_names=list(names), output_names=["y"], opset_version=opset,
                                     dynamo=True, verbose=False, optimize=fold)
            return prog.model_proto
        torch.onnx.export(module, args, buf, input_names=list(names), output_names=["y"], opset_version=opset,
                          dynamo=False, do_constant_folding=fold)
    return onnx.load_from_string(buf.getvalue())


def _modules():
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class LinearAttention(nn.Module):
        """Causal linear attention (Katharopoulos et al. 2020): phi(q).cumsum(phi(k) x v) / phi(q).cumsum(phi(k))."""

        def __init__(self, d=16):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            for m in (self.q, self.k, self.v, self.o):
                m.weight.data = torch.randn(d, d, generator=g) / math.sqrt(d)
            self.v.weight.data *= 60.0  # trained value projections of long sequences reach this range

        def forward(self, x):
            q, k, v = F.elu(self.q(x)) + 1, F.elu(self.k(x)) + 1, self.v(x)
            kv = torch.cumsum(torch.einsum("bnd,bne->bnde", k, v), dim=1)
            num = torch.einsum("bnd,bnde->bne", q, kv)
            den = torch.einsum("bnd,bnd->bn", q, torch.cumsum(k, dim=1)).unsqueeze(-1)
            return self.o(num / den)

    class LogMel(nn.Module):
        """A log-mel front end: STFT as a strided Conv (Hann-windowed DFT), power, mel MatMul, Log."""

        def __init__(self, n_fft=128, hop=64, n_mels=16):
            super().__init__()
            n = torch.arange(n_fft, dtype=torch.float64)
            f = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
            win = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
            ang = 2 * math.pi * f[:, None] * n[None, :] / n_fft
            basis = torch.cat([torch.cos(ang) * win, -torch.sin(ang) * win]).float()[:, None, :]
            self.register_buffer("basis", basis)
            g = torch.Generator().manual_seed(0)
            mel = torch.rand(n_fft // 2 + 1, n_mels, generator=g)
            self.register_buffer("mel", mel / mel.sum(0, keepdim=True))
            self.hop, self.bins = hop, n_fft // 2 + 1

        def forward(self, x):
            spec = F.conv1d(x, self.basis, stride=self.hop)
            re, im = spec[:, : self.bins], spec[:, self.bins:]
            power = (re * re + im * im).transpose(1, 2)
            return torch.log(torch.clamp(power @ self.mel, min=1e-10))

    class ConvBN(nn.Module):
        """Conv -> BatchNorm -> Relu -> Conv with BN kept (as Paddle exports it). Three channels of the first Conv
        are nearly constant (small weights on a large bias, as a trained detector's dead-ish channels are); their
        running statistics are what training would have measured, so the BN amplifies ``y - mean`` ~160x, and
        an FP16-stored Conv output (spacing 0.004 near 4) loses most of that difference."""

        def __init__(self, c=8):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv1 = nn.Conv2d(3, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, 4, 3, padding=1)
            self.conv1.weight.data[:3] *= 1e-2
            self.conv1.bias.data[:3] = 4.0
            with torch.no_grad():
                y = self.conv1(torch.rand(16, 3, 16, 16, generator=g))
            self.bn.running_mean.data = y.mean((0, 2, 3))
            self.bn.running_var.data = y.var((0, 2, 3))
            self.bn.weight.data = torch.rand(c, generator=g) + 0.5
            self.bn.bias.data = torch.randn(c, generator=g) * 0.1

        def forward(self, x):
            return self.conv2(torch.relu(self.bn(self.conv1(x))))

    class ComputedScaleAttention(nn.Module):
        """Causal attention scaled by ``torch.full([], v.size(-1) ** 0.5)`` (a tensor computed from constants once
        exported), masked with ``finfo(float32).min``. Massive activations (Sun et al. 2024) on the first and last
        token make q_0 . k_last ~1e5 raw (1.2e4 after the divide), above the diagonal, where the mask removes it."""

        def __init__(self, d=64):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.qkv = nn.Linear(d, 3 * d)
            self.qkv.weight.data = torch.randn(3 * d, d, generator=g) * 0.1
            self.qkv.weight.data[0, 7] = 3.2       # massive dim 7 -> q channel 0
            self.qkv.weight.data[d, 9] = 3.2       # massive dim 9 -> k channel 0

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            n = x.shape[1]
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            attn = q @ k.transpose(-2, -1) / torch.full([], v.size(-1) ** 0.5)
            attn = attn.masked_fill(~causal, torch.finfo(torch.float32).min)
            return attn.softmax(-1) @ v

    class MaskedAttention(nn.Module):
        """Two attentions whose masks are filled with finfo(float32).min through Where (dynamo shares the fill)."""

        def __init__(self, d=32):
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)
            self.qkv.weight.data *= 4.0

        def forward(self, x):
            n = x.shape[1]
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            fill = torch.finfo(torch.float32).min
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            a = (q @ k.transpose(-2, -1)) / 8.0
            a = torch.where(causal, a, torch.tensor(fill)).softmax(-1) @ v
            b = (a @ a.transpose(-2, -1)) / 8.0
            return torch.where(causal, b, torch.tensor(fill)).softmax(-1) @ a

    class BoxFilter(nn.Module):
        """A local mean written with F.pad + cumsum + slicing (NAFNet/guided-filter style), window r."""

        def __init__(self, r=8):
            super().__init__()
            self.r = r

        def forward(self, x):
            r = self.r
            c = F.pad(x, (1, 0, 1, 0)).cumsum(2).cumsum(3)
            h, w = x.shape[2], x.shape[3]
            s = c[:, :, r:, r:] - c[:, :, :h + 1 - r, r:] - c[:, :, r:, :w + 1 - r] + c[:, :, :h + 1 - r, :w + 1 - r]
            return s / (r * r)

    return dict(linear_attention=LinearAttention, log_mel=LogMel, conv_bn=ConvBN,
                computed_scale_attention=ComputedScaleAttention, masked_attention=MaskedAttention,
                box_filter=BoxFilter)


INPUTS = {
    "linear_attention": lambda rng: rng.standard_normal((1, 256, 16)).astype(np.float32),
    "log_mel": lambda rng: (rng.uniform(-1, 1, (1, 1, 4096)) * 32767).astype(np.float32),
    "conv_bn": lambda rng: rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32),
    "computed_scale_attention": lambda rng: _massive(rng.standard_normal((1, 16, 64)).astype(np.float32)),
    "masked_attention": lambda rng: rng.standard_normal((1, 16, 32)).astype(np.float32),
    "box_filter": lambda rng: rng.uniform(0, 255, (1, 1, 64, 64)).astype(np.float32),
}


def _massive(x: np.ndarray) -> np.ndarray:
    x[0, 0, 7], x[0, -1, 9] = 100.0, 100.0       # BOS and delimiter tokens
    return x


@functools.lru_cache(maxsize=None)
def _build(name: str, dynamo: bool) -> bytes:
    torch = _torch()
    torch.manual_seed(0)
    module = _modules()[name]()
    x = torch.from_numpy(INPUTS[name](np.random.default_rng(0)))
    return export(module, (x,), dynamo=dynamo, fold=name != "conv_bn").SerializeToString()


def build(name: str, *, dynamo: bool = False) -> onnx.ModelProto:
    return onnx.load_from_string(_build(name, dynamo))


def feeds(name: str, seeds=(0, 1)) -> list[dict[str, np.ndarray]]:
    return [{"x": INPUTS[name](np.random.default_rng(s))} for s in seeds]


def _t5_module():
    """A T5 v1.1-style encoder written as transformers writes it (T5LayerNorm: ``x.to(float32).pow(2).mean`` ->
    ``x * rsqrt(var + eps)`` -> ``weight * x``; gated-GELU FF; attention without 1/sqrt(d)). transformers' own
    T5 cannot be imported in this venv while torchvision 0.28 does not match torch 2.13 (``torchvision::nms``)."""
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class T5LayerNorm(nn.Module):
        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

        def forward(self, hidden_states):
            variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            return self.weight * hidden_states

    class Block(nn.Module):
        def __init__(self, d=64, heads=4, d_ff=128):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = T5LayerNorm(d), T5LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.wi_0, self.wi_1 = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
            self.wo = nn.Linear(d_ff, d, bias=False)

        def forward(self, h):
            b, n, d = h.shape
            x = self.ln1(h)
            q, k, v = (m(x).view(b, n, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-2, -1), -1) @ v
            h = h + self.o(a.transpose(1, 2).reshape(b, n, d))
            x = self.ln2(h)
            return h + self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))

    class Encoder(nn.Module):
        def __init__(self, vocab=64, d=64):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList([Block(d), Block(d)])
            self.final = T5LayerNorm(d)
            for p in self.parameters():
                p.data = torch.randn(p.shape, generator=g) * (0.05 if p.ndim == 2 else 1.0) + (p.ndim == 1)
            self.embed.weight.data *= 20.0
            self.blocks[-1].wo.weight.data *= 6e5  # the FF output that carries trained T5 v1.1 past 65504

        def forward(self, input_ids):
            h = self.embed(input_ids)
            for blk in self.blocks:
                h = blk(h)
            return self.final(h)

    return Encoder()


@functools.lru_cache(maxsize=None)
def _build_t5(dynamo: bool) -> bytes:
    """The T5-style encoder exported; its last FF output passes 65504 (why transformers clamps T5's FP16 states)."""
    torch = _torch()
    ids = torch.from_numpy(t5_feeds()[0]["input_ids"])
    return export(_t5_module(), (ids,), dynamo=dynamo, names=("input_ids",)).SerializeToString()
def build_t5(*, dynamo: bool = False) -> onnx.ModelProto:
    return onnx.load_from_string(_build_t5(dynamo))


def t5_feeds(seeds=(0, 1)) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": np.random.default_rng(s).integers(0, 64, (1, 16)).astype(np.int64)} for s in seeds]
