"""The direction kernels under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

The same cases as ``benchmarks/direction_kernels.py`` (Gaussian directions), on a smaller parameter list
(8 tensors of 512K float32 elements, 4M in all) so the whole file runs in well under a minute:
``hosl.ops`` on the CPU backend, MeZO-style ``torch.manual_seed`` + ``torch.normal`` + ``add_`` per
tensor, and the memory roof (``add_`` of two tensors of the same sizes). Single-threaded, like
``direction_kernels.py``. Compare the groups' means (pytest-benchmark prints them side by side per group).

Not part of the test suite: ``pyproject.toml`` sets ``testpaths = ["tests"]``, so a plain ``pytest``
never collects this folder, and nothing here asserts on timings.
"""

from __future__ import annotations

import pytest
import torch

NUMEL, TENSORS = 1 << 19, 8
SEED, SCALE, LR = 2**63 + 12345, 1e-3, 1e-6
SEEDS = [SEED + q for q in range(10)]
COEFFS = [0.5 * (-1) ** q for q in range(10)]

pytest.importorskip("pytest_benchmark")
ops = pytest.importorskip("hosl.ops")
if "cpu" not in ops.available_backends():
    pytest.skip("the C++ CPU backend is not built", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(NUMEL, generator=g) * 0.05 for _ in range(TENSORS)]
    others = [torch.randn(NUMEL, generator=g) for _ in range(TENSORS)]
    outs = [torch.empty_like(w) for w in weights]
    return weights, others, outs


def _mezo_pass(weights, seed, alpha, outs=None):
    torch.manual_seed(seed)
    for i, w in enumerate(weights):
        z = torch.normal(mean=0.0, std=1.0, size=w.size(), dtype=w.dtype)
        if outs is None:
            w.add_(z, alpha=alpha)
        else:
            torch.add(w, z, alpha=alpha, out=outs[i])


def _roof(weights, others, outs=None):
    for i, (w, o) in enumerate(zip(weights, others)):
        if outs is None:
            w.add_(o)
        else:
            torch.add(w, o, out=outs[i])


# -- perturb in place ------------------------------------------------------------------------------
@pytest.mark.benchmark(group="perturb")
def test_perturb_hosl(benchmark, tensors):
    weights, _, _ = tensors
    benchmark(ops.perturb_, weights, SEED, SCALE, backend="cpu")


@pytest.mark.benchmark(group="perturb")
def test_perturb_mezo(benchmark, tensors):
    benchmark(_mezo_pass, tensors[0], SEED, SCALE)


@pytest.mark.benchmark(group="perturb")
def test_perturb_roof(benchmark, tensors):
    benchmark(_roof, tensors[0], tensors[1])


# -- perturb into scratch ----------------------------------------------------------------------------
@pytest.mark.benchmark(group="perturb_out")
def test_perturb_out_hosl(benchmark, tensors):
    weights, _, outs = tensors
    benchmark(ops.perturb_, weights, SEED, SCALE, out=outs, backend="cpu")


@pytest.mark.benchmark(group="perturb_out")
def test_perturb_out_mezo(benchmark, tensors):
    benchmark(_mezo_pass, tensors[0], SEED, SCALE, tensors[2])


@pytest.mark.benchmark(group="perturb_out")
def test_perturb_out_roof(benchmark, tensors):
    benchmark(_roof, tensors[0], tensors[1], tensors[2])


# -- the update over Q directions --------------------------------------------------------------------
@pytest.mark.parametrize("q", [1, 10])
def test_update_hosl(benchmark, tensors, q):
    benchmark.group = f"update_q{q}"
    benchmark(ops.zo_update_, tensors[0], SEEDS[:q], COEFFS[:q], lr=LR, backend="cpu")


@pytest.mark.parametrize("q", [1, 10])
def test_update_mezo(benchmark, tensors, q):
    benchmark.group = f"update_q{q}"

    def run():  # MeZO regenerates z per direction: Q passes over the weights
        for s, c in zip(SEEDS[:q], COEFFS[:q]):
            _mezo_pass(tensors[0], s, -LR * c)
    benchmark(run)


@pytest.mark.parametrize("q", [1, 10])
def test_update_roof(benchmark, tensors, q):
    benchmark.group = f"update_q{q}"
    benchmark(_roof, tensors[0], tensors[1])
