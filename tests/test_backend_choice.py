"""Which backend runs a perturbed linear on CUDA (hosl.ops.dispatch.perturbed_linear_backend): a pure
function of rows, device and available backends, checked on CPU, and FusedPerturber's use of it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hosl.ops
from hosl.ops import dispatch
from hosl.forward.fused import FusedPerturber
from hosl.forward.layout import ParameterLayout
from hosl.forward.scratch import ModuleScratchPerturber

ROWS = dispatch.FUSED_LINEAR_MAX_ROWS


@pytest.mark.parametrize("rows", [1, ROWS // 2, ROWS])
def test_few_rows_on_cuda_stay_fused(rows):
    assert dispatch.perturbed_linear_backend(rows, "cuda", "triton", available=["triton", "cuda"]) == "triton"


@pytest.mark.parametrize("rows", [ROWS + 1, 2048])
def test_many_rows_on_cuda_materialise_through_the_cuda_backend(rows):
    assert dispatch.perturbed_linear_backend(rows, "cuda:0", "triton", available=["triton", "cuda"]) == "cuda"
    # without the CUDA kernels the fused kernel is still what runs
    assert dispatch.perturbed_linear_backend(rows, torch.device("cuda"), "triton", available=["triton"]) == "triton"


@pytest.mark.parametrize("asked", [None, "cuda", "reference", "cpu"])
def test_other_requests_are_kept(asked):
    assert dispatch.perturbed_linear_backend(4096, "cuda", asked, available=["triton", "cuda"]) == asked


def test_cpu_tensors_keep_what_was_asked():
    """On CPU "triton" is the interpreter (tests): never swapped."""
    assert dispatch.perturbed_linear_backend(4096, "cpu", "triton", available=["cpu", "triton"]) == "triton"


def test_fused_perturber_asks_per_call_with_the_rows_per_direction(monkeypatch):
    """FusedPerturber's linear forward passes the rows of its input (batch x tokens) to the choice and
    runs the backend it returns."""
    seen = []

    def choose(rows, device, asked, available=None):
        seen.append((rows, torch.device(device).type, asked))
        return "reference"

    monkeypatch.setattr(hosl.ops, "perturbed_linear_backend", choose)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    fused = FusedPerturber(model, ParameterLayout(model), fused_backend="triton")
    x = torch.randn(3, 5, 8)
    with fused.perturbed(seed=11, scale=0.5):
        y = model(x)
    assert seen == [(15, "cpu", "triton"), (15, "cpu", "triton")]
    # and it is the perturbed forward: what the scratch path (perturb_ each module, then run it) gives
    with ModuleScratchPerturber(model, ParameterLayout(model)).perturbed(seed=11, scale=0.5):
        want = model(x)
    torch.testing.assert_close(y, want)
    assert (y - model(x)).abs().max() > 0.1


def test_batched_perturber_asks_per_call_with_the_rows_per_direction(monkeypatch):
    """BatchedPerturber (query_batch=D) passes the rows of ONE direction's input to the choice (not the
    D x rows of the stacked batch) and runs the backend it returns."""
    from hosl.forward.batched import BatchedPerturber

    seen = []

    def choose(rows, device, asked, available=None):
        seen.append((rows, torch.device(device).type, asked))
        return "reference"

    monkeypatch.setattr(hosl.ops, "perturbed_linear_backend", choose)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    batched = BatchedPerturber(model, ParameterLayout(model), fused_backend="triton")
    x = torch.randn(3, 5, 8)
    points = [(11, 0.5), (12, -0.5)]
    with batched.perturbed(points):
        y = model(x)
    assert seen == [(15, "cpu", "triton"), (15, "cpu", "triton")]
    for d, (seed, scale) in enumerate(points):  # copy d is the forward at w + scale * z(seed)
        with ModuleScratchPerturber(model, ParameterLayout(model)).perturbed(seed=seed, scale=scale):
            torch.testing.assert_close(y[3 * d:3 * (d + 1)], model(x))
