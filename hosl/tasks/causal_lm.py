"""Batches, losses and option scores for causal LMs (OPT, SmolLM2/Llama).

Each row of a batch is ``[special prefix] + prompt tokens + option tokens``:

- the special prefix is what the tokenizer puts before text (OPT's ``</s>``; nothing for SmolLM2);
  nothing is appended (no EOS after the answer);
- prompt and option are tokenized separately, so the answer tokens are exactly the option's own
  tokens (MeZO instead takes len(tokens(prompt + option)) - len(tokens(prompt)); the two agree for
  byte-level BPE tokenizers when the option starts at a space/newline boundary, as all templates'
  options do);
- a prompt longer than ``max_length`` is cut from the LEFT (the prefix is kept), so the answer and
  the question that ends most prompts survive;
- padding is on the RIGHT: real tokens sit at positions 0..n-1, which is what models that build
  position ids as ``arange`` (Llama) assume when given only (input_ids, attention_mask).

Batch keys (N rows, T tokens, B examples):
  input_ids [N, T] long, attention_mask [N, T] long,
  answer_mask [N, T] bool   True at the positions of the row's option tokens (scoring),
  labels [N, T] long        input_ids at the GOLD option's tokens, -100 elsewhere (training loss),
  example_index [N] long    which example (0..B-1) the row belongs to,
  option_index [N] long     which option of that example the row holds,
  gold_option [B] long      each example's gold option index.

Training batches (``options="gold"``) have one row per example (N = B); evaluation batches
(``options="all"``) have one row per (example, option), example-major.

Losses on copies. The ZO optimizer runs D perturbed copies of the client on the same batch and the
server evaluates them as one batch of D*N rows, copy-major (rows d*N .. d*N+N-1 are copy d). All
loss functions here take the logits of such a stacked batch together with the ONE-copy batch and
treat rows as ``logits.shape[0] // N`` copies; ``reduction="per_copy"`` returns the D per-copy
losses, each exactly what ``reduction="mean"`` gives on that copy alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .templates import PromptTemplate
from .tokenization import pad_token_id, special_prefix_ids

IGNORE_INDEX = -100


def encode_prompt_and_option(
    prompt: str,
    option: str,
    tokenizer,
    max_length: int,
    prefix: Sequence[int] | None = None,
    truncate_option: bool = False,
) -> tuple[list[int], int]:
    """Token ids of ``prefix + prompt + option`` (prompt cut from the left to fit) and the option's length.

    ``truncate_option``: an option too long for ``max_length`` is cut from the right (``--task lm``,
    whose texts are options of an empty prompt) instead of refused."""
    if prefix is None:
        prefix = special_prefix_ids(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    if not option_ids:
        raise ValueError(f"option {option!r} tokenizes to nothing")
    if truncate_option and len(prefix) + len(option_ids) > max_length:
        option_ids = option_ids[: max(1, max_length - len(prefix))]
    budget = max_length - len(prefix) - len(option_ids)
    if budget < 0:
        raise ValueError(
            f"max_length={max_length} cannot hold the option {option!r} ({len(option_ids)} tokens) "
            f"after {len(prefix)} special token(s)"
        )
    prompt_ids = prompt_ids[len(prompt_ids) - budget :] if budget < len(prompt_ids) else prompt_ids
    return list(prefix) + list(prompt_ids) + list(option_ids), len(option_ids)


def collate_causal_lm(
    examples: Sequence[dict],
    template: PromptTemplate,
    tokenizer,
    max_length: int = 2048,
    options: str = "gold",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize and pad ``examples`` into a batch (keys in the module docstring).

    options: "gold" (one row per example: its gold answer; for training) or "all" (a row per
    option; for scoring and for MeZO's classification-style loss).
    """
    if options not in ("gold", "all"):
        raise ValueError(f"options must be 'gold' or 'all', got {options!r}")
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    prefix = special_prefix_ids(tokenizer)
    truncate_option = bool(getattr(template, "truncate_option", False))
    rows: list[list[int]] = []
    answer_lens: list[int] = []
    is_gold: list[bool] = []
    example_index: list[int] = []
    option_index: list[int] = []
    gold_option: list[int] = []
    for ex_i, example in enumerate(examples):
        prompt = template.encode(example)
        candidates = template.options(example)
        gold = template.label(example)
        if not 0 <= gold < len(candidates):
            raise ValueError(f"label {gold} out of range for {len(candidates)} options")
        gold_option.append(gold)
        chosen = [gold] if options == "gold" else range(len(candidates))
        for opt_i in chosen:
            ids, n_answer = encode_prompt_and_option(
                prompt, candidates[opt_i], tokenizer, max_length, prefix, truncate_option
            )
            rows.append(ids)
            answer_lens.append(n_answer)
            is_gold.append(opt_i == gold)
            example_index.append(ex_i)
            option_index.append(opt_i)

    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, width), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    answer_mask = torch.zeros((n, width), dtype=torch.bool)
    for r, ids in enumerate(rows):
        length = len(ids)
        input_ids[r, :length] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, :length] = 1
        answer_mask[r, length - answer_lens[r] : length] = True
    gold_rows = torch.tensor(is_gold, dtype=torch.bool)
    labels = torch.where(answer_mask & gold_rows[:, None], input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_mask": answer_mask,
        "labels": labels,
        "example_index": torch.tensor(example_index, dtype=torch.long),
        "option_index": torch.tensor(option_index, dtype=torch.long),
        "gold_option": torch.tensor(gold_option, dtype=torch.long),
    }


