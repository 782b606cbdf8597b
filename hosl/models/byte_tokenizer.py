"""An offline byte-level tokenizer for the random-weight causal LMs (tiny-opt, tiny-llama,
opt-*-random), which have no real vocabulary to go with them.

One token per UTF-8 byte (GPT-2's byte-to-character alphabet, no merges), after four special tokens
laid out as in OPT's vocabulary: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3; bytes are 4..259.
Every text round-trips; ids stay below :data:`BYTE_VOCAB_SIZE`, so it also fits a model with a
larger vocabulary (OPT's 50272). Good for tests, memory and speed figures; not for accuracy.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(4)
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def _byte_level_chars() -> list[str]:
    """The character the ByteLevel pre-tokenizer writes for each byte value 0..255.

    Printable Latin-1 bytes stand for themselves; the other 68 are mapped, in byte order, to
    code points 256, 257, ... (GPT-2's scheme, which ``tokenizers``' ByteLevel implements).
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    chars, next_spare = [], 256
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(next_spare))
            next_spare += 1
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    return chars


def byte_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer that prepends ``<s>`` to every sequence."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for byte, char in enumerate(_byte_level_chars()):
        vocab[char] = len(SPECIAL_TOKENS) + byte
    assert len(vocab) == BYTE_VOCAB_SIZE
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
