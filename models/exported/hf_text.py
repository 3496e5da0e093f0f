"""transformers text models from config objects (random weights), scaled where trained checkpoints overflow FP16.

``t5-encoder``: ``T5EncoderModel`` from a T5 v1.1 config (``feed_forward_proj="gated-gelu"``, untied, no bias,
relative position buckets computed in the graph). Trained v1.1 checkpoints grow a few residual dimensions past
65504 (transformers#14189, "wo output 66246"): here the last block's ``wo`` rows for two dimensions are scaled
so the stream reaches ~1.5e5 there, and the embeddings carry ~30x outlier dimensions as T5's do. In FP16 the
final RMSNorm then squares inf: NaN on every token.

``gpt2-eager`` / ``gpt2-sdpa``: ``GPT2Model`` with ``attn_implementation`` eager resp. sdpa. The BOS token
carries a "massive activation" (Sun et al. 2024; ~3000 in one dimension) that ``c_attn`` routes into one q and
one k channel per head, so the raw ``q.kT`` of the attention sink is ~2.4e5 before the ``1/sqrt(d)`` scale
(eager: MatMul then Mul). sdpa has the same weights, but both exporters decompose
``scaled_dot_product_attention`` as ``(q * s**0.5) @ (k * s**0.5).T``: the raw product never forms and the largest
logit (~4e4) fits FP16, so ``gpt2-sdpa`` is a control that shares its weights with an overflowing model. Exported with
``attention_mask`` (all ones) as HF exports do: without it transformers' packed-sequence check calls
``torch.diff``, which the TorchScript exporter cannot export ("aten::diff ... not supported").

``t5-encoder-dynamic`` / ``gpt2-eager-dynamic``: the same modules exported with dynamic batch and sequence dims
(TorchScript ``dynamic_axes``, dynamo ``Dim.DYNAMIC``) as optimum exports them: shapes computed in the graph from
symbolic dims.

``bert`` (control): ``BertModel`` with a padding mask, ordinary random weights.
"""

from __future__ import annotations

import numpy as np

from onnx_fp16_rewrite.models.exported.export import import_torch
from onnx_fp16_rewrite.models.exported.spec import Feed, Spec

__all__ = ["SPECS", "t5_encoder_maker"]

_T5_SEQ, _T5_VOCAB, _T5_OUTLIER_DIMS, _T5_STREAM_PEAK = 16, 128, (3, 40), 1.5e5
_GPT2_SEQ, _GPT2_VOCAB, _GPT2_MASSIVE_DIM, _GPT2_MASSIVE, _GPT2_QK = 32, 128, 7, 3000.0, 44.0
_BERT_SEQ, _BERT_VOCAB = 24, 128


def _last_hidden_state(model, with_mask: bool = False):
    """The model as a module of named tensor inputs (``input_ids`` and, with ``with_mask``, ``attention_mask``)
    returning one tensor; named parameters let dynamo's ``dynamic_shapes`` refer to them by name."""
    torch = import_torch()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids=input_ids, return_dict=True).last_hidden_state

    class LastHiddenStateMasked(LastHiddenState):
        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state

    return (LastHiddenStateMasked if with_mask else LastHiddenState)().eval()


def t5_encoder_maker(*, seq: int = _T5_SEQ, vocab: int = _T5_VOCAB, d_model: int = 64, d_kv: int = 16,
                     d_ff: int = 128, layers: int = 2, heads: int = 4):
    """A ``T5EncoderModel`` of that size and its feeds, as ``(module, feeds)`` callables: the corpus'
    ``t5-encoder`` at the defaults; the benchmark passes a realistic size."""

    def feeds() -> list[Feed]:
        ids = np.random.default_rng(0).integers(0, vocab, (1, seq)).astype(np.int64)
        return [{"input_ids": ids}]

    def module():
        torch = import_torch()
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(0)
        config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                          num_heads=heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                          dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          use_cache=False)
        model = T5EncoderModel(config).eval()
        dims = list(_T5_OUTLIER_DIMS)
        with torch.no_grad():
            model.shared.weight[:, dims] *= 30.0
            # Scale the last block's wo rows of the outlier dimensions so the stream there peaks at
            # _T5_STREAM_PEAK on the demo feed (measured, so the peak does not depend on the random init).
            ffn = model.encoder.block[-1].layer[1].DenseReluDense
            seen = {}
            hook = ffn.wo.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
            model(input_ids=torch.from_numpy(feeds()[0]["input_ids"]))
            hook.remove()
            peak = seen["out"][..., dims].abs().amax().item()
            ffn.wo.weight[dims, :] *= _T5_STREAM_PEAK / peak
        return _last_hidden_state(model)

    return module, feeds


