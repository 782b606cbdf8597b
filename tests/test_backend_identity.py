"""Every backend on every device it runs on gives the reference's bits; the fused forward runs on CUDA.

``cpu == cuda == triton == reference``: for each (backend, device) available here -- on a CPU machine
the C++ backend and the Triton interpreter, on a GPU also the CUDA kernels, Triton compiled and the
reference on CUDA tensors -- ``randn``, ``perturb_`` (in place and into ``out``) and ``zo_update_``
(Q=3, with weight decay) through the public ops, for every direction family and float dtype, are
compared bit for bit with the reference backend on CPU tensors.

The CUDA-only tests (``requires_gpu``) put tiny OPT / Llama clients on the GPU: the fused perturbed
forward (Triton kernels) against the scratch path there, weights bit-exact afterwards, and an
optimizer step on the GPU against the same step on CPU. Their CPU counterparts are in
``test_fused_forward.py``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import requires_gpu

import hosl
from hosl import ops

FAMILIES = ["gaussian", "rademacher", "sphere"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 5, 1000, 4099]  # a scalar, a tail, several programs of the default launch (interpreter: few)


def _cases() -> list[tuple[str, str]]:
    out = []
    for name in ops.available_backends():
        module = importlib.import_module(f"hosl.ops.backends.{name}")
        for device in module.DEVICE_TYPES:
            if device == "cuda" and not torch.cuda.is_available():
                continue
            if name == "reference" and device == "cpu":
                continue  # the thing compared against
            out.append((name, device))
    return out


CASES = _cases()


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    differ = int((_bits(got) != _bits(want)).sum())
    assert differ == 0, f"{what}: {differ} of {want.numel()} elements differ from the reference"


def _weights(dtype, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 0.05).to(dtype) for n in SIZES]


def test_there_is_something_to_compare():
    assert CASES, f"no backend besides the reference on CPU; available: {ops.available_backends()}"


@pytest.mark.parametrize("backend,device", CASES, ids=[f"{b}-{d}" for b, d in CASES])
@pytest.mark.parametrize("family", FAMILIES)
def test_randn_matches_reference(backend, device, family):
    seed, numel, offset = 2**64 - 3, 4099, 2**33 + 5
    want = ops.randn(seed, numel, offset, family=family, backend="reference")
    got = ops.randn(seed, numel, offset, family=family, device=device, backend=backend)
    assert got.device.type == device
    _assert_same_bits(got, want, f"randn {backend} on {device}")


@pytest.mark.parametrize("backend,device", CASES, ids=[f"{b}-{d}" for b, d in CASES])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_and_update_match_reference(backend, device, family, dtype):
    seed, scale, offset = 0x0123456789ABCDEF, -1e-2, 2**32 - 7
    seeds, coeffs = [5, 2**64 - 1, 77], [0.5, -1.25, 2.0]
    weights = _weights(dtype)

    want_out = [torch.empty_like(w) for w in weights]
    ops.perturb_(weights, seed, scale, out=want_out, offset=offset, family=family, backend="reference")
    want_upd = [w.clone() for w in weights]
    ops.zo_update_(want_upd, seeds, coeffs, lr=1e-2, weight_decay=0.1, offset=offset, family=family,
                   backend="reference")

    on_dev = [w.to(device, copy=True) for w in weights]
    outs = [torch.empty_like(w) for w in on_dev]
    ops.perturb_(on_dev, seed, scale, out=outs, offset=offset, family=family, backend=backend)
    for j, (o, w) in enumerate(zip(outs, want_out)):
        _assert_same_bits(o, w, f"perturb_ into out, tensor {j}")
    for j, (d, w) in enumerate(zip(on_dev, weights)):
        _assert_same_bits(d, w, f"perturb_ into out left tensor {j} written")
    ops.perturb_(on_dev, seed, scale, offset=offset, family=family, backend=backend)
    for j, (d, w) in enumerate(zip(on_dev, want_out)):
        _assert_same_bits(d, w, f"perturb_ in place, tensor {j}")

    upd = [w.to(device, copy=True) for w in weights]
    ops.zo_update_(upd, seeds, coeffs, lr=1e-2, weight_decay=0.1, offset=offset, family=family, backend=backend)
    for j, (u, w) in enumerate(zip(upd, want_upd)):
        _assert_same_bits(u, w, f"zo_update_, tensor {j}")


# ------------------------------------------------------------------------------------------------
# On a GPU: the fused perturbed forward with CUDA tensors
# ------------------------------------------------------------------------------------------------
def _client_on(name: str, device: str):
    from hosl.models import load_model, split

    model, _ = load_model(name, "causal_lm")
    client, server = split(model.to(device), cut=2)
    client.eval()
    server.eval()
    return client, server


def _batch(device: str):
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids.to(device), mask.to(device)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_fused_forward_on_cuda_equals_scratch_and_keeps_weights(name):
    from hosl.forward.fused import FusedPerturber
    from hosl.forward.layout import ParameterLayout
    from hosl.forward.scratch import ModuleScratchPerturber

    if "triton" not in ops.available_backends():
        pytest.skip("the Triton backend is not available")
    client, _ = _client_on(name, "cuda")
    layout = ParameterLayout(client)
    fused = FusedPerturber(client, layout)
    assert fused.fused_backend == "triton", fused.fused_backend
    scratch = ModuleScratchPerturber(client, layout)
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    ids, mask = _batch("cuda")
    clean = client(ids, mask)
    for seed, scale in ((11, 1e-2), (2**64 - 5, -1e-2)):
        with fused.perturbed(seed, scale):
            got = client(ids, mask)
        with scratch.perturbed(seed, scale):
            want = client(ids, mask)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (got - clean).abs().max() > 1e-3  # the perturbation was applied
    for n, p in client.named_parameters():
        _assert_same_bits(p, before[n], f"{n} after the perturbed forwards")


@requires_gpu
@pytest.mark.gpu
def test_optimizer_step_on_cuda_matches_cpu():
    """One HOSL step (Q=2, lr 0 then a real lr) on the GPU gives the CPU step's projected gradients
    within matmul tolerance, and with lr=0 leaves the weights bit-exact."""
    results = {}
    for device in ("cpu", "cuda"):
        client, server = _client_on("tiny-llama", device)
        ids, mask = _batch(device)
        target = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)

        def server_loss(h):
            logits = server(h, mask)
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

        before = {n: p.detach().clone() for n, p in client.named_parameters()}
        opt = hosl.HybridOrderOptimizer(client, None, lr=0.0, eps=1e-2, num_queries=2, seed=3)
        opt.step(lambda: client(ids, mask), server_loss)
        for n, p in client.named_parameters():
            _assert_same_bits(p, before[n], f"{device}: {n} after an lr=0 step")
        results[device] = torch.tensor(opt.last_projected_grads)
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-2, atol=1e-3)
    assert results["cuda"].abs().max() > 1e-3
