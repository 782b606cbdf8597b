"""``ZerothOrderOptimizer``: ZO-SGD (MeZO's estimator; or a ZO variant) on one or more modules.

The ZO-SL baseline (client and server both ZO) and MeZO on an unsplit model. Each module has its
own coordinate numbering; one seed perturbs all of them at once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from hosl.optim import functional as F
from hosl.optim.zo_base import ZerothOrderBase, call_checked, scalar_loss


class ZerothOrderOptimizer(ZerothOrderBase):
    """``step(loss_fn)``: ``loss_fn()`` runs the modules and returns the loss (no gradient is used).

    ``peers``: see :mod:`hosl.optim.zo_base` (ZO-SL with the server in another process).
    ``direction``, ``variant``, ``momentum``, ``betas``, ``adam_eps``: as for
    :class:`~hosl.optim.hybrid.HybridOrderOptimizer`.
    """

    def __init__(
        self,
        modules: nn.Module | Sequence[nn.Module],
        *,
        lr: float = 1e-6,
        eps: float = 1e-3,
        num_queries: int = 1,
        weight_decay: float = 0.0,
        difference: str = "central",
        seed: int = 0,
        backend: str | None = None,
        perturbed_forward: str = "auto",
        peers: Sequence = (),
        direction: str = "gaussian",
        variant: str = "sgd",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ):
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        super().__init__(
            modules, lr=lr, eps=eps, num_queries=num_queries, weight_decay=weight_decay,
            difference=difference, seed=seed, backend=backend, perturbed_forward=perturbed_forward,
            peers=peers, direction=direction, variant=variant, momentum=momentum, betas=betas, adam_eps=adam_eps,
        )

    def step(self, loss_fn: Callable[[], torch.Tensor]):
        call_checked(loss_fn, "loss_fn")
        clean = None
        if self.difference == "forward":
            with torch.no_grad():
                clean = float(scalar_loss(loss_fn(), "loss_fn"))
        seeds = F.draw_seeds(self.generator, self.num_queries)
        losses = []
        for seed, sign in self.points(seeds):
            with self.perturbed(seed, sign):
                losses.append(float(scalar_loss(loss_fn(), "loss_fn")))
        grads = self.estimate(losses, clean)
        self.last_seeds, self.last_projected_grads = seeds, grads
        if F.all_finite([*losses, *grads]):
            self.apply_update(seeds, grads)
        else:
            self.skipped_updates += 1
        self.steps_taken += 1
        if clean is None:  # report the mean of the perturbed losses, as MeZO does
            clean = sum(losses) / len(losses)
        return torch.tensor(clean)
