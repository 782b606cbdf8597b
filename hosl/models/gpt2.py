"""GPT-2 halves (GPT2LMHeadModel, GPT2ForSequenceClassification), mirroring ``GPT2Model.forward``
of transformers 5.x so the composition is bit-identical to the unsplit model.

Client: ``wte``, ``wpe`` (learned absolute positions ``0..T-1``, whatever the padding, as GPT-2
builds them when given no ``position_ids``), the embedding dropout ``drop`` and blocks ``[0, cut)``.
Server: blocks ``[cut, L)``, ``ln_f`` and the head (``lm_head``, an untied copy of ``wte``; or
``score``, pooled at each row's last attended token). Models with cross-attention
(``add_cross_attention``) are not supported.
"""

from __future__ import annotations

import torch
from torch import nn

from hosl.models.compat import create_causal_mask, run_layers

from .halves import ClientHalf, DecoderServer, check_cut, decoder_task


def _run_blocks(config, blocks, hidden, attention_mask):
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    causal_mask = create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    return run_layers(
        blocks, hidden, None, causal_mask, None, encoder_attention_mask=None, use_cache=False, position_ids=position_ids
    )


class GPT2Client(ClientHalf):
    def __init__(self, model, cut: int):
        transformer = model.transformer
        super().__init__(model.config, cut)
        self.wte = transformer.wte
        self.wpe = transformer.wpe
        self.drop = transformer.drop
        self.layers = nn.ModuleList(transformer.h[:cut])

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        inputs_embeds = self.wte(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.drop(inputs_embeds + self.wpe(position_ids).to(inputs_embeds.device))

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return _run_blocks(self.config, self.layers, hidden, attention_mask)


class GPT2Server(DecoderServer):
    def __init__(self, model, cut: int, task: str):
        transformer = model.transformer
        super().__init__(model.config, cut, list(transformer.h[cut:]), task)
        self.ln_f = transformer.ln_f
        self.attach_head(model, transformer.wte)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return _run_blocks(self.config, self.layers, hidden, attention_mask)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden)


def split_gpt2(model, cut: int) -> tuple[GPT2Client, GPT2Server]:
    if model.config.add_cross_attention:
        raise TypeError("split() does not support GPT-2 models with cross-attention (add_cross_attention=True)")
    cut = check_cut(cut, model.config.n_layer)
    return GPT2Client(model, cut), GPT2Server(model, cut, decoder_task(model))
