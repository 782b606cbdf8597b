"""``split(model, cut)``: cut a Hugging Face model at block ``cut`` into a client and a server half."""

from __future__ import annotations

from torch import nn

from .architectures import ARCHITECTURES, of_model, titles
from .halves import ClientHalf, ServerHalf
from .lora import unwrap_peft


def split(model: nn.Module, cut: int) -> tuple[ClientHalf, ServerHalf]:
    """Cut ``model`` after its first ``cut`` blocks. Families: those of
    :data:`hosl.models.architectures.ARCHITECTURES` (OPT, Llama, BERT, Qwen2, Qwen3, Mistral, Gemma
    and GPT-2); the causal-LM and sequence-classification heads of each.

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
    arch = of_model(model)
    if arch is None:
        classes = ", ".join(cls.__name__ for a in ARCHITECTURES.entries() for cls in a.model_classes)
        raise TypeError(
            f"split() does not support {type(model).__name__}; supported families: {titles()} (classes: {classes})"
        )
    client, server = arch.splitter(model, cut)
    client.train(model.training)
    server.train(model.training)
    return client, server
