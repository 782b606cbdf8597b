"""Batches and loss for encoders (BERT, MiniLM) with a classification head.

The encoder reads one text per example, ``template.classifier_text(example)`` (MeZO's prompt without
the answer; COPA's includes both choices), as ``[CLS] text [SEP]``. A text longer than
``max_length`` is cut from the LEFT, like the causal-LM prompts, so the question that ends most
prompts survives. ``token_type_ids`` are all zeros (single segment), so a split client that passes
only (input_ids, attention_mask) computes the same thing.

Batch: input_ids [B, T], attention_mask [B, T], token_type_ids [B, T] (zeros), labels [B]; padding
on the right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .templates import PromptTemplate
from .tokenization import pad_token_id, special_affixes


def encode_classifier_text(text: str, tokenizer, max_length: int) -> list[int]:
    """``[CLS] text [SEP]`` (the tokenizer's own special tokens), text cut from the left to fit."""
    prefix, suffix = special_affixes(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room beside {len(prefix) + len(suffix)} special tokens")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) > budget:
        ids = ids[len(ids) - budget :]
    return prefix + ids + suffix


def collate_classifier(
    examples: Sequence[dict], template: PromptTemplate, tokenizer, max_length: int = 512
) -> dict[str, torch.Tensor]:
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    rows = [encode_classifier_text(template.classifier_text(ex), tokenizer, max_length) for ex in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.tensor([template.label(ex) for ex in examples], dtype=torch.long),
    }


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", num_copies: int | None = None
) -> torch.Tensor:
    """Cross-entropy of class logits [D*B, C] against ``labels`` [B] (D stacked copies, copy-major).

    reduction: "mean" (scalar over all rows), "sum", "none"/"per_example" ([D*B]), "per_copy" ([D]).
    """
    labels = labels.to(logits.device)
    rows = labels.shape[0]
    if logits.dim() != 2 or logits.shape[0] % rows != 0:
        raise ValueError(f"logits {tuple(logits.shape)} are not [D*{rows}, classes]")
    copies = logits.shape[0] // rows
    if num_copies is not None and num_copies != copies:
        raise ValueError(f"num_copies={num_copies} but logits hold {copies} copies of {rows} rows")
    per_row = F.cross_entropy(logits.float(), labels.repeat(copies), reduction="none")
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    if reduction in ("none", "per_example"):
        return per_row
    if reduction == "per_copy":
        return per_row.view(copies, rows).mean(1)
    raise ValueError(f"unknown reduction {reduction!r}; use mean, sum, none, per_example or per_copy")
