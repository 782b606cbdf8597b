"""Optimizers: the ZO client update, HOSL's hybrid step, and the plain ZO baseline."""

from hosl.forward.layout import ParameterLayout
from hosl.optim.config import ZOConfig
from hosl.optim.hybrid import HybridOrderOptimizer
from hosl.optim.losses import per_copy_mean
from hosl.optim.zo import ZerothOrderOptimizer

__all__ = ["HybridOrderOptimizer", "ParameterLayout", "ZOConfig", "ZerothOrderOptimizer", "per_copy_mean"]
