"""Adapters to other training stacks: :class:`HOSLTrainer` for ``transformers.Trainer``."""

from .trainer import HOSLTrainer, SplitModel, default_split_loss

__all__ = ["HOSLTrainer", "SplitModel", "default_split_loss"]
