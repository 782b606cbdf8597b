"""Llama-family halves (LlamaForCausalLM, e.g. SmolLM2; LlamaForSequenceClassification), mirroring
``LlamaModel.forward`` of transformers 5.x so the composition is bit-identical to the unsplit model.

Client: ``embed_tokens``, ``rotary_emb`` (buffers only, no parameters) and layers ``[0, cut)``.
Server: its own copy of ``rotary_emb`` (a few hundred floats; lets the halves live on different
devices), layers ``[cut, L)``, ``norm`` and the head (``lm_head``, an untied copy of the embedding
when tied as in SmolLM2; or ``score``).

Positions are ``0..T-1`` whatever the padding, exactly as ``LlamaModel`` does when it is given no
``position_ids``; so with left padding the real tokens do not start at position 0 (same as HF).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaForSequenceClassification

from hosl.models.compat import block_output, create_causal_mask

from .halves import (
    TASK_CAUSAL_LM,
    TASK_SEQUENCE_CLASSIFICATION,
    ClientHalf,
    ServerHalf,
    check_cut,
    pool_last_token,
    untied_head_copy,
)


def _run_llama_layers(config, rotary_emb, layers, hidden, attention_mask):
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    causal_mask = create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    position_embeddings = rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=None,
            use_cache=False,
        )
        hidden = block_output(hidden)
    return hidden


class LlamaClient(ClientHalf):
    def __init__(self, model, cut: int):
        base = model.model
        super().__init__(model.config, cut)
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.layers = nn.ModuleList(base.layers[:cut])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.num_blocks:
            hidden = _run_llama_layers(self.config, self.rotary_emb, self.layers, hidden, attention_mask)
        return hidden


class LlamaServer(ServerHalf):
    def __init__(self, model, cut: int, task: str):
        base = model.model
        super().__init__(model.config, cut, list(base.layers[cut:]), task)
        self.rotary_emb = copy.deepcopy(base.rotary_emb)
        self.norm = base.norm
        if task == TASK_CAUSAL_LM:
            self.lm_head = untied_head_copy(model.lm_head, base.embed_tokens)
        else:
            self.score = model.score

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_blocks:
            hidden = _run_llama_layers(self.config, self.rotary_emb, self.layers, hidden, attention_mask)
        hidden = self.norm(hidden)
        if self.task == TASK_CAUSAL_LM:
            return self.lm_head(hidden)
        return pool_last_token(self.score(hidden), attention_mask)


def split_llama(model, cut: int) -> tuple[LlamaClient, LlamaServer]:
    cut = check_cut(cut, model.config.num_hidden_layers)
    task = TASK_CAUSAL_LM if isinstance(model, LlamaForCausalLM) else TASK_SEQUENCE_CLASSIFICATION
    assert task == TASK_CAUSAL_LM or isinstance(model, LlamaForSequenceClassification)
    return LlamaClient(model, cut), LlamaServer(model, cut, task)
