"""The shape of the training package (issue 19 item 4): no import circle among hosl's modules, one
class per name, each run-level check once per ``hosl train``, and a server handler that tells clean
from perturbed requests by their phase, not by the grad mode it is called under."""

import ast
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hosl.training.modes import Hyper
from hosl.training.protocol import KEEP_ACTIVATION_GRAD, Phase
from hosl.training.server_handler import ServerHandler
from hosl.transport import Kind, Message

ROOT = Path(__file__).resolve().parents[1]


# -- the server handler: clean vs perturbed by the message -----------------------------------------------

class _ToyServer(nn.Module):
    """server(h, mask) -> class logits, as the server halves of hosl/models/halves.py answer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 2)

    def forward(self, h, mask):
        return self.head((h * mask[..., None]).sum(1))


def _loss_of(logits, batch, copies):
    return nn.functional.cross_entropy(logits, batch["labels"])


def _handler() -> ServerHandler:
    handler = ServerHandler(_ToyServer(), "hosl", Hyper(), _loss_of, "classifier", train_dropout=False)
    mask = torch.ones(3, 4, dtype=torch.long)
    handler.handle(Message(Kind.REQUEST, Phase.BEGIN_STEP, 1, tensors=[mask, torch.tensor([0, 1, 1])]))
    return handler


def _h() -> torch.Tensor:
    return torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))


def _grads(handler):
    return [p.grad for p in handler.server.parameters()]


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_a_losses_request_never_back_propagates_whatever_the_grad_mode(grad_mode):
    reference = _handler().handle(Message(Kind.REQUEST, Phase.LOSSES, 1, tensors=[_h()])).floats
    handler = _handler()
    with grad_mode():
        reply = handler.handle(Message(Kind.REQUEST, Phase.LOSSES, 1, tensors=[_h()]))
    assert reply.floats == reference and math.isfinite(reply.floats[0])
    assert all(g is None for g in _grads(handler))


@pytest.mark.parametrize("grad_mode", [torch.enable_grad, torch.no_grad])
def test_a_clean_loss_request_back_propagates_whatever_the_grad_mode(grad_mode):
    """Called under no_grad (a caller's choice the server must not read), the clean point is still
    the server's first-order pass: same loss, same gradient, dL/dh kept when asked."""
    reference = _handler()
    expected = reference.handle(Message(Kind.REQUEST, Phase.CLEAN_LOSS, 1, tensors=[_h()])).floats
    handler = _handler()
    with grad_mode():
        reply = handler.handle(Message(Kind.REQUEST, Phase.CLEAN_LOSS, 1, ints=[KEEP_ACTIVATION_GRAD],
                                       tensors=[_h()]))
    assert reply.floats == expected
    for got, want in zip(_grads(handler), _grads(reference)):
        assert got is not None and torch.equal(got, want)
    assert handler.activation_grad is not None and handler.activation_grad.shape == _h().shape


def test_a_backprop_request_returns_the_activation_gradient_under_no_grad():
    handler = _handler()
    with torch.no_grad():
        reply = handler.handle(Message(Kind.REQUEST, Phase.BACKPROP, 1, tensors=[_h()]))
    assert reply.tensors[0].shape == _h().shape and all(g is not None for g in _grads(handler))
