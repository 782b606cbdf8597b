"""BERT-family halves (BertModel, BertForSequenceClassification; MiniLM is a BERT), mirroring
``BertModel.forward`` of transformers 5.x so the composition is bit-identical to the unsplit model.

Client: ``embeddings`` (word + position + token-type embeddings, embedding LayerNorm, dropout) and
encoder layers ``[0, cut)``. ``forward`` also accepts ``token_type_ids`` (default: all zeros, as HF).
Server: encoder layers ``[cut, L)``, then
  - BertForSequenceClassification: ``pooler`` -> ``dropout`` -> ``classifier``: logits ``[B, num_labels]``;
  - bare BertModel: ``last_hidden_state`` ``[B, T, H]`` (what sentence-embedding models such as
    MiniLM pool themselves). The pooler, if the model has one, is kept as ``server.pooler`` and is
    not called by ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertForSequenceClassification

from hosl.models.compat import create_bidirectional_mask, create_causal_mask, run_layers

from .halves import TASK_ENCODER, TASK_SEQUENCE_CLASSIFICATION, ClientHalf, ServerHalf, check_cut


def _self_attention_mask(config, embeddings: torch.Tensor, attention_mask: torch.Tensor | None):
    """The mask ``BertModel._create_attention_masks`` builds for self-attention (no cross-attention)."""
    if config.is_decoder:
        return create_causal_mask(config=config, inputs_embeds=embeddings, attention_mask=attention_mask, cache=None)
    return create_bidirectional_mask(config=config, inputs_embeds=embeddings, attention_mask=attention_mask)


class BertClient(ClientHalf):
    def __init__(self, bert, cut: int):
        super().__init__(bert.config, cut)
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(bert.encoder.layer[:cut])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if self.num_blocks:
            hidden = run_layers(self.layers, hidden, _self_attention_mask(self.config, hidden, attention_mask))
        return hidden


class BertServer(ServerHalf):
    def __init__(self, model, bert, cut: int, task: str):
        super().__init__(bert.config, cut, list(bert.encoder.layer[cut:]), task)
        self.pooler = bert.pooler
        if task == TASK_SEQUENCE_CLASSIFICATION:
            self.dropout = model.dropout
            self.classifier = model.classifier

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_blocks:
            hidden = run_layers(self.layers, hidden, _self_attention_mask(self.config, hidden, attention_mask))
        if self.task == TASK_ENCODER:
            return hidden
        return self.classifier(self.dropout(self.pooler(hidden)))


def split_bert(model, cut: int) -> tuple[BertClient, BertServer]:
    bert = model.bert if isinstance(model, BertForSequenceClassification) else model
    if bert.config.add_cross_attention:
        raise TypeError("split() does not support BERT models with cross-attention (add_cross_attention=True)")
    cut = check_cut(cut, len(bert.encoder.layer))
    task = TASK_SEQUENCE_CLASSIFICATION if model is not bert else TASK_ENCODER
    return BertClient(bert, cut), BertServer(model, bert, cut, task)
