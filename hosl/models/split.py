"""``split(model, cut)``: cut a Hugging Face model at block ``cut`` into a client and a server half."""

from __future__ import annotations

from torch import nn
from transformers.models.bert.modeling_bert import BertForSequenceClassification, BertModel
from transformers.models.gemma.modeling_gemma import GemmaForCausalLM, GemmaForSequenceClassification
from transformers.models.gpt2.modeling_gpt2 import GPT2ForSequenceClassification, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaForSequenceClassification
from transformers.models.mistral.modeling_mistral import MistralForCausalLM, MistralForSequenceClassification
from transformers.models.opt.modeling_opt import OPTForCausalLM, OPTForSequenceClassification
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM, Qwen2ForSequenceClassification
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM, Qwen3ForSequenceClassification

from .bert import split_bert
from .decoder import split_rotary_decoder
from .gpt2 import split_gpt2
from .halves import ClientHalf, ServerHalf
from .llama import split_llama
from .lora import unwrap_peft
from .opt import split_opt

# (model classes, splitter); isinstance is used, so subclasses (e.g. MiniLM loaded as BertModel) match.
_SPLITTERS = (
    ((OPTForCausalLM, OPTForSequenceClassification), split_opt),
    ((LlamaForCausalLM, LlamaForSequenceClassification), split_llama),
    ((BertModel, BertForSequenceClassification), split_bert),
    ((Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen3ForCausalLM, Qwen3ForSequenceClassification,
      MistralForCausalLM, MistralForSequenceClassification, GemmaForCausalLM, GemmaForSequenceClassification),
     split_rotary_decoder),
    ((GPT2LMHeadModel, GPT2ForSequenceClassification), split_gpt2),
)

SUPPORTED_MODEL_CLASSES = tuple(cls.__name__ for classes, _ in _SPLITTERS for cls in classes)
SUPPORTED_FAMILIES = ("OPT", "Llama (SmolLM2)", "BERT (MiniLM)", "Qwen2", "Qwen3", "Mistral", "Gemma", "GPT-2")


def split(model: nn.Module, cut: int) -> tuple[ClientHalf, ServerHalf]:
    """Cut ``model`` after its first ``cut`` blocks. Families: OPT, Llama, BERT, Qwen2, Qwen3,
    Mistral, Gemma (``decoder.py``) and GPT-2; the causal-LM and sequence-classification heads of each.

    Returns ``(client, server)``, two ``nn.Module``s with
      - ``client(input_ids, attention_mask=None) -> hidden`` ``[B, T, H]``: embeddings and blocks
        ``[0, cut)`` (``cut=0``: embeddings only);
      - ``server(hidden, attention_mask=None) -> logits``: blocks ``[cut, L)``, final norm and head
        (``cut=L``: norm and head only). Causal LMs give ``[B, T, vocab]``, sequence classifiers
        ``[B, num_labels]``, a bare ``BertModel`` its ``last_hidden_state`` ``[B, T, H]``.
    ``server(client(ids, mask), mask)`` equals the unsplit model's logits bit for bit (same device
    and dtype, eval mode). Only the hidden states and the 2-D attention mask cross the cut; each
    side rebuilds the 4-D attention mask (and positions) it needs, as the model would.

    The halves reference the model's own submodules; nothing is copied except a **tied output head**
    (OPT, SmolLM2): the server gets its own clone of the embedding matrix as ``lm_head.weight``, so
    after the split the client's input embedding and the server's head are two independent tensors
    that train separately. Both halves expose ``.config``, ``.cut`` and ``.num_blocks``.

    Last-token sequence classifiers (OPT, Llama) pool at each row's rightmost attended position
    according to the attention mask (HF uses ``input_ids != pad_token_id``; these agree when pads
    are exactly the masked positions).

    A ``peft.PeftModel`` (LoRA, see :mod:`hosl.models.lora`) is split as the model it wraps, LoRA
    layers included: each half holds the adapters of its own blocks, and only they (and whatever
    else was left trainable) have ``requires_grad``.

    Raises ``ValueError`` for a cut outside ``[0, L]`` and ``TypeError`` for an unsupported model.
    """
    model = unwrap_peft(model)
    for classes, splitter in _SPLITTERS:
        if isinstance(model, classes):
            client, server = splitter(model, cut)
            client.train(model.training)
            server.train(model.training)
            return client, server
    raise TypeError(
        f"split() does not support {type(model).__name__}; supported families: {', '.join(SUPPORTED_FAMILIES)} "
        f"(classes: {', '.join(SUPPORTED_MODEL_CLASSES)})"
    )
