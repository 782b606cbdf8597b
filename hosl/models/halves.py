"""What every split half shares: the base classes and the small helpers the per-architecture
modules (``decoder.py``, ``opt.py``, ``gpt2.py``, ``bert.py``) use.

The decoder families differ only in how they embed tokens, run their blocks and normalise at the
end; the order of those steps and the output head are the same for all of them, so
:class:`ClientHalf` and :class:`DecoderServer` own the ``forward`` and call the family's hooks.

Both halves hold *references* to the original model's submodules (no copies), except a tied output
head, which :func:`untied_head_copy` turns into a server-owned copy.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

TASK_CAUSAL_LM = "causal_lm"
TASK_SEQUENCE_CLASSIFICATION = "sequence_classification"
TASK_ENCODER = "encoder"  # a bare encoder (BertModel): the server returns last_hidden_state


class ClientHalf(nn.Module):
    """Embeddings + blocks ``[0, cut)``. ``forward(input_ids, attention_mask=None) -> hidden [B, T, H]``.

    Subclasses register the embedding modules first and ``layers`` last, so ``named_parameters()``
    is deterministic and in forward order (``embed_tokens.weight``, ..., ``layers.0.*``, ...), and
    define ``embed`` and ``run_blocks`` (or override ``forward``, as BERT's does).
    """

    def __init__(self, config, cut: int):
        super().__init__()
        self.config = config
        self.cut = cut

    @property
    def num_blocks(self) -> int:
        return len(self.layers)  # type: ignore[arg-type]  # an nn.ModuleList (torch types submodules as Tensor | Module)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids, attention_mask)
        if self.num_blocks:  # cut=0: the 4-D mask is not even built, as no block would read it
            hidden = self.run_blocks(hidden, attention_mask)
        return hidden


class ServerHalf(nn.Module):
    """Blocks ``[cut, L)``, final norm and head. ``forward(hidden, attention_mask=None) -> logits``."""

    def __init__(self, config, cut: int, layers: list[nn.Module], task: str):
        super().__init__()
        self.config = config
        self.cut = cut
        self.task = task
        self.layers = nn.ModuleList(layers)

    @property
    def num_blocks(self) -> int:
        return len(self.layers)


class DecoderServer(ServerHalf):
    """A decoder's server: blocks, final norm, then the head of ``task``: ``lm_head`` (causal LM,
    logits ``[B, T, vocab]``) or ``score`` pooled at each row's last attended token ``[B, C]``.

    Subclasses register their final-norm modules, then call :meth:`attach_head` (so the head's
    parameters come last), and define ``run_blocks`` and ``final_norm``.
    """

    def attach_head(self, model, input_embedding: nn.Embedding) -> None:
        if self.task == TASK_CAUSAL_LM:
            self.lm_head = untied_head_copy(model.lm_head, input_embedding)
        else:
            self.score = model.score

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_blocks:
            hidden = self.run_blocks(hidden, attention_mask)
        hidden = self.final_norm(hidden)
        if self.task == TASK_CAUSAL_LM:
            return self.lm_head(hidden)
        return pool_last_token(self.score(hidden), attention_mask)


def decoder_task(model: nn.Module) -> str:
    """The task of a decoder's head: a causal LM has ``lm_head``, a sequence classifier ``score``."""
    return TASK_CAUSAL_LM if hasattr(model, "lm_head") else TASK_SEQUENCE_CLASSIFICATION


def check_cut(cut, num_layers: int) -> int:
    """Validate ``cut`` (an integer in ``[0, num_layers]``; numpy ints are fine) and return it as an int."""
    try:
        if isinstance(cut, bool):
            raise TypeError
        cut = operator.index(cut)
    except TypeError:
        raise ValueError(f"cut must be an int in [0, {num_layers}], got {cut!r}") from None
    if not 0 <= cut <= num_layers:
        raise ValueError(
            f"cut={cut} is out of range: this model has {num_layers} blocks, valid cuts are 0..{num_layers}"
        )
    return cut


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def untied_head_copy(head: nn.Linear, input_embedding: nn.Embedding) -> nn.Linear:
    """The server's output head.

    If ``head`` is tied to the client's input embedding (OPT, SmolLM2), return a new ``nn.Linear``
    whose weight is a clone: the two sides then train their own copy and no storage crosses the cut.
    An untied head is returned as is (a reference, like every other module).
    """
    if not shares_storage(head.weight, input_embedding.weight):
        return head
    weight = head.weight
    copy = nn.Linear(weight.shape[1], weight.shape[0], bias=head.bias is not None, device="meta", dtype=weight.dtype)
    copy.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if head.bias is not None:
        copy.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=head.bias.requires_grad)
    return copy


def last_token_index(attention_mask: torch.Tensor | None, device) -> torch.Tensor | int:
    """Index of each row's rightmost attended token, for last-token sequence classification.

    Hugging Face finds it from ``input_ids != pad_token_id``; the server never sees token ids, so it
    uses the attention mask with the same formula. The two agree whenever pad tokens are exactly the
    masked positions (what a tokenizer produces). Without a mask every row uses its last position.
    """
    if attention_mask is None:
        return -1
    attended = (attention_mask != 0).to(device, torch.int32)
    positions = torch.arange(attention_mask.shape[-1], device=device, dtype=torch.int32)
    return (positions * attended).argmax(-1)


def pool_last_token(per_token_logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T, C] -> [B, C]`` at each row's last attended token (score first, pool after, as HF does)."""
    batch_size = per_token_logits.shape[0]
    index = last_token_index(attention_mask, per_token_logits.device)
    return per_token_logits[torch.arange(batch_size, device=per_token_logits.device), index]
