"""``HybridOrderOptimizer``: ZO on the client, FO on the server, in the user's own loop."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from hosl.optim import functional as F
from hosl.optim import hygiene
from hosl.optim import linear_estimate as LE
from hosl.optim.config import ZOConfig, config_attribute, optimizer_signature
from hosl.optim.micro_batch import wrap_client_fn
from hosl.optim.query_batch import ForwardProbe
from hosl.optim.zo_base import ZerothOrderBase, batch_losses, call_checked, scalar_loss


class HybridOrderOptimizer(ZerothOrderBase):
    """One HOSL step (``docs/optimizer.md``, first section) per :meth:`step`.

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
    loss). Steps whose losses are not finite, or whose update could make a client weight
    non-finite, update nothing on the client (counted in ``skipped_updates``); the server steps
    only when the clean loss and every server gradient are finite (else ``skipped_server_steps``).
    ``server``: the server module, to check that ``server_optimizer`` holds exactly its trainable
    parameters (without it, only overlap with the client is checked). What else a torch.optim
    user can rely on (no_grad, groups, state checks, exceptions): ``docs/optimizer.md``.

    ``direction``: the direction family, ``"gaussian"`` (default), ``"rademacher"`` or ``"sphere"``
    (non-Gaussian families run the scratch perturbed forward). ``variant``: the client's update rule
    on the estimate ``g = mean_q g_q z_q``: ``"sgd"`` (default; ``w -= lr (g + wd w)``, no state),
    ``"momentum"`` (``momentum``), ``"adam"`` (``betas``, ``adam_eps``) or ``"sign"``, as in ZO-Bench;
    momentum and adam keep float32 state on the client (:meth:`state_nbytes`).

    ``client_micro_batch=M``: every client pass (clean and perturbed) runs the batch ``M`` rows at a
    time and assembles the activation in one preallocated output (:mod:`hosl.optim.micro_batch`).
    ``client_fn`` then takes the rows to run, ``client_fn(rows: slice)``, and :meth:`step` needs
    ``batch_size=B``; ``None`` (default) keeps the whole batch and the zero-argument ``client_fn()``.

    ``query_batch=D`` (or ``"auto"``, sized by ``query_memory_budget`` bytes): ``D`` perturbed points
    per client forward over a ``D x B`` batch (:mod:`hosl.forward.batched`). ``client_fn`` is
    unchanged: the optimizer repeats the client module's batch inputs itself; ``server_loss_fn``
    receives the ``D`` activations stacked (``D*B`` rows) and returns ``[D]`` losses, as with
    ``server_batch``. Default 1: one point per forward (the client's memory floor).

    ``server_estimate="linear"`` replaces the server's perturbed forwards by ``<dL/dh, h+ - h->/2eps``
    with ``dL/dh`` from the clean backward (:mod:`hosl.optim.linear_estimate`); ``linear_on`` says
    who computes the dot products (``"server"``, or ``"client"``, which then holds ``dL/dh``).

    The options are the keywords of :class:`~hosl.optim.config.ZOConfig` that apply to this
    optimizer (the signature lists them with their defaults, ``ZOConfig()``'s), or
    ``config=ZOConfig(...)``; keywords given with a config override its fields. They end up in
    ``self.config`` (validated there).
    """

    config_kind = "hybrid"
    server_batch = config_attribute("server_batch")
    server_estimate = config_attribute("server_estimate")
    linear_on = config_attribute("linear_on")
    # settable: the training loop's --client-memory-budget picks it after construction
    client_micro_batch = config_attribute("client_micro_batch", settable=True)
    server_grad = config_attribute("server_grad")
    client_update = config_attribute("client_update")

    def __init__(
        self,
        client: nn.Module,
        server_optimizer: torch.optim.Optimizer | None,
        *,
        config: ZOConfig | None = None,
        server: nn.Module | None = None,
        **options,
    ):
        config = ZOConfig.of_optimizer(self.config_kind, config, options)
        if server_optimizer is not None and not isinstance(server_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"server_optimizer must be a torch.optim.Optimizer or None, got {type(server_optimizer).__name__}"
            )
        super().__init__([client], config)
        self._probe: ForwardProbe | None = None
        self.client = client
        self.server_optimizer = server_optimizer
        self.last_client_fn = None  # the step's (wrapped) client_fn: its ``slicings`` when micro-batched
        hygiene.check_server_optimizer(server_optimizer, client, server)
        self._server_grads = hygiene.ServerGrads(server_optimizer)
        self.skipped_server_steps = 0  # server steps skipped for a non-finite clean loss or gradient
        # defer_update: step() leaves the client's update in pending_update (seeds, grads) instead of
        # applying it; the caller applies it, with others', through apply_update (a fleet's shared
        # client model, hosl/training/fleet_client.py). Empty lists: no update this step.
        self.defer_update = False
        self.pending_update: tuple[list[int], list[float]] = ([], [])

    def _clean_probe(self):
        """Around the clean forward: measures one copy's working set when ``query_batch`` needs it."""
        if self.query_batch == 1 or (self.query_batch != "auto" and self.query_memory_budget is None):
            self._probe = None
            return contextlib.nullcontext()
        self._probe = ForwardProbe([self.client])
        return self._probe

    def _perturbed_activations(self, client_fn, points):
        """``(chunk, h)`` for the perturbed points: one point per client forward, or with
        ``query_batch`` ``D`` points per forward (``h`` holds the chunk's copies stacked along dim 0)."""
        if self.query_batch == 1:
            for seed, sign in points:
                with self.perturbed(seed, sign):
                    yield [(seed, sign)], client_fn().detach()
            return
        d = self.query_batch_for(self._probe.per_copy_bytes() if self._probe else 0, len(points))
        for start in range(0, len(points), d):
            chunk = points[start : start + d]
            with self.batched(chunk):
                h = client_fn().detach()
            if not any(p.root_calls for p in self.batch_perturbers) or h.shape[0] % len(chunk):
                raise RuntimeError(
                    f"with query_batch={self.query_batch!r}, client_fn must run the client module (the optimizer "
                    f"repeats its batch inputs {len(chunk)} times) and return one activation row per input row; "
                    f"got {h.shape[0]} rows for {len(chunk)} copies"
                )
            yield chunk, h

    def _perturbed_losses(self, client_fn, server_loss_fn, points) -> list[float]:
        if self.query_batch != 1:
            return self._batched_losses(client_fn, server_loss_fn, points)
        losses: list[float] = []
        for start in range(0, len(points), self.server_batch):
            chunk = points[start : start + self.server_batch]
            activations = []
            for seed, sign in chunk:
                with self.perturbed(seed, sign):
                    activations.append(client_fn().detach())
            with torch.no_grad():
                out = server_loss_fn(activations[0] if len(chunk) == 1 else torch.cat(activations, dim=0))
            losses.extend(batch_losses(out, len(chunk), "server_loss_fn", f"server_batch={self.server_batch}"))
            del activations
        return losses

    def _batched_losses(self, client_fn, server_loss_fn, points) -> list[float]:
        """``query_batch``: each chunk's ``D`` activations go to the server as one batch of copies."""
        losses: list[float] = []
        for chunk, h in self._perturbed_activations(client_fn, points):
            with torch.no_grad():
                out = server_loss_fn(h)
            losses.extend(batch_losses(out, len(chunk), "server_loss_fn", f"query_batch={self.query_batch!r}"))
        return losses

    def _linear_server(self, h: torch.Tensor, server_loss_fn) -> LE.LinearServer:
        """Where ``dL/dh`` lives: on ``h`` (in-process) or behind the split protocol's server."""
        if h.grad is not None:
            return LE.LocalLinearServer(h.grad)
        remote = getattr(server_loss_fn, "linear_server", None)
        if remote is not None:
            return remote()
        if self.server_optimizer is not None:
            self.server_optimizer.zero_grad(set_to_none=True)
        raise ValueError(LE.NO_GRADIENT)

    def _linear_grads(self, client_fn, server: LE.LinearServer, h0: torch.Tensor, points) -> list[float]:
        """``g_q`` from the activation differences and ``dL/dh`` (:mod:`hosl.optim.linear_estimate`)."""
        eps = self.param_groups[0]["eps"]
        if self.linear_on == "client":
            g = server.activation_grad()
            dots = lambda deltas: LE.dot_per_copy(g, deltas)  # noqa: E731
        else:
            dots = server.directional
        central = self.difference == "central"
        rows, pending, out = h0.shape[0], {}, []
        for chunk, h in self._perturbed_activations(client_fn, points):
            deltas = []
            for i, (seed, sign) in enumerate(chunk):
                hi = h[i * rows : (i + 1) * rows].float()
                if not central:
                    deltas.append(hi - h0.float())
                elif sign > 0:
                    pending[seed] = hi
                else:
                    deltas.append(pending.pop(seed) - hi)
            if deltas:
                out += dots(torch.cat(deltas, dim=0))
        return [v / (2 * eps if central else eps) for v in out]

    def step(  # type: ignore[override]  # a HOSL step's own arguments
        self,
        client_fn: Callable[[], torch.Tensor],
        server_loss_fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int | None = None,
        perturbed_loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        """One HOSL step; returns the clean loss (detached). ``batch_size``: with ``client_micro_batch``.

        ``server_loss_fn(h)`` is called once, at the clean point, with grad enabled (also when
        ``step`` runs under ``torch.no_grad()``); the perturbed activations go to
        ``perturbed_loss_fn`` (under ``no_grad``; default: ``server_loss_fn``). If anything raises,
        the client's weights, the server's gradients and the seed stream are as the step found them.
        """
        with self.seed_stream_kept_on_error(), self._server_grads.kept_on_error():
            return self._step(
                client_fn, server_loss_fn, batch_size=batch_size, perturbed_loss_fn=perturbed_loss_fn or server_loss_fn
            )

    def _server_step(self, clean: float) -> None:
        """The server optimizer's step, skipped (and counted) for a non-finite clean loss or gradient."""
        if self.server_optimizer is None:
            return
        self._server_grads.merge()
        if F.all_finite([clean]) and self._server_grads.finite():
            self.server_optimizer.step()
        else:
            self.skipped_server_steps += 1
        self.server_optimizer.zero_grad(set_to_none=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Both halves: the client's parameters and the server optimizer's."""
        super().zero_grad(set_to_none)
        if self.server_optimizer is not None:
            self.server_optimizer.zero_grad(set_to_none)

    def _step(self, client_fn, server_loss_fn, *, batch_size, perturbed_loss_fn):
        call_checked(client_fn, "client_fn")
        client_fn = self.last_client_fn = wrap_client_fn(client_fn, self.client_micro_batch, batch_size)
        client_fn = hygiene.ActivationCheck(client_fn, batched=self.query_batch != 1)
        call_checked(server_loss_fn, "server_loss_fn")
        call_checked(perturbed_loss_fn, "perturbed_loss_fn")
        if self.server_grad != "clean" or self.client_update != "joint":
            return self._step_by_direction(client_fn, server_loss_fn, perturbed_loss_fn)
        with torch.no_grad(), self._clean_probe():
            h0 = client_fn()
        linear = self.server_estimate == "linear"  # keep dL/dh at the clean point
        h0 = h0.detach().requires_grad_(True) if linear else h0.detach()
        with torch.enable_grad():  # the server's clean pass back-propagates even when step runs under no_grad
            loss0 = scalar_loss(server_loss_fn(h0), "server_loss_fn")
            clean = float(loss0.detach())
            if loss0.requires_grad and torch.isfinite(loss0):
                loss0.backward()
                if self.steps_taken == 0:  # without server=, the first step shows what the optimizer holds
                    hygiene.check_server_grads(self.server_optimizer)
        server = self._linear_server(h0, server_loss_fn) if linear and math.isfinite(clean) else None
        if not linear:
            del h0  # the clean activation is not needed again: free it before the perturbed passes

        seeds = F.draw_seeds(self.generator, self.num_queries)
        self.begin_directions(seeds)
        if linear:
            losses = []
            grads = (
                [math.nan] * len(seeds)
                if server is None  # a non-finite clean loss: the update is skipped
                else self._linear_grads(client_fn, server, h0.detach(), self.points(seeds))
            )
            del h0, server
        else:
            losses = self._perturbed_losses(client_fn, perturbed_loss_fn, self.points(seeds))
            grads = self.estimate(losses, clean)
        self.last_seeds, self.last_projected_grads = seeds, grads
        self._server_step(clean)  # before the client's update: a raising server step leaves the client as it was
        self.pending_update = ([], [])
        if F.all_finite([clean, *losses, *grads]):
            if self.defer_update:
                self.pending_update = (list(seeds), list(grads))
            else:
                self.apply_update(seeds, grads)  # checks the update keeps every weight finite (else skips, counted)
        else:
            self.skipped_updates += 1
        self.steps_taken += 1
        return loss0.detach()

    def _step_by_direction(self, client_fn, server_loss_fn, perturbed_loss_fn):
        """The authors' step, one direction at a time (``docs/paper_settings.md``).
        ``server_grad="perturbed"``: the clean pass gives the loss only; the server back-propagates
        its loss at each direction's ``+eps z`` activation with weight ``1/Q`` (``server_loss_fn``'s
        ``weighted_backward(h, w)`` where it has one: a server behind the split protocol).
        ``client_update="per-direction"``: after each direction's two passes the client takes a
        ZO-SGD step of ``lr/Q`` times that direction's estimate, so the next direction is evaluated
        at the updated weights."""
        perturbed_server = self.server_grad == "perturbed"
        per_direction = self.client_update == "per-direction"
        if per_direction and self.defer_update:
            raise ValueError(
                "client_update='per-direction' updates the client between directions: it cannot defer "
                "its update to a fleet (defer_update)"
            )
        with torch.no_grad():
            h0 = client_fn().detach()
        if perturbed_server:
            with torch.no_grad():
                clean = float(scalar_loss(server_loss_fn(h0), "server_loss_fn"))
        else:
            with torch.enable_grad():
                loss0 = scalar_loss(server_loss_fn(h0), "server_loss_fn")
                clean = float(loss0.detach())
                if loss0.requires_grad and math.isfinite(clean):
                    loss0.backward()
            del loss0
        del h0
        backward = getattr(server_loss_fn, "weighted_backward", None) or self._weighted_backward(server_loss_fn)
        seeds = F.draw_seeds(self.generator, self.num_queries)
        weight = 1.0 / len(seeds)
        losses: list[float] = []
        grads: list[float] = []
        server_finite = math.isfinite(clean)
        for seed in seeds:
            pair = []
            for seed_, sign in self.points([seed]):
                with self.perturbed(seed_, sign):
                    h = client_fn().detach()
                if perturbed_server and sign > 0:
                    value = float(backward(h, weight))
                    server_finite = server_finite and math.isfinite(value)
                else:
                    with torch.no_grad():
                        value = float(scalar_loss(perturbed_loss_fn(h), "perturbed_loss_fn"))
                del h
                pair.append(value)
            g = self.estimate(pair, clean)
            losses += pair
            grads += g
            if per_direction:
                if F.all_finite([clean, *pair, *g]):
                    self.apply_update([seed], [g[0] / len(seeds)])
                else:
                    self.skipped_updates += 1
        self.last_seeds, self.last_projected_grads = seeds, grads
        self._server_step(clean if server_finite else math.nan)
        self.pending_update = ([], [])
        if not per_direction:
            if F.all_finite([clean, *losses, *grads]):
                if self.defer_update:
                    self.pending_update = (list(seeds), list(grads))
                else:
                    self.apply_update(seeds, grads)
            else:
                self.skipped_updates += 1
        self.steps_taken += 1
        return torch.tensor(clean)

    @staticmethod
    def _weighted_backward(server_loss_fn):
        """In-process server: its loss at ``h`` back-propagated with weight ``w``; returns the loss."""

        def backward(h: torch.Tensor, w: float) -> float:
            with torch.enable_grad():
                loss = scalar_loss(server_loss_fn(h), "server_loss_fn")
                value = float(loss.detach())
                if loss.requires_grad and math.isfinite(value):
                    (loss * w).backward()
            return value

        return backward

    def state_dict(self):
        state = super().state_dict()
        state["hosl"]["skipped_server_steps"] = self.skipped_server_steps
        if self.server_optimizer is not None:
            state["hosl"]["server_optimizer"] = self.server_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        server_state = state_dict.get("hosl", {}).get("server_optimizer")
        super().load_state_dict(state_dict)
        self.skipped_server_steps = state_dict["hosl"].get("skipped_server_steps", 0)
        if self.server_optimizer is not None:
            if server_state is None:
                raise ValueError("state_dict has no server optimizer state but this optimizer has a server optimizer")
            self.server_optimizer.load_state_dict(server_state)


HybridOrderOptimizer.__init__.__signature__ = optimizer_signature(HybridOrderOptimizer.__init__, "hybrid")  # type: ignore[attr-defined]  # what help() shows