def _num_copies(logits: torch.Tensor, rows: int, num_copies: int | None) -> int:
    if logits.shape[0] % rows != 0:
        raise ValueError(f"logits have {logits.shape[0]} rows, not a multiple of the batch's {rows}")
    copies = logits.shape[0] // rows
    if num_copies is not None and num_copies != copies:
        raise ValueError(f"num_copies={num_copies} but logits hold {copies} copies of {rows} rows")
    return copies


def _token_log_likelihoods(logits: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor):
    """Log-probabilities of ``token_ids`` where ``positions`` is True, predicted from one step before.

    Returns (values [K], row of each value [K], selected positions per row [rows]). Only the K selected positions go through the
    softmax, not the whole [rows, T, vocab] tensor.
    """
    if logits.dim() != 3 or logits.shape[1] != token_ids.shape[1]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(token_ids.shape)}")
    copies = _num_copies(logits, token_ids.shape[0], None)
    # Token t is predicted by the logits at t-1.
    targets = token_ids[:, 1:].repeat(copies, 1)
    selected = positions[:, 1:].repeat(copies, 1)
    picked_logits = logits[:, :-1][selected].float()
    log_probs = torch.log_softmax(picked_logits, dim=-1)
    values = log_probs.gather(-1, targets[selected].unsqueeze(-1)).squeeze(-1)
    row_of = torch.arange(logits.shape[0], device=logits.device)[:, None].expand_as(selected)[selected]
    return values, row_of, selected.sum(dim=1)


def lm_answer_loss(
    logits: torch.Tensor,
    batch: dict,
    reduction: str = "mean",
    num_copies: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the gold answer tokens (``batch["labels"] != -100``), shifted by one.

    reduction:
      "mean"        scalar: summed CE / number of answer tokens (Hugging Face's CE semantics);
      "sum"         scalar: summed CE;
      "per_example" [rows of logits]: each row's mean CE over its answer tokens (0 for a row
                    without gold tokens, e.g. a wrong option's row in an options="all" batch);
      "per_copy"    [D]: the "mean" loss of each of the D stacked copies (module docstring).
    """
    labels = batch["labels"].to(logits.device)
    rows = labels.shape[0]
    copies = _num_copies(logits, rows, num_copies)
    positions = labels != IGNORE_INDEX
    log_likelihoods, row_of, counts = _token_log_likelihoods(logits, labels.clamp(min=0), positions)
    row_sums = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    row_sums = row_sums.index_add(0, row_of, -log_likelihoods)
    counts = counts.to(row_sums.dtype)
    if reduction == "mean":
        return row_sums.sum() / counts.sum().clamp(min=1)
    if reduction == "sum":
        return row_sums.sum()
    if reduction == "per_example":
        return row_sums / counts.clamp(min=1)
    if reduction == "per_copy":
        return row_sums.view(copies, rows).sum(1) / counts.view(copies, rows).sum(1).clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; use mean, sum, per_example or per_copy")


def option_scores(logits: torch.Tensor, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Score [rows of logits] of each row's option: mean (default, MeZO's) or sum of its tokens' log-probs.

    MeZO predicts with the mean log-likelihood per answer token, which does not favour short
    options; "sum" is the sequence log-probability.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}; use mean or sum")
    answer_mask = batch["answer_mask"].to(logits.device)
    input_ids = batch["input_ids"].to(logits.device)
    values, row_of, counts = _token_log_likelihoods(logits, input_ids, answer_mask)
    sums = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32).index_add(0, row_of, values)
    if reduction == "sum":
        return sums
    return sums / counts.to(sums.dtype).clamp(min=1)


def scores_by_example(scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """[B, max options] table of row scores; missing options are -inf."""
    example_index = batch["example_index"].to(scores.device)
    option_index = batch["option_index"].to(scores.device)
    num_examples = batch["gold_option"].shape[0]
    width = int(option_index.max().item()) + 1
    table = torch.full((num_examples, width), float("-inf"), device=scores.device, dtype=scores.dtype)
    return table.index_put((example_index, option_index), scores)


def option_classification_loss(scores: torch.Tensor, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """MeZO's ``train_as_classification`` loss: CE over each example's option scores vs its gold option.

    ``scores`` come from :func:`option_scores` on an options="all" batch (keep the graph for FO).
    reduction "mean" (scalar) or "none" ([B]).
    """
    table = scores_by_example(scores, batch)
    return F.cross_entropy(table, batch["gold_option"].to(table.device), reduction=reduction)
