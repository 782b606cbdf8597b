"""``hosl.ops.use_backend``: the test/benchmark override of which backend runs the ops (the public
ops' ``backend=`` keyword goes through it); never part of an op's schema."""

from __future__ import annotations

import pytest
import torch

from hosl import ops
from hosl.ops.backends import reference


@pytest.fixture
def reference_calls(monkeypatch):
    """Counts the reference backend's ``perturb`` calls."""
    calls = []
    real = reference.perturb

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(reference, "perturb", counted)
    return calls


def test_the_named_backend_runs_and_none_keeps_the_outer_choice(reference_calls):
    w = [torch.zeros(8)]
    with ops.use_backend("reference"):
        ops.perturb_(w, 1, 0.5)
        ops.perturb_(w, 1, 0.5, backend=None)
        with ops.use_backend(None):
            ops.perturb_(w, 1, 0.5)
    assert len(reference_calls) == 3
    if "cpu" in ops.available_backends():  # unnamed again: the C++ kernels, not the reference
        ops.perturb_(w, 1, 0.5)
        with ops.use_backend("reference"), ops.use_backend("cpu"):
            ops.perturb_(w, 1, 0.5)
        assert len(reference_calls) == 3


def test_an_unknown_backend_is_refused_at_entry_and_the_choice_restored(reference_calls):
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("tpu"):
            pass
    with ops.use_backend("reference"):
        with pytest.raises(RuntimeError, match="boom"):
            with ops.use_backend("reference"):
                raise RuntimeError("boom")
        ops.perturb_([torch.zeros(3)], 1, 0.5)
    assert len(reference_calls) == 1


def test_an_unavailable_backend_is_a_runtime_error(monkeypatch):
    from hosl.ops import dispatch

    monkeypatch.setattr(dispatch, "_modules", {**dispatch._modules, "cuda": None})
    monkeypatch.setattr(dispatch, "_load_errors", {**dispatch._load_errors, "cuda": "not built here"})
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: not built here"):
        ops.randn(1, 4, backend="cuda")


def test_a_backend_on_the_wrong_device_type_is_a_value_error(monkeypatch):
    monkeypatch.setattr(reference, "DEVICE_TYPES", ("cuda",))
    w = [torch.ones(4)]
    with pytest.raises(ValueError, match=r"backend 'reference' runs on \['cuda'\] tensors, not on 'cpu'"):
        ops.perturb_(w, 1, 0.5, backend="reference")
    assert torch.equal(w[0], torch.ones(4))
