"""LoRA adapters through the ``peft`` library, on either half or both.

``apply_lora(model, ...)`` wraps a Hugging Face model in a ``PeftModel`` (``get_peft_model``): the
target linears of the chosen blocks become ``peft`` LoRA layers (``base_layer`` + ``lora_A`` /
``lora_B``, each an ``nn.Linear``) and every base weight is frozen. :func:`hosl.models.split` accepts
the result (it unwraps to the base model, which holds the LoRA-injected layers), so each half
carries the adapters of its own blocks and both optimizers see only trainable parameters: the ZO
client's ``ParameterLayout`` numbers just the adapter weights, and the server's torch optimizer
gets just its adapters.

The adapters are initialised from ``seed`` inside a forked RNG (``lora_A`` random, ``lora_B``
zero, as ``peft`` does), so both processes of a two-process run build the same adapters and the
caller's random state is untouched. LoRA dropout is 0: a ZO estimate needs its ``+`` and ``-``
passes to see the same function.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .architectures import ARCHITECTURES

# freshly initialised classification heads stay trainable (as peft's SEQ_CLS task type does)
HEAD_NAMES = ("score", "classifier")
LORA_HALVES = ("both", "client", "server")


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The architecture's ``lora_targets`` (:data:`hosl.models.architectures.ARCHITECTURES`), by
    ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"no default LoRA targets for model type {model_type!r}; pass targets "
            f"(--lora-targets), e.g. the attention projections' module names"
        )
    return ARCHITECTURES[str(model_type)].lora_targets  # a registered name (checked above)


def lora_layers(num_blocks: int, cut: int, halves: str) -> list[int] | None:
    """Indices of the blocks that get adapters when LoRA is on ``halves`` of a model cut at ``cut``
    (None: all blocks)."""
    if halves not in LORA_HALVES:
        raise ValueError(f"LoRA halves must be one of {LORA_HALVES}, got {halves!r}")
    if halves == "both":
        return None
    layers = list(range(cut)) if halves == "client" else list(range(cut, num_blocks))
    if not layers:
        raise ValueError(f"LoRA on the {halves} only, but the {halves} holds no blocks at cut {cut}")
    return layers


def apply_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float = 16,
    targets: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    train_head: bool = False,
    seed: int = 0,
) -> nn.Module:
    """``model`` wrapped with LoRA adapters of rank ``r`` and scaling ``alpha / r`` on the modules
    named ``targets`` (default: the architecture's ``lora_targets``) of the blocks ``layers``
    (default all). Base weights are frozen; with ``train_head`` a classification head (``score``,
    ``classifier``) stays trainable. Returns the ``PeftModel``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency of the models extra
        raise ImportError("LoRA needs the peft library: pip install peft") from exc
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    targets = list(targets) if targets else list(default_lora_targets(model))
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r takes a float
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        layers_to_transform=None if layers is None else list(layers),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    if train_head:
        for name, module in wrapped.get_base_model().named_children():
            if name in HEAD_NAMES:
                module.requires_grad_(True)
    return wrapped


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model inside a ``peft.PeftModel`` (with its LoRA layers in place); other models as they are."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model
