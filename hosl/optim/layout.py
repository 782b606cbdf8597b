"""Where each trainable parameter of a ZO-trained module lives in the direction's coordinates.

The direction ``z(seed)`` is indexed by the coordinate's position in the module's flattened
parameter list, ordered by parameter name, so the numbering does not depend on construction order,
device or backend. Only seeds need be kept to rebuild any direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_NORM_HINTS = ("norm", "ln_", "layernorm")


@dataclass(frozen=True)
class ParameterSlot:
    name: str
    param: nn.Parameter
    offset: int  # first coordinate
    decay: bool  # weight decay applies (not to biases and norms, as in MeZO)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


class ParameterLayout:
    """The trainable parameters of ``module``, by name, with coordinate offsets and decay flags."""

    def __init__(self, module: nn.Module):
        owner = {}
        for mod_name, mod in module.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                owner[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
        named = sorted((n, p) for n, p in module.named_parameters() if p.requires_grad)
        slots, offset = [], 0
        for name, p in named:
            no_decay = (
                name.endswith("bias")
                or p.ndim <= 1
                or _is_norm(owner[name])
                or any(h in name.lower() for h in _NORM_HINTS)
            )
            slots.append(ParameterSlot(name, p, offset, not no_decay))
            offset += p.numel()
        if not slots:
            raise ValueError("the module has no trainable parameters to optimise with ZO")
        self.slots: list[ParameterSlot] = slots
        self.numel: int = offset
        self.by_param = {id(s.param): s for s in slots}

    def __len__(self) -> int:
        return len(self.slots)

    def params(self) -> list[nn.Parameter]:
        return [s.param for s in self.slots]

    def groups(self) -> tuple[list[ParameterSlot], list[ParameterSlot]]:
        """(decayed, not decayed) slots."""
        return [s for s in self.slots if s.decay], [s for s in self.slots if not s.decay]

    def nbytes(self) -> int:
        return sum(s.param.numel() * s.param.element_size() for s in self.slots)

    def check_unchanged_parameters(self, module: nn.Module) -> None:
        """Raise if ``module``'s trainable parameters are no longer the ones laid out."""
        current = sorted((n, p) for n, p in module.named_parameters() if p.requires_grad)
        if [(n, id(p)) for n, p in current] != [(s.name, id(s.param)) for s in self.slots]:
            raise RuntimeError("the module's trainable parameters changed after the optimizer was built")
