"""HybridOrderOptimizer as a torch.optim user expects it: no_grad, param groups, state checks,
per-group eps, zero_grad, finite guards, exceptions that leave everything as it was, the server
optimizer and the activations checked, LR schedulers on both halves."""

import copy
import math

import pytest
import torch
from torch import nn

import hosl
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
    return x, x[:, :2].sum(1, keepdim=True).float()


def _loss_fn(server, y):
    return lambda h: nn.functional.mse_loss(server(h).float(), y)


def _weights(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(before, module):
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def _opt(client, server, **kw):
    return hosl.HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=0.1), lr=1e-2, eps=1e-2,
                                     num_queries=2, seed=3, **kw)


def test_step_under_no_grad_trains_the_server_as_outside_it():
    results = []
    for under_no_grad in (False, True):
        client, server = _model()
        x, y = _data()
        opt = _opt(client, server)
        if under_no_grad:
            with torch.no_grad():
                opt.step(lambda: client(x), _loss_fn(server, y))
        else:
            opt.step(lambda: client(x), _loss_fn(server, y))
        results.append((_weights(client), _weights(server)))
    (c0, s0), (c1, s1) = results
    assert all(torch.equal(a, b) for a, b in zip(c0 + s0, c1 + s1))
    assert not all(torch.equal(a, b) for a, b in zip(s0, _weights(_model()[1])))  # the server did move


def test_add_param_group_is_refused():
    client, server = _model()
    opt = _opt(client, server)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("change,field", [
    (dict(num_queries=3), "num_queries"), (dict(difference="forward"), "difference"),
    (dict(direction="rademacher"), "direction"), (dict(variant="sign"), "variant"),
])
def test_load_state_dict_refuses_other_settings_naming_the_field(change, field):
    client, server = _model()
    saved = _opt(client, server).state_dict()
    other = _opt(*_model(), **change) if "num_queries" not in change else hosl.HybridOrderOptimizer(
        _model()[0], torch.optim.SGD(_model()[1].parameters(), lr=0.1), lr=1e-2, eps=1e-2, seed=3, **change)
    with pytest.raises(ValueError, match=field):
        other.load_state_dict(copy.deepcopy(saved))


def test_load_state_dict_refuses_another_parameter_layout():
    client, server = _model()
    saved = _opt(client, server).state_dict()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(6, 13), nn.LayerNorm(13), nn.Tanh(), nn.Linear(13, 12))
    other = hosl.HybridOrderOptimizer(wider, torch.optim.SGD(server.parameters(), lr=0.1), lr=1e-2, eps=1e-2,
                                      num_queries=2, seed=3)
    with pytest.raises(ValueError, match="parameter layout.*0.bias"):
        other.load_state_dict(copy.deepcopy(saved))


