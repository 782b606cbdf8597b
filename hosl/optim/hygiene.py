"""What keeps :class:`~hosl.optim.hybrid.HybridOrderOptimizer` behaving as a torch.optim user
expects: the server optimizer checked at construction, the activations checked within a step, and
the server's gradients kept as they were when a step raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_server_grads(server_optimizer: torch.optim.Optimizer | None) -> None:
    """After the first clean backward: refuse a server optimizer none of whose parameters got a
    gradient from ``server_loss_fn``'s loss (it holds another module's parameters and would never
    train the server; ``server=`` at construction catches this before any step)."""
    if server_optimizer is None:
        return
    params = optimizer_params(server_optimizer)
    if params and all(p.grad is None for p in params):
        raise ValueError(
            f"none of server_optimizer's {len(params)} parameters got a gradient from server_loss_fn's loss: "
            "it holds parameters of another module, not the server's, and would never train it (pass server= "
            "to check this when the optimizer is built)"
        )


def check_server_optimizer(
    server_optimizer: torch.optim.Optimizer | None, client: nn.Module, server: nn.Module | None = None
) -> None:
    """Refuse a server optimizer that holds any of the client's parameters (by identity or shared
    storage). The optimizer cannot know the server module unless given it: with ``server``, every
    parameter must be one of the server's and every trainable server parameter must be in it."""
    if server_optimizer is None:
        return
    params = optimizer_params(server_optimizer)
    if not params:
        raise ValueError("server_optimizer has no parameters: it would never train the server")
    client_names = {id(p): n for n, p in client.named_parameters()}
    client_storage = {p.untyped_storage().data_ptr(): n for n, p in client.named_parameters() if p.numel()}
    for i, p in enumerate(params):
        name = client_names.get(id(p)) or (client_storage.get(p.untyped_storage().data_ptr()) if p.numel() else None)
        if name is not None:
            raise ValueError(
                f"server_optimizer holds the client's parameter {name!r} (its parameter {i}): the "
                "client is trained by this optimizer's ZO estimate, the server optimizer must hold "
                "only server parameters"
            )
    if server is None:
        return
    server_names = {id(p): n for n, p in server.named_parameters()}
    for i, p in enumerate(params):
        if id(p) not in server_names:
            raise ValueError(
                f"server_optimizer's parameter {i} (shape {tuple(p.shape)}) is not a parameter of the server module"
            )
    held = {id(p) for p in params}
    missing = [n for n, p in server.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            f"server_optimizer does not hold the server's trainable parameter {missing[0]!r}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: it would never train"
        )


class ActivationCheck:
    """``client_fn`` as the step calls it: each result must be a tensor, and every result of one
    step must have the clean activation's shape (``copies`` of its rows when the step batches
    several perturbed points into one call)."""

    def __init__(self, client_fn: Callable, batched: bool):
        self.client_fn, self.batched = client_fn, batched
        self.shape: torch.Size | None = None

    def __getattr__(self, name):  # the wrapped client_fn's attributes (micro-batching's ``slicings``)
        return getattr(self.__dict__["client_fn"], name)

    def __call__(self, *args):
        h = self.client_fn(*args)
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"client_fn must return the activation as one tensor, got {type(h).__name__}")
        if self.shape is None:
            self.shape = h.shape
        elif h.shape != self.shape and not (
            self.batched
            and h.dim() == len(self.shape)
            and h.shape[1:] == self.shape[1:]
            and self.shape[0]
            and h.shape[0] % self.shape[0] == 0
        ):
            raise ValueError(
                f"client_fn returned shape {tuple(h.shape)} within a step whose clean activation has "
                f"shape {tuple(self.shape)}: every call of one step must see the same batch"
            )
        return h


class ServerGrads:
    """The server's gradients around one step: those present when the step starts are set aside
    (so the clean backward writes fresh tensors), added back just before the server optimizer
    steps, and put back untouched if the step raises."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.params = optimizer_params(optimizer) if optimizer is not None else []
        self.stash: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def kept_on_error(self):
        self.stash = {}
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self.stash[i], p.grad = p.grad, None
        try:
            yield
        except BaseException:
            for i, p in enumerate(self.params):
                p.grad = self.stash.get(i)
            raise
        finally:
            self.stash = {}

    def merge(self) -> None:
        """Earlier gradients plus this step's, as autograd's accumulation would give (new tensors,
        so the earlier ones stay intact until the step has finished)."""
        for i, old in self.stash.items():
            p = self.params[i]
            p.grad = old.clone() if p.grad is None else old + p.grad

    def finite(self) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        # the two ends of each gradient (aminmax: one fast read; a NaN or inf shows in them)
        return bool(
            torch.isfinite(torch.stack([torch.stack(torch.aminmax(g.detach())).float().cpu() for g in grads])).all()
        )
