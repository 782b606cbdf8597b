"""OPT halves (OPTForCausalLM, OPTForSequenceClassification), mirroring ``OPTDecoder.forward`` of
transformers 5.x step for step so the composition is bit-identical to the unsplit model.

Client: ``embed_tokens``, ``embed_positions`` (learned, offset 2, positions counted from the mask),
``project_in`` (OPT-350m style models only) and decoder layers ``[0, cut)``.
Server: decoder layers ``[cut, L)``, ``final_layer_norm``, ``project_out`` (if any) and the head
(``lm_head``, an untied copy of the embedding; or ``score``).

``config.layerdrop`` is not applied (it would make the ZO client's passes random); the published
OPT configs have ``layerdrop = 0``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.opt.modeling_opt import OPTForCausalLM, OPTForSequenceClassification

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


def opt_position_ids(attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, device):
    """OPT's positions: running count of attended tokens minus one (padding gets -1).

    Returns ``(position_mask, position_ids)``; the mask is what ``OPTLearnedPositionalEmbedding``
    takes as its first argument.
    """
    position_mask = attention_mask
    if position_mask is None:
        position_mask = torch.ones(batch_size, seq_len, device=device)
    position_ids = torch.cumsum(position_mask, dim=1)
    position_ids = (position_ids * position_mask - 1).long()
    return position_mask, position_ids


class OPTClient(ClientHalf):
    def __init__(self, model, cut: int):
        decoder = model.model.decoder
        super().__init__(model.config, cut)
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.project_in = decoder.project_in  # None unless word_embed_proj_dim != hidden_size
        self.layers = nn.ModuleList(decoder.layers[:cut])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, seq_len = input_ids.shape
        inputs_embeds = self.embed_tokens(input_ids)
        position_mask, position_ids = opt_position_ids(attention_mask, batch_size, seq_len, input_ids.device)
        pos_embeds = self.embed_positions(position_mask, 0, position_ids=position_ids)
        if self.num_blocks:
            causal_mask = create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=None
            )
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        hidden = inputs_embeds + pos_embeds.to(inputs_embeds.device)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=causal_mask, position_ids=position_ids, cache=None, use_cache=False)
            hidden = block_output(hidden)
        return hidden


class OPTServer(ServerHalf):
    def __init__(self, model, cut: int, task: str):
        decoder = model.model.decoder
        super().__init__(model.config, cut, list(decoder.layers[cut:]), task)
        self.final_layer_norm = decoder.final_layer_norm
        self.project_out = decoder.project_out
        if task == TASK_CAUSAL_LM:
            self.lm_head = untied_head_copy(model.lm_head, decoder.embed_tokens)
        else:
            self.score = model.score

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_blocks:
            batch_size, seq_len = hidden.shape[:2]
            _, position_ids = opt_position_ids(attention_mask, batch_size, seq_len, hidden.device)
            causal_mask = create_causal_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None
            )
            for layer in self.layers:
                hidden = layer(
                    hidden, attention_mask=causal_mask, position_ids=position_ids, cache=None, use_cache=False
                )
                hidden = block_output(hidden)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        if self.task == TASK_CAUSAL_LM:
            return self.lm_head(hidden).contiguous()
        return pool_last_token(self.score(hidden), attention_mask)


def split_opt(model, cut: int) -> tuple[OPTClient, OPTServer]:
    cut = check_cut(cut, model.config.num_hidden_layers)
    task = TASK_CAUSAL_LM if isinstance(model, OPTForCausalLM) else TASK_SEQUENCE_CLASSIFICATION
    assert task == TASK_CAUSAL_LM or isinstance(model, OPTForSequenceClassification)
    return OPTClient(model, cut), OPTServer(model, cut, task)
