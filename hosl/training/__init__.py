"""Training runs: modes (hosl and the baselines), the loop, checkpoints, memory accounting."""

from hosl.training.config import TrainConfig
from hosl.training.modes import MODES, make_mode

__all__ = ["MODES", "TrainConfig", "make_mode", "train"]


def train(config: TrainConfig) -> dict:
    from hosl.training.loop import train as _train

    return _train(config)
