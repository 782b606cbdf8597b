"""Rotary-decoder halves for the families laid out as Llama (``model.{embed_tokens, rotary_emb,
layers, norm}`` + ``lm_head`` or ``score``): Llama (e.g. SmolLM2), Qwen2, Qwen3, Mistral and Gemma,
causal LM and last-token sequence classification. Each half mirrors the family's ``*Model.forward``
of transformers 5.x, so ``server(client(ids, mask), mask)`` is bit-identical to the unsplit model.

What differs between the families is handled here, not assumed away:
  - the attention mask of each block: Qwen2/Qwen3 read ``config.layer_types`` (full or sliding
    window per block), Mistral uses a sliding-window mask on every block when
    ``config.sliding_window`` is set, Llama and Gemma always a full causal mask;
  - Gemma scales its embeddings inside ``embed_tokens`` (``GemmaTextScaledWordEmbedding``), so the
    client's embedding call already includes it.
Positions are ``0..T-1`` whatever the padding, as these models build them when given no
``position_ids`` (so with left padding the real tokens do not start at position 0, as in HF).

Client: ``embed_tokens``, ``rotary_emb`` (buffers only, no parameters) and layers ``[0, cut)``.
Server: its own copy of ``rotary_emb`` (a few hundred floats; lets the halves live on different
devices), layers ``[cut, L)``, ``norm`` and the head (``lm_head``, an untied copy of the embedding
when tied as in SmolLM2, see ``halves.untied_head_copy``; or ``score``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hosl.models.compat import block_output, create_causal_mask, create_sliding_window_causal_mask

from .halves import ClientHalf, DecoderServer, check_cut, decoder_task

FULL, SLIDING = "full_attention", "sliding_attention"


def block_mask_types(config) -> list[str]:
    """Which causal mask (full or sliding window) each block of the model uses, as its ``*Model.forward`` decides."""
    num_layers = config.num_hidden_layers
    if config.model_type in ("qwen2", "qwen3"):
        return list(config.layer_types)
    if config.model_type == "mistral":
        return [SLIDING if config.sliding_window is not None else FULL] * num_layers
    return [FULL] * num_layers


def _run_blocks(config, rotary_emb, layers, mask_types, hidden, attention_mask):
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    kwargs = dict(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    masks = {}
    if FULL in mask_types:
        masks[FULL] = create_causal_mask(**kwargs)
    if SLIDING in mask_types:
        masks[SLIDING] = create_sliding_window_causal_mask(**kwargs)
    position_embeddings = rotary_emb(hidden, position_ids)
    for layer, mask_type in zip(layers, mask_types):
        hidden = layer(
            hidden,
            attention_mask=masks[mask_type],
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=None,
            use_cache=False,
        )
        hidden = block_output(hidden)
    return hidden


class RotaryDecoderClient(ClientHalf):
    def __init__(self, model, cut: int):
        base = model.model
        super().__init__(model.config, cut)
        self.embed_tokens = base.embed_tokens
        self.rotary_emb = base.rotary_emb
        self.layers = nn.ModuleList(base.layers[:cut])
        self.mask_types = block_mask_types(model.config)[:cut]

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return _run_blocks(self.config, self.rotary_emb, self.layers, self.mask_types, hidden, attention_mask)


class RotaryDecoderServer(DecoderServer):
    def __init__(self, model, cut: int, task: str):
        base = model.model
        super().__init__(model.config, cut, list(base.layers[cut:]), task)
        self.rotary_emb = copy.deepcopy(base.rotary_emb)
        self.norm = base.norm
        self.mask_types = block_mask_types(model.config)[cut:]
        self.attach_head(model, base.embed_tokens)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return _run_blocks(self.config, self.rotary_emb, self.layers, self.mask_types, hidden, attention_mask)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


def split_rotary_decoder(model, cut: int) -> tuple[RotaryDecoderClient, RotaryDecoderServer]:
    cut = check_cut(cut, model.config.num_hidden_layers)
    return RotaryDecoderClient(model, cut), RotaryDecoderServer(model, cut, decoder_task(model))
