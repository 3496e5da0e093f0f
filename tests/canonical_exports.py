"""Small torch modules exported the way users export them, for the canonicalisation tests.

Each export takes well under a second with TorchScript (``dynamo=False``); the dynamo exporter
takes a few seconds and is used once. Exports are cached per test session by the callers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def _torch():
    import torch

    return torch


def padded_attention_module():
    """F.pad (pads from ConstantOfShape/Concat/Reshape/Slice/Transpose in TorchScript), a count image
    ``ones_like(y[:, :1])``, ``attn / torch.full([], v.size(-1) ** 0.5)`` and a final ``.to(float32)``."""
    torch = _torch()
    import torch.nn.functional as F

    class Padded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x, v):
            y = F.pad(self.conv(x), [1, 1, 2, 2], mode="reflect")
            ones = torch.ones_like(y[:, :1])
            y = y / ones.sum()
            attn = v @ v.transpose(-1, -2) / torch.full([], v.size(-1) ** 0.5)
            return y, attn.to(torch.float32)

    torch.manual_seed(0)
    return Padded().eval()


def t5_layer_norm_module():
    """HF T5LayerNorm (RMSNorm) between two Linear layers: ``.to(torch.float32)`` on an FP32 tensor."""
    torch = _torch()

    class T5LayerNorm(torch.nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)

        def forward(self, h):
            variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return self.weight * (h * torch.rsqrt(variance + 1e-6))

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(16, 32)
            self.norm = T5LayerNorm(32)
            self.out = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.out(self.norm(self.inp(x)))

    torch.manual_seed(0)
    return Block().eval()


def conv_stack_module():
    """Conv -> ReLU -> Conv -> ReLU -> Conv, a PaddleOCR-like detector stem (FLOP counting)."""
    torch = _torch()

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=2)
            self.conv3 = torch.nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))

    torch.manual_seed(0)
    return Stack().eval()


def export(module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
           dynamic_axes: dict | None = None, dynamo: bool = False, dynamic_shapes=None) -> onnx.ModelProto:
    torch = _torch()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=input_names,
                              output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False)
        else:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, opset_version=17)
    return onnx.load(str(path))


def torch_flops(module, x) -> tuple[dict[str, float], float]:
    """An independent count with torch forward hooks on the run's real shapes, with the rules of
    ``analysis.flops`` (Conv: 2 * out * C_in/groups * kernel + out for the bias; ReLU: out)."""
    torch = _torch()
    counts: dict[str, float] = {}
    hooks = []
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            def conv_hook(m, inp, out, name=name):
                k = m.kernel_size[0] * m.kernel_size[1]
                counts[name] = 2.0 * out.numel() * (m.in_channels // m.groups) * k + (out.numel() if m.bias is not None else 0)
            hooks.append(mod.register_forward_hook(conv_hook))
    relu_total = [0.0]
    orig_relu = torch.relu

    def relu(t):
        out = orig_relu(t)
        relu_total[0] += out.numel()
        return out

    torch.relu = relu
    try:
        with torch.no_grad():
            module(x)
    finally:
        torch.relu = orig_relu
        for h in hooks:
            h.remove()
    return counts, relu_total[0]


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)
