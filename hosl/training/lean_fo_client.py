"""The FO-SL client's step, plain or as lean as a careful user would make it (``--mode fo-sl``).

* plain: one forward with autograd over the batch, ``h.backward(dL/dh)``, one ``SGD.step()``.
* ``micro_batch=M`` (``--client-micro-batch``): the activation the server needs is assembled from
  slices of ``M`` rows run without autograd; once the server has returned ``dL/dh``, each slice runs
  again with autograd and back-propagates its rows of ``dL/dh`` (gradients accumulate), then one
  step. Only one slice's graph is alive at a time, for one extra forward without autograd. The loss
  is a mean over rows, so a row's ``dL/dh`` depends on that row alone: the update is the plain one up
  to the summation order of the slices' gradients. Each slice's dropout masks are replayed (the RNG
  state is saved before its first run and restored for its second).
* ``checkpointing`` (``--client-checkpointing``): every client block runs under
  ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved): autograd keeps each block's input
  and recomputes the block's insides during backward. Same update, bit for bit.
* ``fused_step`` (``--client-fused-step``): each parameter's SGD update runs in a
  post-accumulate-grad hook as soon as its gradient is complete, and the gradient is freed there
  (as LOMO does), so the full set of gradients is never held at once (with ``micro_batch``, the
  gradients accumulate over the slices and the hooks update during the last slice's backward).
  The update is ``torch.optim.SGD``'s (momentum, weight decay; its state and learning rates, so
  checkpoints and ``--lr-schedule`` work unchanged); dampening, Nesterov and ``maximize`` are refused.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# backprop(h) -> (loss, dL/dh): the server's side of an FO-SL step
Backprop = Callable[[torch.Tensor], "tuple[float, torch.Tensor]"]


class FusedSGDStep:
    """``optimizer``'s SGD update applied per parameter inside backward, the gradient freed at once.

    Updates happen only while :meth:`armed` is active; outside it the hooks leave gradients alone."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if type(optimizer) is not torch.optim.SGD:
            raise ValueError(
                f"--client-fused-step applies plain SGD (with momentum) inside backward; "
                f"got a {type(optimizer).__name__}"
            )
        for group in optimizer.param_groups:
            for key, plain in (("dampening", 0), ("nesterov", False), ("maximize", False)):
                if group.get(key, plain) != plain:
                    raise ValueError(
                        f"--client-fused-step applies SGD without {key}; the optimizer has {key}={group[key]!r}"
                    )
        self.optimizer = optimizer
        self._armed = False
        self._group = {p: group for group in optimizer.param_groups for p in group["params"]}
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for p in self._group]

    @contextlib.contextmanager
    def armed(self):
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        """torch.optim.SGD's single-tensor update of ``p`` (same operations, same order)."""
        if not self._armed or p.grad is None:
            return
        group = self._group[p]
        grad = p.grad
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        if group["momentum"] != 0:
            state = self.optimizer.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(grad).detach()
            else:
                buf.mul_(group["momentum"]).add_(grad)
            grad = buf
        p.add_(grad, alpha=-group["lr"])
        p.grad = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def checkpoint_blocks(client: nn.Module) -> int:
    """Run each of ``client.layers`` (the split client's blocks) under ``torch.utils.checkpoint``;
    returns how many blocks were wrapped. Parameter names and weights are unchanged."""
    layers = getattr(client, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"--client-checkpointing needs a split client with its blocks in .layers; {type(client).__name__} has none"
        )
    for block in layers:
        if getattr(block, "_hosl_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

        block.forward = forward
        block._hosl_checkpointed = True  # type: ignore[assignment]  # a marker attribute on the module
    return len(layers)


def _rng_state(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class LeanFOClient:
    """One FO-SL client step over ``client`` with ``optimizer`` (a ``torch.optim.SGD``), with the
    options of the module docstring."""

    def __init__(
        self,
        client: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batch: int | None = None,
        checkpointing: bool = False,
        fused_step: bool = False,
    ):
        if micro_batch is not None and (
            isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1
        ):
            raise ValueError(f"--client-micro-batch must be an integer >= 1, got {micro_batch!r}")
        self.client, self.optimizer, self.micro_batch = client, optimizer, micro_batch
        if checkpointing:
            checkpoint_blocks(client)
        self.fused = FusedSGDStep(optimizer) if fused_step else None

    def step(
        self,
        client_fn: Callable[[slice], torch.Tensor],
        batch_size: int,
        backprop: Backprop,
        measure=contextlib.nullcontext,
    ) -> float:
        """``client_fn(rows)`` runs the client on those rows of the batch (``batch_size`` rows);
        ``backprop(h)`` is the server's answer; ``measure()`` wraps the (first) forward with autograd."""
        m = self.micro_batch
        if m is None or m >= batch_size:
            with measure():
                h = client_fn(slice(0, batch_size))
            loss, grad = backprop(h)
            if math.isfinite(loss):
                self._backward([(h, grad.to(h.device))])
            return loss
        device = next(self.client.parameters()).device
        slices = [slice(start, min(start + m, batch_size)) for start in range(0, batch_size, m)]
        states, parts = [], []
        with torch.no_grad():
            for rows in slices:
                states.append(_rng_state(device))
                parts.append(client_fn(rows))
        after = _rng_state(device)
        h = torch.cat(parts) if len(parts) > 1 else parts[0]
        del parts
        loss, grad = backprop(h)
        del h  # the server has its copy
        if math.isfinite(loss):
            grad = grad.to(device)

            def rerun():
                for i, (rows, state) in enumerate(zip(slices, states)):
                    _set_rng_state(state, device)
                    with measure() if i == 0 else contextlib.nullcontext():
                        h_rows = client_fn(rows)
                    yield h_rows, grad[rows]

            self._backward(rerun(), count=len(slices))
        _set_rng_state(after, device)
        return loss

    def _backward(self, pairs, count: int = 1) -> None:
        """Back-propagate each (activation, dL/dactivation); then the step (fused: during the last backward)."""
        for i, (h, g) in enumerate(pairs):
            last = i == count - 1
            with self.fused.armed() if self.fused is not None and last else contextlib.nullcontext():
                h.backward(g)
            del h, g
        if self.fused is None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
