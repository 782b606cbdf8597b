"""HybridOrderOptimizer and the ZO baseline on small torch models (no transformers needed)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import hosl
from hosl.directions.spec import randn_reference
from hosl.optim.functional import draw_seeds

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    client = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 12)).to(dtype)
    server = nn.Sequential(nn.ReLU(), nn.Linear(12, 1)).to(dtype)
    return client, server


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g).to(dtype)
    y = x[:, :2].sum(1, keepdim=True).float()
    return x, y


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same_bits(before, module):
    return all(torch.equal(_bits(before[n]), _bits(p.detach())) for n, p in module.named_parameters())


def _loss_fn(server, y):
    return lambda h: nn.functional.mse_loss(server(h).float(), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lr_zero_leaves_client_weights_bit_identical(dtype):
    client, server = _model(dtype)
    x, y = _data(dtype)
    before = _snapshot(client)
    opt = hosl.HybridOrderOptimizer(client, None, lr=0.0, eps=1e-2, num_queries=3)
    outputs = []
    for _ in range(3):
        opt.step(lambda: outputs.append(client(x)) or outputs[-1], _loss_fn(server, y))
    assert _same_bits(before, client)
    # ... while the perturbed passes really did see other weights
    assert not torch.equal(outputs[0], outputs[1])


def _reference_step(client, server, x, y, seeds, lr, eps, wd, server_lr):
    """The HOSL step written out slowly: explicit w + eps*z copies, then the update formula."""
    names = sorted(n for n, _ in client.named_parameters())
    params = dict(client.named_parameters())
    sizes = [params[n].numel() for n in names]
    total = sum(sizes)

    def perturbed(seed, scale):
        z = randn_reference(seed, total)
        out, start = {}, 0
        for n, size in zip(names, sizes):
            out[n] = (params[n].detach().reshape(-1) + scale * z[start : start + size]).view_as(params[n])
            start += size
        return out

    loss = nn.functional.mse_loss(server(client(x).detach()), y)
    loss.backward()
    grads = []
    with torch.no_grad():
        for s in seeds:
            lp = nn.functional.mse_loss(server(functional_call(client, perturbed(s, eps), (x,))), y)
            lm = nn.functional.mse_loss(server(functional_call(client, perturbed(s, -eps), (x,))), y)
            grads.append((lp.item() - lm.item()) / (2 * eps))
        start = 0
        for n, size in zip(names, sizes):
            p = params[n]
            est = sum(g * randn_reference(s, total)[start : start + size] for g, s in zip(grads, seeds)) / len(seeds)
            decay = wd if (p.ndim > 1 and not n.startswith("1.")) else 0.0  # module 1 is the LayerNorm
            p -= lr * (est.view_as(p) + decay * p)
            start += size
        for p in server.parameters():
            p -= server_lr * p.grad
    return loss.item(), grads


def test_one_step_equals_slow_reference():
    client, server = _model()
    ref_client, ref_server = copy.deepcopy(client), copy.deepcopy(server)
    x, y = _data()
    lr, eps, wd, server_lr, q = 0.05, 1e-2, 0.1, 0.1, 3
    opt = hosl.HybridOrderOptimizer(
        client, torch.optim.SGD(server.parameters(), lr=server_lr), lr=lr, eps=eps, num_queries=q, weight_decay=wd, seed=7
    )
    loss = opt.step(lambda: client(x), _loss_fn(server, y))
    seeds = draw_seeds(torch.Generator().manual_seed(7), q)
    assert opt.last_seeds == seeds
    ref_loss, ref_grads = _reference_step(ref_client, ref_server, x, y, seeds, lr, eps, wd, server_lr)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert opt.last_projected_grads == pytest.approx(ref_grads, rel=1e-3, abs=1e-4)
    for (n, p), (_, r) in zip(client.named_parameters(), ref_client.named_parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=n)
    for p, r in zip(server.parameters(), ref_server.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_loss_decreases_on_a_tiny_task():
    client, server = _model()
    x, y = _data()
    opt = hosl.HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=1e-2), lr=1e-2, eps=1e-3, num_queries=4)
    losses = [opt.step(lambda: client(x), _loss_fn(server, y)).item() for _ in range(60)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.slow
def test_client_really_learns_with_a_frozen_server():
    client, server = _model()
    x, y = _data()
    server.requires_grad_(False)
    before = _snapshot(client)
    opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, eps=1e-3, num_queries=8)
    losses = [opt.step(lambda: client(x), _loss_fn(server, y)).item() for _ in range(60)]
    assert losses[-1] < losses[0]
    assert not _same_bits(before, client)


def _train(client, server, opt, x, y, steps):
    return [opt.step(lambda: client(x), _loss_fn(server, y)).item() for _ in range(steps)]


def test_resume_continues_identically():
    x, y = _data()
    c1, s1 = _model()
    o1 = hosl.HybridOrderOptimizer(c1, torch.optim.SGD(s1.parameters(), lr=1e-2, momentum=0.9), lr=1e-2, num_queries=2, seed=3)
    straight = _train(c1, s1, o1, x, y, 6)

    c2, s2 = _model()
    o2 = hosl.HybridOrderOptimizer(c2, torch.optim.SGD(s2.parameters(), lr=1e-2, momentum=0.9), lr=1e-2, num_queries=2, seed=3)
    first = _train(c2, s2, o2, x, y, 3)
    saved = copy.deepcopy((c2.state_dict(), s2.state_dict(), o2.state_dict()))

    c3, s3 = _model(seed=99)  # different init: everything must come from the checkpoint
    o3 = hosl.HybridOrderOptimizer(c3, torch.optim.SGD(s3.parameters(), lr=1e-2, momentum=0.9), lr=1e-2, num_queries=2, seed=0)
    c3.load_state_dict(saved[0]); s3.load_state_dict(saved[1]); o3.load_state_dict(saved[2])
    second = _train(c3, s3, o3, x, y, 3)
    assert first + second == straight
    assert _same_bits(_snapshot(c1), c3) and _same_bits(_snapshot(s1), s3)
    assert o3.steps_taken == 6


def test_non_finite_losses_skip_the_update_and_are_counted():
    client, server = _model()
    x, y = _data()
    before_c, before_s = _snapshot(client), _snapshot(server)
    opt = hosl.HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=1.0), lr=1.0, num_queries=2)
    calls = []

    def nan_on_perturbed(h):
        calls.append(1)
        loss = _loss_fn(server, y)(h)
        return loss if len(calls) == 1 else loss * float("nan")

    opt.step(lambda: client(x), nan_on_perturbed)
    assert opt.skipped_updates == 1
    assert _same_bits(before_c, client)
    assert not _same_bits(before_s, server)  # the clean loss was finite: the server still steps

    calls.clear()
    before_s = _snapshot(server)
    opt.step(lambda: client(x), lambda h: _loss_fn(server, y)(h) * float("inf"))
    assert opt.skipped_updates == 2
    assert _same_bits(before_c, client) and _same_bits(before_s, server)
    assert all(p.grad is None for p in server.parameters())


def test_batched_server_evaluation_matches_sequential():
    x, y = _data()
    results = []
    for server_batch in (1, 4):
        client, server = _model()
        opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, num_queries=3, server_batch=server_batch, seed=5)
        shapes = []

        def loss_fn(h):
            shapes.append(h.shape[0])
            copies = h.shape[0] // x.shape[0]
            per_example = (server(h).float() - y.repeat(copies, 1)).pow(2).squeeze(1)
            return per_example.mean() if copies == 1 else hosl.per_copy_mean(per_example, copies)

        opt.step(lambda: client(x), loss_fn)
        results.append((opt.last_projected_grads, _snapshot(client), shapes))
    (g1, w1, shapes1), (g4, w4, shapes4) = results
    assert shapes1 == [32] * 7 and shapes4 == [32, 128, 64]  # clean, then 6 perturbed in chunks of 4
    assert g4 == pytest.approx(g1, rel=1e-3, abs=1e-5)
    for n in w1:
        torch.testing.assert_close(w4[n], w1[n])


def test_forward_difference_uses_q_perturbed_passes():
    client, server = _model()
    x, y = _data()
    calls = []
    opt = hosl.HybridOrderOptimizer(client, None, num_queries=5, difference="forward")
    opt.step(lambda: calls.append(1) or client(x), _loss_fn(server, y))
    assert len(calls) == 1 + 5


def test_perturbed_forward_sees_w_plus_eps_z():
    client, _ = _model()
    x, _ = _data()
    opt = hosl.HybridOrderOptimizer(client, None, eps=0.5)
    names = sorted(n for n, _ in client.named_parameters())
    params = dict(client.named_parameters())
    z = randn_reference(11, sum(p.numel() for p in params.values()))
    explicit, start = {}, 0
    for n in names:
        size = params[n].numel()
        explicit[n] = params[n].detach() + (-0.5 * z[start : start + size]).view_as(params[n])
        start += size
    with opt.perturbed(11, -1.0):
        got = client(x)
    torch.testing.assert_close(got, functional_call(client, explicit, (x,)), rtol=1e-6, atol=1e-6)


def test_failing_forward_restores_weights():
    client, _ = _model()
    x, _ = _data()
    before = _snapshot(client)
    opt = hosl.HybridOrderOptimizer(client, None)

    def explode(mod, args, out):
        raise RuntimeError("boom")

    handle = client[3].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        with opt.perturbed(1, 1.0):
            client(x)
    handle.remove()
    assert _same_bits(before, client)
    # scratch released: a second perturbed pass works and weights stay put
    with opt.perturbed(1, 1.0):
        client(x)
    assert _same_bits(before, client)


def test_scratch_is_the_largest_module_not_the_whole_client():
    client, _ = _model()
    opt = hosl.HybridOrderOptimizer(client, None, perturbed_forward="scratch")
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in client.modules()) * 4
    assert opt.scratch_nbytes() == largest
    assert opt.scratch_nbytes() < sum(p.numel() * 4 for p in client.parameters())


def test_weight_decay_skips_biases_and_norms():
    client, _ = _model()
    lay = hosl.optim.ParameterLayout(client)
    decayed = {s.name for s in lay.slots if s.decay}
    assert decayed == {"0.weight", "3.weight"}


def test_zeroth_order_baseline_trains_both_halves():
    client, server = _model()
    x, y = _data()
    before_c, before_s = _snapshot(client), _snapshot(server)
    opt = hosl.ZerothOrderOptimizer([client, server], lr=1e-2, num_queries=4)
    losses = [opt.step(lambda: _loss_fn(server, y)(client(x))).item() for _ in range(80)]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert not _same_bits(before_c, client) and not _same_bits(before_s, server)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_queries=0), ValueError, "num_queries"),
        (dict(num_queries=2.5), TypeError, "num_queries"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-3), ValueError, "eps"),
        (dict(lr=math.nan), ValueError, "lr"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(difference="backward"), ValueError, "difference"),
        (dict(server_batch=0), ValueError, "server_batch"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    client, _ = _model()
    with pytest.raises(exc, match=match):
        hosl.HybridOrderOptimizer(client, None, **kwargs)


def test_bad_callables_and_server_shapes():
    client, server = _model()
    x, y = _data()
    with pytest.raises(TypeError, match="server_optimizer"):
        hosl.HybridOrderOptimizer(client, server)
    opt = hosl.HybridOrderOptimizer(client, None, server_batch=2)
    with pytest.raises(TypeError, match="client_fn must be callable"):
        opt.step(None, _loss_fn(server, y))
    before = _snapshot(client)
    with pytest.raises(ValueError, match="one loss per copy"):
        opt.step(lambda: client(x), lambda h: server(h).float().mean())
    assert _same_bits(before, client)


def test_auto_on_cpu_swaps_layers_and_matches_the_scratch_path_bit_for_bit():
    torch.manual_seed(0)
    client = nn.Sequential(nn.Embedding(500, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    ids = torch.randint(0, 500, (4, 7))
    before = _snapshot(client)
    outs = {}
    for pf in ("auto", "scratch"):
        opt = hosl.HybridOrderOptimizer(client, None, perturbed_forward=pf)
        with opt.perturbed(3, -1.0):
            outs[pf] = client(ids)
        if pf == "auto":
            assert "fused" in opt.perturbed_forward_info[0]
            assert opt.scratch_nbytes() == 16 * 2 * 4  # only the LayerNorm: no vocabulary-sized scratch
    assert torch.equal(outs["auto"], outs["scratch"])
    assert _same_bits(before, client)
