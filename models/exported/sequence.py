"""Sequence models written in torch: causal linear attention and a log-mel audio front end.

``linear-attention``: causal linear attention (Katharopoulos et al. 2020) as its reference code writes it, with
``torch.einsum``: features ``elu(x) + 1``, numerator ``q . cumsum(k (x) v)``, denominator ``q . cumsum(k)``, then
their ratio. Trained feature maps are far from zero mean (here q, k ~3, v ~1 per channel), so at T=512 both
Einsums pass 65504 (~1.5e5) although the ratio is O(1): a factor 2^-m on k reaches both and cancels in the Div.

``log-mel``: a log-mel spectrogram front end on int16-scale audio (speech models take raw PCM values): STFT as a
strided Conv1d with Hann-windowed DFT kernels, power ``re^2 + im^2``, a mel filterbank MatMul, ``log(clamp(.,
1e-10))``. A 1 kHz tone of amplitude 8000 gives STFT magnitudes of ~8e5: the first Conv already overflows, the
power reaches ~1e12. A factor 2^-m on the input becomes ``-2m ln 2`` after Log.
"""

from __future__ import annotations

import numpy as np

from onnx_fp16_rewrite.models.exported.export import import_torch
from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["SPECS", "mel_filterbank"]

_LA_SEQ, _LA_WIDTH, _LA_HEADS = 512, 64, 2
_SR, _N_FFT, _HOP, _N_MELS, _SECONDS = 16000, 400, 160, 64, 1.0


def _linear_attention():
    torch = import_torch()
    nn, F = torch.nn, torch.nn.functional

    class CausalLinearAttention(nn.Module):
        def __init__(self, width: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k = F.elu(q) + 1, F.elu(k) + 1
            kv = torch.einsum("bhtd,bhte->bhtde", k, v).cumsum(2)
            num = torch.einsum("bhtd,bhtde->bhte", q, kv)
            den = torch.einsum("bhtd,bhtd->bht", q, k.cumsum(2))
            y = num / den.unsqueeze(-1)
            return self.out(y.transpose(1, 2).reshape(b, t, c))

    torch.manual_seed(0)
    model = CausalLinearAttention(_LA_WIDTH, _LA_HEADS)
    with torch.no_grad():
        model.qkv.weight.mul_(0.5)
        c = _LA_WIDTH
        model.qkv.bias[: 2 * c].fill_(2.0)   # q, k features ~ elu(2) + 1 = 3
        model.qkv.bias[2 * c:].fill_(1.0)    # v ~ 1
    return model.eval()


def _linear_attention_feeds() -> list[Feed]:
    x = np.random.default_rng(0).standard_normal((1, _LA_SEQ, _LA_WIDTH)).astype(np.float32)
    return [{"x": x}]


def mel_filterbank(sr: int = _SR, n_fft: int = _N_FFT, n_mels: int = _N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular HTK-mel filters (unit peak)."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = hz(np.linspace(mel(0.0), mel(sr / 2), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def _log_mel():
    torch = import_torch()
    nn = torch.nn

    class LogMel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            bins = _N_FFT // 2 + 1
            n = np.arange(_N_FFT)
            window = 0.5 - 0.5 * np.cos(2 * np.pi * n / _N_FFT)
            angle = 2 * np.pi * np.outer(np.arange(bins), n) / _N_FFT
            kernels = np.concatenate([np.cos(angle), -np.sin(angle)]) * window   # [2*bins, n_fft]
            self.bins = bins
            self.stft = nn.Conv1d(1, 2 * bins, _N_FFT, stride=_HOP, bias=False)
            with torch.no_grad():
                self.stft.weight.copy_(torch.from_numpy(kernels[:, None, :].astype(np.float32)))
            self.register_buffer("mel", torch.from_numpy(mel_filterbank()))

        def forward(self, audio):
            spec = self.stft(audio.unsqueeze(1))                # [1, 2*bins, frames]
            re, im = spec[:, : self.bins], spec[:, self.bins:]
            power = re * re + im * im
            mel = torch.matmul(self.mel, power)                 # [1, n_mels, frames]
            return torch.log(torch.clamp(mel, min=1e-10))

    return LogMel().eval()


def _log_mel_feeds() -> list[Feed]:
    """A tone, a chirp and noise at int16 scale (peak ~1.2e4)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(_SR * _SECONDS)) / _SR
    audio = 8000 * np.sin(2 * np.pi * 1000 * t) + 3000 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    audio += 300 * rng.standard_normal(t.size)
    return [{"audio": np.round(audio)[None].astype(np.float32)}]


SPECS = [
    Spec("linear-attention", _linear_attention, _linear_attention_feeds, ("x",), ("output",),
         about=f"causal linear attention (einsum, cumsum), T={_LA_SEQ}: both Einsums past 65504"),
    Spec("log-mel", _log_mel, _log_mel_feeds, ("audio",), ("log_mel",),
         about="log-mel front end on int16-scale audio: Conv STFT, power, mel MatMul, Log"),
]
