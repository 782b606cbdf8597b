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

from hosl.models.compat import create_causal_mask, run_layers

from .halves import ClientHalf, DecoderServer, check_cut, decoder_task


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


def _run_layers(config, layers, hidden, attention_mask):
    """Decoder layers under OPT's causal mask. The mask reads only the batch size, length, dtype
    and device of ``hidden``, all of which ``project_in`` keeps, so building it after the
    projection (HF builds it before) gives the same mask."""
    batch_size, seq_len = hidden.shape[:2]
    _, position_ids = opt_position_ids(attention_mask, batch_size, seq_len, hidden.device)
    causal_mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None)
    return run_layers(
        layers, hidden, attention_mask=causal_mask, position_ids=position_ids, cache=None, use_cache=False
    )


class OPTClient(ClientHalf):
    def __init__(self, model, cut: int):
        decoder = model.model.decoder
        super().__init__(model.config, cut)
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.project_in = decoder.project_in  # None unless word_embed_proj_dim != hidden_size
        self.layers = nn.ModuleList(decoder.layers[:cut])

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch_size, seq_len = input_ids.shape
        inputs_embeds = self.embed_tokens(input_ids)
        position_mask, position_ids = opt_position_ids(attention_mask, batch_size, seq_len, input_ids.device)
        pos_embeds = self.embed_positions(position_mask, 0, position_ids=position_ids)
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        return inputs_embeds + pos_embeds.to(inputs_embeds.device)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return _run_layers(self.config, self.layers, hidden, attention_mask)


class OPTServer(DecoderServer):
    def __init__(self, model, cut: int, task: str):
        decoder = model.model.decoder
        super().__init__(model.config, cut, list(decoder.layers[cut:]), task)
        self.final_layer_norm = decoder.final_layer_norm
        self.project_out = decoder.project_out
        self.attach_head(model, decoder.embed_tokens)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return _run_layers(self.config, self.layers, hidden, attention_mask)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """``final_layer_norm`` (None in post-LayerNorm models), then ``project_out`` (if any)."""
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden


def split_opt(model, cut: int) -> tuple[OPTClient, OPTServer]:
    cut = check_cut(cut, model.config.num_hidden_layers)
    return OPTClient(model, cut), OPTServer(model, cut, decoder_task(model))
