"""The linearised server estimate (``server_estimate="linear"``).

The exact HOSL estimate runs the server at every perturbed activation: ``g_q = (L(h+) - L(h-)) / 2eps``.
The linear one uses ``g = dL/dh`` from the server's clean backward instead and takes the directional
derivative through the server's first-order model:

    g_q = <g, h(w + eps z) - h(w - eps z)> / (2 eps)      (central)
    g_q = <g, h(w + eps z) - h(w)> / eps                  (forward)

so the server runs one forward and one backward per step, whatever ``Q``. The two agree as ``eps``
shrinks (the server's loss is smooth in ``h``); they differ by the server's curvature along ``h+ - h-``.

Who computes the ``Q`` dot products (``linear_on``):

* ``"server"`` (default): the client sends the activation differences ``h+ - h-`` up (``Q + 1``
  activations per step instead of ``2Q + 1``); ``g`` never leaves the server.
* ``"client"``: the server sends ``g`` down once and the client computes the scalars (one activation
  up, one down per step: FO-SL's traffic, without a client backward). The client then holds an
  activation gradient, which carries information about the labels (see docs/optimizer.md).

A server is anything with :meth:`LinearServer.activation_grad` and :meth:`LinearServer.directional`:
:class:`LocalLinearServer` in one process (``g`` is the clean activation's ``.grad``), or the split
protocol's remote one (``hosl/training/server_proxy.py``).
"""

from __future__ import annotations

from typing import Protocol

import torch

SERVER_ESTIMATES = ("exact", "linear")
LINEAR_PLACEMENTS = ("server", "client")


def dot_per_copy(g: torch.Tensor, deltas: torch.Tensor) -> list[float]:
    """``<g, deltas[c]>`` for each of the ``deltas.shape[0] // g.shape[0]`` copies stacked along dim 0,
    accumulated in float64 (the differences are small; their sum should not lose bits to it)."""
    rows = g.shape[0]
    if deltas.shape[0] % rows or tuple(deltas.shape[1:]) != tuple(g.shape[1:]):
        raise ValueError(
            f"activation differences of shape {tuple(deltas.shape)} are not copies of the "
            f"activation gradient's shape {tuple(g.shape)}"
        )
    d = deltas.reshape(deltas.shape[0] // rows, -1).double()
    return (d @ g.reshape(-1).double().to(d.device)).tolist()


class LinearServer(Protocol):
    def activation_grad(self) -> torch.Tensor:
        """``dL/dh`` at the clean point (the client-placement's one download)."""

    def directional(self, deltas: torch.Tensor) -> list[float]:
        """``<g, delta_c>`` for each copy ``c`` of activation differences stacked along dim 0."""


class LocalLinearServer:
    """The server in this process: ``g`` is the gradient its clean backward left on the activation."""

    def __init__(self, grad: torch.Tensor):
        self.grad = grad.detach()

    def activation_grad(self) -> torch.Tensor:
        return self.grad

    def directional(self, deltas: torch.Tensor) -> list[float]:
        return dot_per_copy(self.grad, deltas)


NO_GRADIENT = (
    "server_estimate='linear' needs dL/dh, the gradient of the server's clean loss with respect "
    "to the activation, and server_loss_fn's loss has none (a frozen server, or a loss computed "
    "without grad); use server_estimate='exact'"
)
