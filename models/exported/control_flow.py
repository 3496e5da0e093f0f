"""A model whose network sits inside ``If`` branches, as voice-activity detectors ship (Silero VAD branches on the
sample rate).

``vad-if`` (control): ``prob = net16(audio) if sr == 16000 else net8(audio)``; each branch a strided Conv1d front
end, two Conv1d + ReLU layers, a mean over time and a Sigmoid. dynamo exports ``torch.cond`` as ``If`` (branches
as local functions inlined by the optimiser); TorchScript exports the ``torch.jit.script`` of the same module (the
``if`` on a tensor becomes ``If``). Audio in [-1, 1]: fine in FP16, so every float tensor -- inside the branches
too -- can run FP16; a mixed emission must type the bodies, not leave them FP32.
"""

from __future__ import annotations

import numpy as np

from onnx_fp16_rewrite.models.exported.export import import_torch
from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["SPECS"]

_CHUNK, _SR = 1536, 16000


def _branches():
    torch = import_torch()
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self, window: int) -> None:
            super().__init__()
            self.front = nn.Conv1d(1, 16, window, stride=window // 2)
            self.conv1, self.conv2 = nn.Conv1d(16, 16, 3, padding=1), nn.Conv1d(16, 1, 1)

        def forward(self, audio):
            x = torch.relu(self.front(audio.unsqueeze(1)))
            x = torch.relu(self.conv1(x))
            return torch.sigmoid(self.conv2(x).mean(-1))

    class Scriptable(nn.Module):
        """The same networks with a plain ``if`` (what ``torch.jit.script`` turns into ``If``)."""

        def __init__(self, net16, net8) -> None:
            super().__init__()
            self.net16, self.net8 = net16, net8

        def forward(self, audio, sr):
            if bool(sr == 16000):
                return self.net16(audio)
            return self.net8(audio)

    class Vad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net16, self.net8 = Net(64), Net(32)

        def forward(self, audio, sr):
            return torch.cond(sr == 16000, self.net16, self.net8, (audio,))

        def scripted(self):
            return torch.jit.script(Scriptable(self.net16, self.net8))

    torch.manual_seed(0)
    return Vad().eval()


def _vad_feeds() -> list[Feed]:
    rng = np.random.default_rng(0)
    t = np.arange(_CHUNK) / _SR
    audio = 0.4 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(_CHUNK)
    return [{"audio": audio[None].astype(np.float32), "sr": np.array(_SR, np.int64)}]


SPECS = [
    Spec("vad-if", _branches, _vad_feeds, ("audio", "sr"), ("prob",), control=True,
         about="voice-activity detector, one network per sample rate inside If branches (control)",
         script=lambda module: module.scripted()),
]
