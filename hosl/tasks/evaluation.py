"""Prediction and evaluation loops over a model given as ``forward_fn(input_ids, attention_mask) -> logits``.

``forward_fn`` may be the whole model, or client∘server of a split model; it may also return an
object with a ``.logits`` attribute (a Hugging Face output).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .causal_lm import collate_causal_lm, lm_answer_loss, option_scores, scores_by_example
from .classifier import classification_loss, collate_classifier
from .templates import PromptTemplate

MODEL_KINDS = ("causal_lm", "classifier")


def predict(logits_or_scores: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
    """Predicted option/class index per example [B].

    Classifier logits [B, C]: argmax over classes. Causal-LM option scores [N] (one per row of an
    options="all" batch, from :func:`option_scores`): argmax over each example's options; needs
    ``batch``. Ties go to the lower index.
    """
    if logits_or_scores.dim() == 2:
        return logits_or_scores.argmax(dim=-1)
    if logits_or_scores.dim() == 1:
        if batch is None:
            raise ValueError("option scores need the batch they were computed on")
        return scores_by_example(logits_or_scores, batch).argmax(dim=-1)
    raise ValueError(
        f"expected class logits [B, C] or option scores [N], got shape {tuple(logits_or_scores.shape)}; "
        "turn LM logits [N, T, V] into scores with option_scores(logits, batch) first"
    )


def make_collate_fn(
    template: PromptTemplate, tokenizer, model_kind: str, max_length: int, options: str = "gold"
) -> Callable[[Sequence[dict]], dict]:
    """A ``collate(list_of_examples) -> batch`` for ``model_kind`` ("causal_lm" or "classifier")."""
    if model_kind == "causal_lm":
        return functools.partial(
            collate_causal_lm, template=template, tokenizer=tokenizer, max_length=max_length, options=options
        )
    if model_kind == "classifier":
        return functools.partial(collate_classifier, template=template, tokenizer=tokenizer, max_length=max_length)
    raise ValueError(f"unknown model_kind {model_kind!r}; use one of {MODEL_KINDS}")


def check_encodable(data, tokenizer, model_kind: str, max_length: int, chunk: int = 64) -> None:
    """Encode every example once as training (``data.train``, gold answer) and evaluation
    (``data.eval``, every option) will, so that a ``max_length`` they cannot fit is refused before a
    run writes anything; raises the encoder's ``ValueError``, naming the set."""
    for name, examples, options in (("training", data.train, "gold"), ("evaluation", data.eval, "all")):
        collate = make_collate_fn(data.template, tokenizer, model_kind, max_length, options=options)
        try:
            for start in range(0, len(examples), chunk):
                collate(examples[start : start + chunk])
        except ValueError as exc:
            raise ValueError(f"--max-length {max_length}: the {name} examples do not fit ({exc})") from None


def _logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def eval_outputs(logits, batch: dict, model_kind: str, score_reduction: str = "mean") -> tuple[torch.Tensor, float]:
    """What evaluation needs from one batch's model output, and no more: option scores [N]
    (causal LM) or class logits [B, C] (classifier), and the batch's summed loss.

    A split model's server computes this on its side, so LM logits [N, T, vocab] never travel.
    """
    logits = _logits_of(logits)
    if model_kind == "causal_lm":
        return option_scores(logits, batch, score_reduction), lm_answer_loss(logits, batch, reduction="sum").item()
    return logits, classification_loss(logits, batch["labels"], reduction="sum").item()


@torch.no_grad()
def evaluate(
    forward_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    examples: Sequence[dict],
    tokenizer,
    batch_size: int,
    template: PromptTemplate,
    model_kind: str = "causal_lm",
    max_length: int = 2048,
    score_reduction: str = "mean",
    device: torch.device | str | None = None,
    outputs_fn: Callable[[dict], tuple[torch.Tensor, float]] | None = None,
) -> dict:
    """Accuracy and loss of ``forward_fn`` on ``examples``.

    causal_lm: every option of every example is scored (``score_reduction`` "mean" = MeZO's mean
    per-token log-prob, or "sum"); the prediction is the best-scoring option. ``loss`` is the gold
    answer tokens' CE averaged over all of them (lm_answer_loss "mean" over the whole set).
    ``batch_size`` counts examples, so a forward holds batch_size x num_options rows.
    classifier: argmax of the class logits; ``loss`` is the mean CE over examples.
    ``outputs_fn(batch) -> (scores or logits, loss sum)``, when given, replaces ``forward_fn`` +
    :func:`eval_outputs` (a split model whose server computes them).
    Returns {"accuracy", "loss", "num_examples"}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(examples) == 0:
        raise ValueError("no examples to evaluate")
    collate = make_collate_fn(template, tokenizer, model_kind, max_length, options="all")
    correct = 0
    loss_sum = 0.0
    loss_count = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        if outputs_fn is not None:
            out, batch_loss = outputs_fn(batch)
        else:
            logits = forward_fn(batch["input_ids"], batch["attention_mask"])
            out, batch_loss = eval_outputs(logits, batch, model_kind, score_reduction)
        loss_sum += batch_loss
        if model_kind == "causal_lm":
            predictions = predict(out, batch)
            gold = batch["gold_option"]
            loss_count += int((batch["labels"][:, 1:] != -100).sum().item())
        else:
            predictions = predict(out)
            gold = batch["labels"]
            loss_count += gold.shape[0]
        correct += int((predictions.cpu() == gold.cpu()).sum().item())
    return {
        "accuracy": correct / len(examples),
        "loss": loss_sum / max(loss_count, 1),
        "num_examples": len(examples),
    }
