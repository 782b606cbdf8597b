"""Named recipes: ``hosl train --recipe NAME`` fills in the settings a run leaves unset.

A :class:`Recipe` is a measured combination of settings under one name, one entry of the registry
:data:`RECIPES`. It may only name :class:`~hosl.training.config.TrainConfig` fields whose default
is None, so that "unset" is unambiguous: a value given on the command line or in a ``--config``
file always wins over the recipe's. ``TrainConfig.validate`` applies it (:func:`apply_recipe`),
so a run's ``config.json`` holds the values the recipe gave, and a resumed run sees the same ones.

Each entry says where it was measured (``evidence``, a file of ``docs/``). A recipe is added by
registering a :class:`Recipe` here; ``--recipe``'s choices and help are read from the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hosl._registry import Registry
from hosl.training.modes import SPLIT_MODES, ZO_CLIENT_MODES

ZO_CLIENT_SPLIT_MODES = tuple(m for m in ZO_CLIENT_MODES if m in SPLIT_MODES)  # hosl, zo-sl


@dataclass(frozen=True)
class Recipe:
    """``settings``: TrainConfig field -> value, applied where the field is None; ``modes``: the
    ``--mode`` values the recipe is for; ``help``: one line for ``--recipe``'s help."""

    name: str
    help: str
    settings: Mapping[str, object]
    modes: tuple[str, ...]
    evidence: str


RECIPES: Registry[Recipe] = Registry("recipe")

RECIPES.register(
    Recipe(
        "zo-norms",
        "ZO on the client's normalisation layers only (--client-params norms) at client lr 1e-2, "
        "one-sided differences (--difference forward: Q + 1 client forwards a step)",
        {"client_params": "norms", "lr_client": 1e-2, "difference": "forward"},
        modes=ZO_CLIENT_SPLIT_MODES,
        evidence="docs/time_to_accuracy.md",
    )
)


def apply_recipe(cfg) -> None:
    """Fill in ``cfg``'s unset (None) fields from ``cfg.recipe`` (None: no recipe). A ValueError
    naming ``--recipe`` for an unknown name or a mode the recipe is not for; nothing is changed then."""
    if cfg.recipe is None:
        return
    if cfg.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES) or '(none registered)'}, got {cfg.recipe!r}")
    recipe = RECIPES[cfg.recipe]
    if cfg.mode not in recipe.modes:
        raise ValueError(f"--recipe {recipe.name} is for --mode {' or '.join(recipe.modes)}, got --mode {cfg.mode}")
    for name, value in recipe.settings.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
