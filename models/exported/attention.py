"""GPT-2 attention as transformers 4.x wrote it (``GPT2Attention._attn`` before the attention-interface refactor).

``gpt2-legacy-attention``: two pre-LN blocks of plain torch, the attention exactly as that code reads::

    attn_weights = torch.matmul(query, key.transpose(-1, -2))
    attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=..., device=...)
    mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, ...)
    attn_weights = torch.where(causal_mask, attn_weights, mask_value)     # causal_mask: a bool tril buffer

The divisor is computed from ``value``'s shape (TorchScript: Shape -> Gather -> Cast -> Pow -> ... -> Div by a
tensor, not an initializer), and each block's ``Where`` fills with ``finfo(float32).min`` (dynamo shares one
constant between them). As in ``gpt2-eager``, the first token carries a massive activation (~3000) routed into one
q and one k channel per head: the raw ``q.kT`` of the attention sink is ~2.5e5, past 65504; after the divide it fits.
"""

from __future__ import annotations

import numpy as np

from onnx_fp16_rewrite.models.exported.export import import_torch
from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["SPECS"]

_SEQ, _WIDTH, _HEADS, _MAX_POS = 32, 128, 4, 64
_MASSIVE_DIM, _MASSIVE, _QK = 7, 3000.0, 44.0


def _legacy_attention():
    torch = import_torch()
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads, self.head_dim = _HEADS, _WIDTH // _HEADS
            self.c_attn, self.c_proj = nn.Linear(_WIDTH, 3 * _WIDTH), nn.Linear(_WIDTH, _WIDTH)
            tril = torch.tril(torch.ones((_MAX_POS, _MAX_POS), dtype=torch.bool))
            self.register_buffer("bias", tril.view(1, 1, _MAX_POS, _MAX_POS), persistent=False)

        def _split_heads(self, x):
            return x.view(x.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

        def _attn(self, query, key, value):
            attn_weights = torch.matmul(query, key.transpose(-1, -2))
            attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype,
                                                     device=attn_weights.device)
            query_length, key_length = query.size(-2), key.size(-2)
            causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
            mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype,
                                    device=attn_weights.device)
            attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
            attn_weights = nn.functional.softmax(attn_weights, dim=-1)
            return torch.matmul(attn_weights, value)

        def forward(self, hidden_states):
            query, key, value = self.c_attn(hidden_states).split(_WIDTH, dim=2)
            out = self._attn(self._split_heads(query), self._split_heads(key), self._split_heads(value))
            out = out.permute(0, 2, 1, 3).contiguous()
            return self.c_proj(out.view(out.size()[:-2] + (_WIDTH,)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(_WIDTH), Attention()

        def forward(self, x):
            return x + self.attn(self.ln_1(x))

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h = nn.ModuleList([Block(), Block()])

        def forward(self, hidden_states):
            for block in self.h:
                hidden_states = block(hidden_states)
            return hidden_states

    torch.manual_seed(0)
    model = Blocks()
    d = _WIDTH // _HEADS
    with torch.no_grad():
        for block in model.h:
            w = block.attn.c_attn.weight  # Linear: [3*out, in]
            w.mul_(2.0)
            for head in range(_HEADS):
                w[head * d, _MASSIVE_DIM] = _QK             # massive dimension -> a q channel of every head
                w[_WIDTH + head * d, _MASSIVE_DIM] = _QK    # -> the same k channel
    return model.eval()


def _legacy_feeds() -> list[Feed]:
    x = np.random.default_rng(0).standard_normal((1, _SEQ, _WIDTH)).astype(np.float32)
    x[..., _MASSIVE_DIM] *= 0.05
    x[0, 0, _MASSIVE_DIM] = _MASSIVE
    return [{"hidden_states": x}]


SPECS = [
    Spec("gpt2-legacy-attention", _legacy_attention, _legacy_feeds, ("hidden_states",), ("output",),
         about="transformers 4.x GPT2Attention._attn in torch: Div by a scale computed from shape, Where with "
               "finfo.min, raw q.kT past 65504"),
]
