"""Small tokenizer facts the batching code needs, asked of the tokenizer rather than assumed."""

from __future__ import annotations


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer adds before and after a single text (e.g. BERT: [CLS] / [SEP]; OPT: </s> / none).

    Found by tokenizing a probe with and without special tokens, so it works for any tokenizer
    whatever its post-processor.
    """
    probe = "hello world"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    n = len(without)
    for start in range(len(with_special) - n + 1):
        if with_special[start : start + n] == without:
            return with_special[:start], with_special[start + n :]
    raise ValueError("cannot locate the text's tokens among the tokenizer's special tokens")


def special_prefix_ids(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before a text (its BOS, if it adds one)."""
    return special_affixes(tokenizer)[0]


def pad_token_id(tokenizer) -> int:
    """The pad id, else EOS (causal LMs often have no pad token), else 0; padded positions are masked anyway."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
