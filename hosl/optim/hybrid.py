"""``HybridOrderOptimizer``: ZO on the client, FO on the server, in the user's own loop."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hosl.optim import functional as F
from hosl.optim.zo_base import ZerothOrderBase, call_checked, scalar_loss


class HybridOrderOptimizer(ZerothOrderBase):
    """One HOSL step (DESIGN.md section 1) per :meth:`step`.

    ::

        client, server = hosl.split(model, cut=5)
        server_opt = torch.optim.SGD(server.parameters(), lr=1e-3, momentum=0.9)
        opt = hosl.HybridOrderOptimizer(client, server_opt, lr=1e-6, eps=1e-3, num_queries=10)
        for batch in loader:
            loss = opt.step(lambda: client(ids, mask), lambda h: loss_fn(server(h, mask), labels))

    ``client_fn()`` runs the client and returns its activation (it is called under ``no_grad``:
    once at the clean weights, then at each perturbed point). ``server_loss_fn(h)`` runs the server
    and returns the loss. With ``server_batch > 1`` the server evaluates that many perturbed
    activations at once: ``h`` then holds ``copies * B`` rows (the copies concatenated along
    dim 0) and ``server_loss_fn`` must return one loss per copy, shape ``[copies]``
    (:func:`hosl.per_copy_mean` helps); the default 1 keeps one activation alive at a time.

    ``difference="central"`` spends ``2Q`` perturbed passes, ``"forward"`` ``Q`` (reusing the clean
    loss). Steps whose losses are not finite update nothing on the client (counted in
    ``skipped_updates``); the server steps only when the clean loss is finite.

    ``direction``: the direction family, ``"gaussian"`` (default), ``"rademacher"`` or ``"sphere"``
    (non-Gaussian families run the scratch perturbed forward). ``variant``: the client's update rule
    on the estimate ``g = mean_q g_q z_q``: ``"sgd"`` (default; ``w -= lr (g + wd w)``, no state),
    ``"momentum"`` (``momentum``), ``"adam"`` (``betas``, ``adam_eps``) or ``"sign"``, as in ZO-Bench;
    momentum and adam keep float32 state on the client (:meth:`state_nbytes`).
    """

    def __init__(
        self,
        client: nn.Module,
        server_optimizer: torch.optim.Optimizer | None,
        *,
        lr: float = 1e-6,
        eps: float = 1e-3,
        num_queries: int = 10,
        weight_decay: float = 0.0,
        difference: str = "central",
        server_batch: int = 1,
        seed: int = 0,
        backend: str | None = None,
        perturbed_forward: str = "auto",
        direction: str = "gaussian",
        variant: str = "sgd",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ):
        if server_optimizer is not None and not isinstance(server_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"server_optimizer must be a torch.optim.Optimizer or None, got {type(server_optimizer).__name__}"
            )
        if isinstance(server_batch, bool) or not isinstance(server_batch, int) or server_batch < 1:
            raise ValueError(f"server_batch must be an integer >= 1, got {server_batch!r}")
        super().__init__(
            [client], lr=lr, eps=eps, num_queries=num_queries, weight_decay=weight_decay,
            difference=difference, seed=seed, backend=backend, perturbed_forward=perturbed_forward,
            direction=direction, variant=variant, momentum=momentum, betas=betas, adam_eps=adam_eps,
        )
        self.client = client
        self.server_optimizer = server_optimizer
        self.server_batch = server_batch

    def _perturbed_losses(self, client_fn, server_loss_fn, points) -> list[float]:
        losses: list[float] = []
        for start in range(0, len(points), self.server_batch):
            chunk = points[start : start + self.server_batch]
            activations = []
            for seed, sign in chunk:
                with self.perturbed(seed, sign):
                    activations.append(client_fn().detach())
            with torch.no_grad():
                if len(chunk) == 1:
                    losses.append(float(scalar_loss(server_loss_fn(activations[0]), "server_loss_fn")))
                    continue
                out = server_loss_fn(torch.cat(activations, dim=0))
            if not isinstance(out, torch.Tensor) or out.shape != (len(chunk),):
                raise ValueError(
                    f"with server_batch={self.server_batch}, server_loss_fn must return one loss per copy "
                    f"(shape [{len(chunk)}]) for {len(chunk)} concatenated activations, got "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                )
            losses.extend(out.float().tolist())
            del activations
        return losses

    def step(self, client_fn: Callable[[], torch.Tensor], server_loss_fn: Callable[[torch.Tensor], torch.Tensor]):
        """One HOSL step; returns the clean loss (detached)."""
        call_checked(client_fn, "client_fn")
        call_checked(server_loss_fn, "server_loss_fn")
        with torch.no_grad():
            h0 = client_fn()
        loss0 = scalar_loss(server_loss_fn(h0.detach()), "server_loss_fn")
        clean = float(loss0.detach())
        if loss0.requires_grad and torch.isfinite(loss0):
            loss0.backward()
        del h0  # the clean activation is not needed again: free it before the perturbed passes

        seeds = F.draw_seeds(self.generator, self.num_queries)
        losses = self._perturbed_losses(client_fn, server_loss_fn, self.points(seeds))
        grads = self.estimate(losses, clean)
        self.last_seeds, self.last_projected_grads = seeds, grads
        if F.all_finite([clean, *losses, *grads]):
            self.apply_update(seeds, grads)
        else:
            self.skipped_updates += 1

        if self.server_optimizer is not None:
            if F.all_finite([clean]):
                self.server_optimizer.step()
            self.server_optimizer.zero_grad(set_to_none=True)
        self.steps_taken += 1
        return loss0.detach()

    def state_dict(self):
        state = super().state_dict()
        if self.server_optimizer is not None:
            state["hosl"]["server_optimizer"] = self.server_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        server_state = state_dict.get("hosl", {}).get("server_optimizer")
        super().load_state_dict(state_dict)
        if self.server_optimizer is not None:
            if server_state is None:
                raise ValueError("state_dict has no server optimizer state but this optimizer has a server optimizer")
            self.server_optimizer.load_state_dict(server_state)
