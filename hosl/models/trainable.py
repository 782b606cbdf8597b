"""Train a named subset of a half's parameters (``hosl train --client-params GLOBS``).

``parse_globs("*LayerNorm*,*.bias")`` splits the comma-separated ``fnmatch`` patterns;
``keep_trainable(client, patterns)`` then freezes (``requires_grad_(False)``) every trainable
parameter of ``client`` whose ``named_parameters()`` name matches no pattern and leaves the
matching ones as they are, so with LoRA it can only narrow the adapters' set. Everything that
trains keys on ``requires_grad``: the ZO layout (``hosl/forward/layout.py``), the FO optimizers
(``hosl/training/modes.py``), the memory planner and LoRA runs' trainable-only checkpoints.

The word ``norms`` (:data:`NORMS`) stands for every parameter of the half's normalisation layers,
whatever the architecture calls them (BERT's ``LayerNorm``, OPT's ``self_attn_layer_norm``, Llama's
``input_layernorm`` RMSNorm, GPT-2's ``ln_1``): the modules that are ``nn.LayerNorm`` /
``nn.RMSNorm`` or whose class name ends in ``Norm`` (``LlamaRMSNorm``, ``GemmaRMSNorm``, ...).

A pattern that matches no trainable parameter is an error naming the flag, raised before any
parameter is changed (a typo would otherwise train nothing, or not what was meant).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from torch import nn

FLAG = "--client-params"
NORMS = "norms"  # the word for the normalisation layers' parameters, in place of a pattern


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: ``nn.LayerNorm`` / ``nn.RMSNorm`` or a class named ``...Norm``."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def norm_parameter_names(module: nn.Module) -> set[str]:
    """The ``named_parameters()`` names of ``module``'s normalisation layers' own parameters."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        if is_norm(sub)
        for name, _ in sub.named_parameters(recurse=False)
    }


def _matches(name: str, pattern: str, norms: set[str]) -> bool:
    return name in norms if pattern == NORMS else fnmatchcase(name, pattern)


def parse_globs(text: object, flag: str = FLAG) -> list[str]:
    """The patterns of a comma-separated list (surrounding spaces dropped); a ValueError naming
    ``flag`` for a value that is not a string or holds no pattern."""
    if not isinstance(text, str):
        raise ValueError(f"{flag} must be comma-separated glob patterns (a string), got {text!r}")
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"{flag} needs at least one glob pattern, e.g. '*LayerNorm*', got {text!r}")
    return patterns


def name_shapes(names: list[str], limit: int = 12) -> str:
    """``names`` in short: block numbers as ``*`` (itself a glob), one entry per module, its
    parameters joined by ``/`` (``layers.*.output.LayerNorm.weight/.bias``), at most ``limit``."""
    leaves: dict[str, list[str]] = {}
    for name in names:
        module, _, leaf = re.sub(r"\.\d+\.", ".*.", name).rpartition(".")
        if leaf not in leaves.setdefault(module, []):
            leaves[module].append(leaf)
    shown = [f"{module}.{'/.'.join(leaf)}" if module else "/.".join(leaf) for module, leaf in leaves.items()]
    return ", ".join(shown[:limit]) + (", ..." if len(shown) > limit else "")


def keep_trainable(module: nn.Module, patterns: list[str], flag: str = FLAG, half: str = "client") -> list[str]:
    """Freeze every trainable parameter of ``module`` whose name matches none of ``patterns``
    (``norms``: its normalisation layers' parameters); return the names of those that stay
    trainable. Raises (changing nothing) when a pattern matches no trainable parameter."""
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{flag}: the {half} half has no trainable parameter to choose from")
    norms = norm_parameter_names(module) if NORMS in patterns else set()
    for pattern in patterns:
        if not any(_matches(name, pattern, norms) for name in trainable):
            what = "no trainable normalisation-layer" if pattern == NORMS else "no trainable"
            raise ValueError(
                f"{flag}: {pattern!r} matches {what} {half} parameter; names look like "
                f"{name_shapes(trainable)} ({len(trainable)} in all)"
            )
    kept = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if any(_matches(name, pattern, norms) for pattern in patterns):
            kept.append(name)
        else:
            p.requires_grad_(False)
    return kept