_t5_encoder, _t5_feeds = t5_encoder_maker()


def _gpt2(attn: str):
    def make():
        torch = import_torch()
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        config = GPT2Config(vocab_size=_GPT2_VOCAB, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                            attn_implementation=attn)
        model = GPT2Model(config).eval()
        c, d = config.n_embd, config.n_embd // config.n_head
        with torch.no_grad():
            model.wte.weight[0, _GPT2_MASSIVE_DIM] = _GPT2_MASSIVE      # BOS: the massive activation
            model.wte.weight[1:, _GPT2_MASSIVE_DIM] *= 0.05
            for block in model.h:
                w = block.attn.c_attn.weight  # Conv1D: [in, 3*out]
                for head in range(config.n_head):
                    w[_GPT2_MASSIVE_DIM, head * d] = _GPT2_QK          # -> a q channel of every head
                    w[_GPT2_MASSIVE_DIM, c + head * d] = _GPT2_QK      # -> the same k channel
        return _last_hidden_state(model, with_mask=True)

    return make


def _gpt2_feeds() -> list[Feed]:
    ids = np.random.default_rng(0).integers(2, _GPT2_VOCAB, (1, _GPT2_SEQ)).astype(np.int64)
    ids[0, 0] = 0  # BOS
    return [{"input_ids": ids, "attention_mask": np.ones_like(ids)}]


def _bert():
    torch = import_torch()
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=_BERT_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return _last_hidden_state(BertModel(config, add_pooling_layer=False).eval(), with_mask=True)


def _bert_feeds() -> list[Feed]:
    ids = np.random.default_rng(0).integers(1, _BERT_VOCAB, (1, _BERT_SEQ)).astype(np.int64)
    mask = np.ones((1, _BERT_SEQ), np.int64)
    mask[0, -4:] = 0  # padding
    return [{"input_ids": ids, "attention_mask": mask}]


SPECS = [
    Spec("t5-encoder", _t5_encoder, _t5_feeds, ("input_ids",), ("last_hidden_state",),
         about="transformers T5EncoderModel, T5 v1.1 config (gated-gelu), residual stream past 65504"),
    Spec("gpt2-eager", _gpt2("eager"), _gpt2_feeds, ("input_ids", "attention_mask"), ("last_hidden_state",),
         about="transformers GPT2Model (eager attention), raw q.kT of the BOS sink past 65504"),
    Spec("gpt2-sdpa", _gpt2("sdpa"), _gpt2_feeds, ("input_ids", "attention_mask"), ("last_hidden_state",),
         control=True, about="transformers GPT2Model (sdpa attention), gpt2-eager's weights; the exporters scale "
                             "q and k by sqrt(1/sqrt(d)) each before the MatMul, so no logit passes 65504"),
    Spec("t5-encoder-dynamic", _t5_encoder, _t5_feeds, ("input_ids",), ("last_hidden_state",),
         dynamic={"input_ids": {0: "batch", 1: "sequence"}},
         about="t5-encoder exported with dynamic batch and sequence dims, as optimum exports it"),
    Spec("gpt2-eager-dynamic", _gpt2("eager"), _gpt2_feeds, ("input_ids", "attention_mask"), ("last_hidden_state",),
         dynamic={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}},
         about="gpt2-eager exported with dynamic batch and sequence dims, as optimum exports it"),
    Spec("bert", _bert, _bert_feeds, ("input_ids", "attention_mask"), ("last_hidden_state",), control=True,
         about="transformers BertModel with a padding mask (control)"),
]
