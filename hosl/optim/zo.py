"""``ZerothOrderOptimizer``: ZO-SGD (MeZO's estimator; or a ZO variant) on one or more modules.

The ZO-SL baseline (client and server both ZO) and MeZO on an unsplit model. The modules share one
coordinate numbering (each starts where the previous one ends, from ``coordinate_offset``), so
``[client, server]`` is MeZO on the whole model; one seed perturbs all of them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hosl.optim import functional as F
from hosl.optim.config import ZOConfig, optimizer_signature
from hosl.optim.query_batch import ForwardProbe
from hosl.optim.zo_base import ZerothOrderBase, batch_losses, call_checked, scalar_loss


class ZerothOrderOptimizer(ZerothOrderBase):
    """``step(loss_fn)``: ``loss_fn()`` runs the modules and returns the loss (no gradient is used).

    Options: the keywords of :class:`~hosl.optim.config.ZOConfig` that apply to this optimizer
    (``lr=1e-6, eps=1e-3, num_queries=1, ...``; the signature lists them), or ``config=ZOConfig(...)``
    (keywords given with it override its fields). Defaults as ``ZOConfig()`` but ``num_queries=1``
    (MeZO's; :meth:`ZOConfig.defaults_for`). The options end up in ``self.config``.

    ``peers``: see :mod:`hosl.optim.zo_base` (ZO-SL with the server in another process).
    ``coordinate_offset``: the first module's first coordinate (ZO-SL's server half: the client's
    coordinate count).
    ``direction``, ``variant``, ``momentum``, ``betas``, ``adam_eps``: as for
    :class:`~hosl.optim.hybrid.HybridOrderOptimizer`.

    ``query_batch=D`` (or ``"auto"`` with ``query_memory_budget``; not with ``peers``): ``D`` points per
    forward over the modules' batch inputs repeated ``D`` times (:mod:`hosl.forward.batched`);
    ``loss_fn()`` then sees outputs with ``D*B`` rows (copy ``d`` at rows ``d*B ..``) and returns
    ``[D]`` losses, one per copy (:func:`hosl.per_copy_mean`). With ``"auto"`` the first point of a
    step runs alone to measure one copy's working set.
    """

    config_kind = "zo"

    def __init__(
        self,
        modules: nn.Module | Sequence[nn.Module],
        *,
        config: ZOConfig | None = None,
        peers: Sequence = (),
        **options,
    ):
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        super().__init__(modules, ZOConfig.of_optimizer(self.config_kind, config, options), peers=peers)

    def _perturbed_losses(self, loss_fn, points) -> list[float]:
        if self.query_batch == 1:
            losses = []
            for seed, sign in points:
                with self.perturbed(seed, sign):
                    losses.append(float(scalar_loss(loss_fn(), "loss_fn")))
            return losses
        losses, start, per_copy = [], 0, 0
        if self.query_batch == "auto" or self.query_memory_budget is not None:
            with self.perturbed(*points[0]), ForwardProbe(self.zo_modules()) as probe:
                losses.append(float(scalar_loss(loss_fn(), "loss_fn")))
            start, per_copy = 1, probe.per_copy_bytes()
        d = self.query_batch_for(per_copy, len(points))
        for i in range(start, len(points), d):
            chunk = points[i : i + d]
            with self.batched(chunk):
                out = loss_fn()
            losses.extend(batch_losses(out, len(chunk), "loss_fn", f"query_batch={self.query_batch!r}"))
        return losses

    def step(self, loss_fn: Callable[[], torch.Tensor]):  # type: ignore[override]  # loss_fn is required (ZO)
        """One ZO step; returns the clean loss (forward differences) or the mean perturbed loss. If
        anything raises, the weights and the seed stream are as the step found them."""
        with self.seed_stream_kept_on_error():
            return self._step(loss_fn)

    def _step(self, loss_fn: Callable[[], torch.Tensor]):
        call_checked(loss_fn, "loss_fn")
        clean = None
        if self.difference == "forward":
            with torch.no_grad():
                clean = float(scalar_loss(loss_fn(), "loss_fn"))
        seeds = F.draw_seeds(self.generator, self.num_queries)
        self.begin_directions(seeds)
        losses = self._perturbed_losses(loss_fn, self.points(seeds))
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


ZerothOrderOptimizer.__init__.__signature__ = optimizer_signature(ZerothOrderOptimizer.__init__, "zo")  # type: ignore[attr-defined]  # what help() shows