def test_each_group_is_estimated_with_its_own_eps():
    """Two modules, eps 1e-2 and 4e-2: module b's update uses (L+ - L-) / (2 * 4e-2)."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = hosl.ZerothOrderOptimizer([a, b], lr=1e-2, eps=1e-2, num_queries=2, seed=1)
    opt.param_groups[1]["eps"] = 4e-2
    losses = []

    def loss_fn():
        losses.append(float(b(torch.tanh(a(x))).pow(2).mean()))
        return torch.tensor(losses[-1])

    b_before = copy.deepcopy(b)
    opt.step(loss_fn)
    g_b = [(lp - lm) / (2 * 4e-2) for lp, lm in zip(losses[0::2], losses[1::2])]
    hosl.optim.functional.zo_sgd(opt.layouts[1].__class__(b_before, offset=opt.layouts[1].offset),
                                 opt.last_seeds, g_b, lr=1e-2)
    for p, r in zip(b.parameters(), b_before.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    # group 0 keeps its own eps
    assert opt.last_projected_grads == pytest.approx([(lp - lm) / 2e-2 for lp, lm in zip(losses[0::2], losses[1::2])])


def test_zero_grad_clears_both_halves():
    client, server = _model()
    opt = _opt(client, server)
    for p in [*client.parameters(), *server.parameters()]:
        p.grad = torch.ones_like(p)
    opt.zero_grad()
    assert all(p.grad is None for p in [*client.parameters(), *server.parameters()])


def test_non_finite_server_gradient_skips_the_server_step_and_is_counted():
    client, server = _model()
    x, y = _data()
    opt = _opt(client, server)
    handle = server[1].weight.register_hook(lambda g: g * float("nan"))
    s_before, c_before = _weights(server), _weights(client)
    loss = opt.step(lambda: client(x), _loss_fn(server, y))
    handle.remove()
    assert math.isfinite(float(loss))
    assert opt.skipped_server_steps == 1 and opt.skipped_updates == 0
    assert _same(s_before, server) and not _same(c_before, client)  # the client still learns
    assert all(p.grad is None for p in server.parameters())
    assert opt.state_dict()["hosl"]["skipped_server_steps"] == 1


@pytest.mark.parametrize("variant", ["sgd", "momentum", "adam", "sign"])
def test_update_that_would_overflow_is_skipped_with_weights_untouched(variant):
    client, server = _model(torch.float16)
    x, y = _data(torch.float16)
    lr = 1e4 if variant in ("sgd", "momentum") else 1e5
    opt = hosl.HybridOrderOptimizer(client, None, lr=lr, eps=1e-2, num_queries=2, variant=variant)
    before = _weights(client)
    opt.step(lambda: client(x), _loss_fn(server, y))
    assert opt.skipped_updates == 1
    assert _same(before, client) and all(torch.isfinite(p).all() for p in client.parameters())
    # a sane learning rate is not refused by the bound
    ok = hosl.HybridOrderOptimizer(client, None, lr=1e-3, eps=1e-2, num_queries=2, variant=variant)
    ok.step(lambda: client(x), _loss_fn(server, y))
    assert ok.skipped_updates == 0 and not _same(before, client)


def test_an_exception_inside_step_leaves_weights_grads_and_seed_stream_as_they_were():
    client, server = _model()
    x, y = _data()
    opt = _opt(client, server)
    for p in server.parameters():  # gradients the user accumulated before the step
        p.grad = torch.full_like(p, 0.5)
    grads_before = [p.grad for p in server.parameters()]
    c_before, s_before, gen_before = _weights(client), _weights(server), opt.generator.get_state()
    calls = []

    def failing(h):
        calls.append(1)
        if len(calls) == 3:  # after the clean backward, inside the perturbed passes
            raise RuntimeError("server down")
        return _loss_fn(server, y)(h)

    with pytest.raises(RuntimeError, match="server down"):
        opt.step(lambda: client(x), failing)
    assert _same(c_before, client) and _same(s_before, server)
    assert all(p.grad is g and torch.equal(g, torch.full_like(g, 0.5)) for p, g in zip(server.parameters(), grads_before))
    assert torch.equal(opt.generator.get_state(), gen_before) and opt.steps_taken == 0
    # the next step draws the seeds a fresh optimizer draws first
    opt.zero_grad()
    opt.step(lambda: client(x), _loss_fn(server, y))
    assert opt.last_seeds == draw_seeds(torch.Generator().manual_seed(3), 2)


def test_gradients_held_before_a_step_are_added_as_autograd_would():
    x, y = _data()
    finals = []
    for preset in (True, False):
        client, server = _model()
        opt = _opt(client, server)
        if preset:
            for p in server.parameters():
                p.grad = torch.full_like(p, 0.25)
        else:
            extra = sum((p * 0.25).sum() for p in server.parameters())
            extra.backward()  # the same 0.25 accumulated by autograd itself
        opt.step(lambda: client(x), _loss_fn(server, y))
        finals.append(_weights(server))
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_server_optimizer_over_the_wrong_parameters_is_refused():
    client, server = _model()
    with pytest.raises(ValueError, match="client's parameter '0.weight'"):
        hosl.HybridOrderOptimizer(client, torch.optim.SGD(client.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="client's parameter"):  # a view sharing the client's storage
        hosl.HybridOrderOptimizer(client, torch.optim.SGD([nn.Parameter(client[0].weight.data[0])], lr=0.1))
    unrelated = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="not a parameter of the server"):
        hosl.HybridOrderOptimizer(client, torch.optim.SGD(unrelated.parameters(), lr=0.1), server=server)
    with pytest.raises(ValueError, match="does not hold the server's trainable parameter '1.bias'"):
        hosl.HybridOrderOptimizer(client, torch.optim.SGD([server[1].weight], lr=0.1), server=server)
    hosl.HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=0.1), server=server)  # accepted


def test_client_fn_results_must_keep_their_shape_within_a_step():
    client, server = _model()
    x, y = _data()
    opt = _opt(client, server)
    before = _weights(client)
    calls = []

    def shrinking():
        calls.append(1)
        return client(x[: 32 - len(calls)])

    with pytest.raises(ValueError, match=r"client_fn returned shape \(30, 12\).*\(31, 12\)"):
        opt.step(shrinking, lambda h: server(h).float().pow(2).mean())
    with pytest.raises(TypeError, match="one tensor, got tuple"):
        opt.step(lambda: (client(x),), _loss_fn(server, y))
    assert _same(before, client)


def test_clean_and_perturbed_calls_are_explicit():
    client, server = _model()
    x, y = _data()
    opt = _opt(client, server)
    clean, perturbed = [], []

    def clean_fn(h):
        clean.append(torch.is_grad_enabled())
        return _loss_fn(server, y)(h)

    def perturbed_fn(h):
        perturbed.append(torch.is_grad_enabled())
        return _loss_fn(server, y)(h)

    with torch.no_grad():
        opt.step(lambda: client(x), clean_fn, perturbed_loss_fn=perturbed_fn)
    assert clean == [True] and perturbed == [False] * 4


def test_lr_schedulers_on_both_halves():
    """The docs/optimizer.md example: one scheduler per half, stepped after each step."""
    client, server = _model()
    x, y = _data()
    server_opt = torch.optim.SGD(server.parameters(), lr=1e-2, momentum=0.9)
    opt = hosl.HybridOrderOptimizer(client, server_opt, lr=1e-3, eps=1e-3, num_queries=2)
    client_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    server_sched = torch.optim.lr_scheduler.CosineAnnealingLR(server_opt, T_max=4)
    client_lrs, server_lrs = [], []
    for _ in range(4):
        opt.step(lambda: client(x), _loss_fn(server, y))
        client_sched.step()
        server_sched.step()
        client_lrs.append(opt.param_groups[0]["lr"])
        server_lrs.append(server_opt.param_groups[0]["lr"])
    assert client_lrs == pytest.approx([1e-3, 5e-4, 5e-4, 2.5e-4])
    assert server_lrs == pytest.approx([1e-2 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(1, 5)])
    # the client's update really uses the scheduled lr: at lr 0 the client stays put
    opt.param_groups[0]["lr"] = 0.0
    before = _weights(client)
    opt.step(lambda: client(x), _loss_fn(server, y))
    assert _same(before, client)


def test_split_server_half_skips_a_non_finite_gradient_and_reports_it():
    from hosl.training.modes import Hyper
    from hosl.training.protocol import PHASE_NAMES
    from hosl.training.server_handler import ServerHandler
    from hosl.training.server_proxy import ServerProxy
    from hosl.transport import InProcessLink

    class MaskedServer(nn.Module):  # the split contract: server(h, mask)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, h, mask):
            return self.inner(h)

    client, server = _model()
    x, y = _data()
    hp = Hyper(zo=hosl.ZOConfig(lr=1e-2, eps=1e-2, num_queries=1), lr_server=0.1)
    half = ServerHandler(MaskedServer(server), "hosl", hp,
                         lambda out, batch, copies: nn.functional.mse_loss(out.float(), batch["labels"]),
                         "classifier", train_dropout=False)
    proxy = ServerProxy(InProcessLink(half.handle, PHASE_NAMES), "classifier")
    batch = {"attention_mask": torch.ones(32, 1), "labels": y}
    opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, eps=1e-2, num_queries=1)
    handle = server[1].weight.register_hook(lambda g: g * float("nan"))
    before = _weights(server)
    proxy.begin_step(1, batch)
    opt.step(lambda: client(x), proxy.hosl_loss_fn(), perturbed_loss_fn=proxy.losses)
    proxy.end_step()
    handle.remove()
    assert proxy.skipped_server_steps == 1 and _same(before, server)
    # stale gradients of an abandoned step are cleared by the next begin-step
    proxy.begin_step(2, batch)
    proxy.clean_loss(client(x).detach())
    proxy.begin_step(3, batch)
    assert all(p.grad is None for p in server.parameters())


def test_zeroth_order_optimizer_keeps_weights_and_seed_stream_when_loss_fn_raises():
    client, server = _model()
    x, y = _data()
    opt = hosl.ZerothOrderOptimizer([client, server], lr=1e-2, eps=1e-2, num_queries=2, seed=4)
    before, gen = _weights(client) + _weights(server), opt.generator.get_state()
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return _loss_fn(server, y)(client(x))

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(before, [*client.parameters(), *server.parameters()]))
    assert torch.equal(opt.generator.get_state(), gen)
    opt.step(lambda: _loss_fn(server, y)(client(x)))
    assert opt.last_seeds == draw_seeds(torch.Generator().manual_seed(4), 2)
