"""The model architectures :func:`hosl.models.split` can cut, one :class:`Architecture` each in the
registry :data:`ARCHITECTURES`.

An entry holds what the rest of hosl needs to know of an architecture: the Hugging Face model
classes it splits (matched with ``isinstance``, so subclasses such as MiniLM loaded as
``BertModel`` match) and the ``config.model_type`` they carry, its splitter, the modules LoRA
adapts by default, whether it is an encoder (trained as a classifier) or a decoder (a causal LM),
and the name the help and errors show. ``split``, ``apply_lora``'s default targets, ``hosl
train``'s choice of head and ``--model``'s help all read the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers.models.bert.modeling_bert import BertForSequenceClassification, BertModel
from transformers.models.gemma.modeling_gemma import GemmaForCausalLM, GemmaForSequenceClassification
from transformers.models.gpt2.modeling_gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaForSequenceClassification
from transformers.models.mistral.modeling_mistral import MistralForCausalLM, MistralForSequenceClassification
from transformers.models.opt.modeling_opt import OPTForCausalLM, OPTForSequenceClassification
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM, Qwen2ForSequenceClassification
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM, Qwen3ForSequenceClassification

from hosl._registry import Registry

from .bert import split_bert
from .decoder import split_rotary_decoder
from .gpt2 import split_gpt2
from .halves import ClientHalf, ServerHalf
from .opt import split_opt

ATTENTION_QV = ("q_proj", "v_proj")  # the attention projections the paper (and MeZO) adapt


@dataclass(frozen=True)
class Architecture:
    """One architecture. ``name`` is its ``config.model_type`` (the key LoRA defaults and the
    encoder check look up); ``title`` is how help texts and errors name it.

    ``splitter(model, cut) -> (ClientHalf, ServerHalf)`` must reproduce the model's forward: see
    :func:`hosl.models.split`.
    """

    name: str
    title: str
    model_classes: tuple[type[nn.Module], ...]
    splitter: Callable[[nn.Module, int], tuple[ClientHalf, ServerHalf]]
    lora_targets: tuple[str, ...]
    encoder: bool = False


ARCHITECTURES: Registry[Architecture] = Registry("architecture")


def of_model(model: nn.Module) -> Architecture | None:
    """The architecture whose model classes ``model`` is an instance of (None: not supported)."""
    return ARCHITECTURES.find(lambda a: isinstance(model, a.model_classes))


def is_encoder(model_type: str) -> bool:
    """Whether ``model_type`` is a registered encoder (trained with a classification head)."""
    return model_type in ARCHITECTURES and ARCHITECTURES[model_type].encoder


def titles() -> str:
    """``OPT, Llama (SmolLM2), ...``: the registered architectures, for help texts and errors."""
    return ", ".join(a.title for a in ARCHITECTURES.entries())


for _arch in (
    Architecture("opt", "OPT", (OPTForCausalLM, OPTForSequenceClassification), split_opt, ATTENTION_QV),
    Architecture(
        "llama",
        "Llama (SmolLM2)",
        (LlamaForCausalLM, LlamaForSequenceClassification),
        split_rotary_decoder,
        ATTENTION_QV,
    ),
    Architecture(
        "bert",
        "BERT (MiniLM)",
        (BertModel, BertForSequenceClassification),
        split_bert,
        ("query", "value"),
        encoder=True,
    ),
    Architecture(
        "qwen2", "Qwen2", (Qwen2ForCausalLM, Qwen2ForSequenceClassification), split_rotary_decoder, ATTENTION_QV
    ),
    Architecture(
        "qwen3", "Qwen3", (Qwen3ForCausalLM, Qwen3ForSequenceClassification), split_rotary_decoder, ATTENTION_QV
    ),
    Architecture(
        "mistral", "Mistral", (MistralForCausalLM, MistralForSequenceClassification), split_rotary_decoder, ATTENTION_QV
    ),
    Architecture(
        "gemma", "Gemma", (GemmaForCausalLM, GemmaForSequenceClassification), split_rotary_decoder, ATTENTION_QV
    ),
    # GPT-2 fuses q, k and v in c_attn
    Architecture("gpt2", "GPT-2", (GPT2LMHeadModel, GPT2ForSequenceClassification), split_gpt2, ("c_attn",)),
):
    ARCHITECTURES.register(_arch)
