"""ZO update rules (sgd, momentum, adam, sign) and direction families chosen on the optimizers.

Each rule's step is checked against the rule written out slowly (float64, directions from the
spec's reference generators, per tensor at its layout offset); momentum/Adam state must survive a
state_dict round trip bit for bit; the chosen family must reach the ops that perturb and update.
"""

import copy
import io
import logging
import math

import pytest
import torch
from torch import nn

import hosl
from hosl.directions.families import FAMILIES as FAMILY_REGISTRY
from hosl.directions.families import direction_reference
from hosl.directions.spec import rademacher_reference
from hosl.forward.layout import ParameterLayout
from hosl.forward.scratch import ModuleScratchPerturber
from hosl.optim.rules import RULES, rule_state_nbytes

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

# Every registered rule and family: a rule without its slow form in SlowRule fails here.
VARIANTS = tuple(RULES)
FAMILIES = tuple(FAMILY_REGISTRY)


def _z(family, seed, slot):
    """The family's z of one parameter (a shaped family at ZOConfig's default rank, 1), flat."""
    entry = FAMILY_REGISTRY[family]
    if entry.shaped:
        return entry.shaped_reference(seed, tuple(slot.param.shape), slot.offset, 1).reshape(-1)
    return direction_reference(family, seed, slot.param.numel(), slot.offset)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    client = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 8)).to(dtype)
    server = nn.Sequential(nn.ReLU(), nn.Linear(8, 1)).to(dtype)
    return client, server


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g).to(dtype)
    return x, x[:, :2].sum(1, keepdim=True).float()


def _loss_fn(server, y):
    return lambda h: nn.functional.mse_loss(server(h).float(), y)


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


class SlowRule:
    """The update rules written out in float64 from the estimate g = (1/Q) sum_q g_q z_q."""

    def __init__(self, variant, lr, wd, momentum=0.9, betas=(0.9, 0.999), adam_eps=1e-8):
        self.variant, self.lr, self.wd, self.mu, self.betas, self.adam_eps = variant, lr, wd, momentum, betas, adam_eps
        self.state = {}

    def step(self, client, family, seeds, grads):
        layout = ParameterLayout(client)
        for slot in layout.slots:
            p = slot.param
            g = sum(gq / len(seeds) * _z(family, s, slot).double()
                    for gq, s in zip(grads, seeds)).view(p.shape)
            w = p.detach().double()
            wd = self.wd if slot.decay else 0.0
            st = self.state.setdefault(slot.name, {})
            if self.variant == "sgd":
                new = w - self.lr * (g + wd * w)
            elif self.variant == "sign":
                new = w - self.lr * (torch.sign(g) + wd * w)
            elif self.variant == "momentum":
                st["b"] = self.mu * st.get("b", 0.0) + (g + wd * w)
                new = w - self.lr * st["b"]
            elif self.variant == "adam":
                d = g + wd * w
                b1, b2 = self.betas
                st["t"] = st.get("t", 0) + 1
                st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * d
                st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * d * d
                m_hat, v_hat = st["m"] / (1 - b1 ** st["t"]), st["v"] / (1 - b2 ** st["t"])
                new = w - self.lr * m_hat / (v_hat.sqrt() + self.adam_eps)
            else:
                raise NotImplementedError(f"write the slow form of the {self.variant!r} rule here")
            with torch.no_grad():
                p.copy_(new.to(p.dtype))


def _slow_projected_grads(client, server, x, y, family, seeds, eps):
    """(L(w + eps z) - L(w - eps z)) / 2 eps with explicitly perturbed copies of the weights."""
    layout = ParameterLayout(client)
    out = []
    for s in seeds:
        losses = []
        for sign in (1.0, -1.0):
            params = {slot.name: slot.param.detach() + (sign * eps) * _z(family, s, slot).view_as(slot.param)
                      for slot in layout.slots}
            with torch.no_grad():
                losses.append(_loss_fn(server, y)(torch.func.functional_call(client, params, (x,))).item())
        out.append((losses[0] - losses[1]) / (2 * eps))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_rule_and_family_equals_the_slow_reference(variant, family):
    client, server = _model()
    ref_client = copy.deepcopy(client)
    x, y = _data()
    lr, eps, wd = (1e-2 if variant in ("adam", "sign") else 5e-2), 1e-2, 0.1
    opt = hosl.HybridOrderOptimizer(client, None, lr=lr, eps=eps, num_queries=3, weight_decay=wd, seed=11,
                                    direction=family, variant=variant, momentum=0.8, betas=(0.8, 0.99))
    slow = SlowRule(variant, lr, wd, momentum=0.8, betas=(0.8, 0.99))
    for _ in range(3):  # several steps, so momentum and Adam's moments and bias correction matter
        opt.step(lambda: client(x), _loss_fn(server, y))
        ref_grads = _slow_projected_grads(ref_client, server, x, y, family, opt.last_seeds, eps)
        assert opt.last_projected_grads == pytest.approx(ref_grads, rel=2e-3, abs=1e-4)
        slow.step(ref_client, family, opt.last_seeds, opt.last_projected_grads)
        for (n, p), r in zip(client.named_parameters(), ref_client.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=2e-6, msg=f"{variant}/{family}: {n}")
    expected_state = {"sgd": 0, "sign": 0, "momentum": 1, "adam": 2}[variant]
    numel = sum(p.numel() for p in client.parameters())
    assert opt.state_nbytes() == expected_state * 4 * numel
    assert opt.estimate_nbytes() == (0 if variant == "sgd" else 4 * max(p.numel() for p in client.parameters()))


def test_the_rules_really_differ():
    """Guard against a variant argument that is silently ignored."""
    x, y = _data()
    results = {}
    for variant in VARIANTS:
        client, server = _model()
        opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, num_queries=2, seed=3, variant=variant)
        for _ in range(2):
            opt.step(lambda: client(x), _loss_fn(server, y))
        results[variant] = torch.cat([p.detach().reshape(-1) for p in client.parameters()])
    for a in VARIANTS:
        for b in VARIANTS:
            if a < b:
                assert not torch.equal(results[a], results[b]), (a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_rule_table_gives_the_state_the_rule_keeps(variant):
    """rules.rule_state_nbytes (what the client memory planner charges) is the state a step builds."""
    x, y = _data()
    client, server = _model()
    opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, num_queries=2, seed=3, variant=variant)
    opt.step(lambda: client(x), _loss_fn(server, y))
    trainable = sum(p.numel() for p in client.parameters() if p.requires_grad)
    assert opt.state_nbytes() == rule_state_nbytes(variant, trainable)
    with pytest.raises(ValueError, match="variant must be one of"):
        rule_state_nbytes("lion", trainable)


@pytest.mark.parametrize("variant,dtype", [("momentum", torch.float32), ("adam", torch.float32),
                                           ("adam", torch.bfloat16)])
def test_state_survives_resume_bit_identically(variant, dtype):
    x, y = _data(dtype)

    def fresh(seed):
        c, s = _model(dtype, seed=seed)
        return c, s, hosl.HybridOrderOptimizer(
            c, torch.optim.SGD(s.parameters(), lr=1e-2, momentum=0.9), lr=1e-2, num_queries=2, seed=3,
            weight_decay=0.01, variant=variant, direction="sphere")

    def run(c, s, o, steps):
        return [o.step(lambda: c(x), _loss_fn(s, y)).item() for _ in range(steps)]

    c1, s1, o1 = fresh(0)
    straight = run(c1, s1, o1, 5)

    c2, s2, o2 = fresh(0)
    first = run(c2, s2, o2, 2)
    buffer = io.BytesIO()  # through torch.save, as a checkpoint
    torch.save((c2.state_dict(), s2.state_dict(), o2.state_dict()), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    c3, s3, o3 = fresh(99)  # other weights: everything must come from the saved state
    c3.load_state_dict(saved[0]); s3.load_state_dict(saved[1]); o3.load_state_dict(saved[2])
    for st in o3.state.values():  # the state stays float32 whatever the weights' dtype
        assert all(t.dtype == torch.float32 for t in st.values() if isinstance(t, torch.Tensor))
    second = run(c3, s3, o3, 3)
    assert first + second == straight
    for a, b in zip(c1.parameters(), c3.parameters()):
        assert torch.equal(_bits(a.detach()), _bits(b.detach()))
    for p1, p3 in zip(o1.param_groups[0]["params"], o3.param_groups[0]["params"]):
        for key, t in o1.state[p1].items():
            t3 = o3.state[p3][key]
            assert torch.equal(t, t3) if isinstance(t, torch.Tensor) else t == t3


def test_loading_a_state_of_another_rule_or_family_is_refused():
    client, _ = _model()
    state = hosl.HybridOrderOptimizer(client, None, variant="adam").state_dict()
    with pytest.raises(ValueError, match="variant"):
        hosl.HybridOrderOptimizer(client, None, variant="momentum").load_state_dict(state)
    with pytest.raises(ValueError, match="direction"):
        hosl.HybridOrderOptimizer(client, None, variant="adam", direction="sphere").load_state_dict(state)


def _capture_perturbed_weight(family, perturbed_forward="auto"):
    """The first Linear's weight as the perturbed passes see it, from weights that are all zero."""
    client, server = _model()
    with torch.no_grad():
        client[0].weight.zero_()
    seen = []
    # registered before the optimizer's hooks, so it runs after the pre-hook swapped the weight in
    client[0].register_forward_hook(lambda mod, args, out: seen.append(mod.weight.detach().clone()))
    x, y = _data()
    eps = 1e-2
    opt = hosl.HybridOrderOptimizer(client, None, lr=0.0, eps=eps, num_queries=2, seed=5, direction=family,
                                    perturbed_forward=perturbed_forward)
    opt.step(lambda: client(x), _loss_fn(server, y))
    return opt, seen, eps


def test_rademacher_perturbation_is_plus_minus_eps():
    opt, seen, eps = _capture_perturbed_weight("rademacher")
    assert isinstance(opt.perturbers[0], ModuleScratchPerturber) and not hasattr(opt.perturbers[0], "fused")
    clean, plus, minus = seen[0], seen[1], seen[2]
    assert torch.count_nonzero(clean) == 0
    assert plus.abs().unique().tolist() == [torch.tensor(eps, dtype=torch.float32).item()]  # exactly +-eps
    assert torch.equal(minus, -plus)
    # and it is the spec's Rademacher direction at the weight's coordinates
    slot = ParameterLayout(opt.client).by_param[id(opt.client[0].weight)]
    z = rademacher_reference(opt.last_seeds[0], plus.numel(), slot.offset).view_as(plus)
    assert torch.equal(torch.sign(plus), z)
    # the Gaussian default does not give equal magnitudes (the test above can fail); on the scratch
    # path, as the fused one never writes the perturbed weight anywhere this hook could see it
    _, gauss, _ = _capture_perturbed_weight("gaussian", perturbed_forward="scratch")
    assert gauss[1].abs().unique().numel() > 10


def test_sphere_perturbation_has_norm_sqrt_numel_and_factors_are_computed_once_per_seed():
    opt, seen, eps = _capture_perturbed_weight("sphere")
    plus = seen[1] / eps
    assert plus.norm().item() == pytest.approx(math.sqrt(plus.numel()), rel=1e-5)
    # 2 seeds x (+, -) passes and the update: one norm pass per seed
    assert opt.sphere_scales[0].computed == 2
    opt.step(lambda: opt.client(_data()[0]), lambda h: h.float().pow(2).mean())
    assert opt.sphere_scales[0].computed == 4


def test_fused_path_falls_back_to_scratch_for_other_families(caplog):
    client, _ = _model()
    with caplog.at_level(logging.INFO, logger="hosl.optim"):
        opt = hosl.HybridOrderOptimizer(client, None, perturbed_forward="fused", direction="rademacher")
    assert type(opt.perturbers[0]) is ModuleScratchPerturber
    assert "Gaussian and lowrank directions only" in opt.perturbed_forward_info[0]
    assert any(r.levelno == logging.WARNING and "Gaussian" in r.getMessage() for r in caplog.records)
    gauss = hosl.HybridOrderOptimizer(client, None, perturbed_forward="fused")
    assert type(gauss.perturbers[0]) is not ModuleScratchPerturber


def test_zero_order_optimizer_takes_the_same_options():
    client, server = _model()
    x, y = _data()
    opt = hosl.ZerothOrderOptimizer([client, server], lr=1e-2, num_queries=2, direction="rademacher", variant="adam")
    opt.step(lambda: _loss_fn(server, y)(client(x)))
    n = sum(p.numel() for m in (client, server) for p in m.parameters())
    assert opt.state_nbytes() == 2 * 4 * n


def test_bad_options_are_refused():
    client, _ = _model()
    for kwargs, match in [({"direction": "uniform"}, "direction"), ({"variant": "lion"}, "variant"),
                          ({"momentum": 1.0}, "momentum"), ({"betas": (0.9,)}, "betas"),
                          ({"betas": (0.9, 1.5)}, "betas")]:
        with pytest.raises(ValueError, match=match):
            hosl.HybridOrderOptimizer(client, None, **kwargs)


def test_zo_sl_server_half_gets_the_family_and_rule_and_saves_its_state():
    from hosl.training.config import TrainConfig
    from hosl.training.run import hyper
    from hosl.training.remote import fingerprint
    from hosl.training.server_handler import ServerHandler

    cfg = TrainConfig(mode="zo-sl", direction="rademacher", zo_optimizer="momentum")
    _, server = _model()
    half = ServerHandler(server, "zo-sl", hyper(cfg), lambda *a: None, "classifier", train_dropout=False)
    half.zo_for(100)  # the client's coordinate count arrives with the first begin-step
    assert half.zo.layouts[0].offset == 100
    assert half.zo.direction == "rademacher" and half.zo.variant == "momentum"
    assert type(half.zo.perturbers[0]) is ModuleScratchPerturber and half.zo.perturbers[0].direction == "rademacher"
    half.zo.apply_update([1, 2], [0.5, -0.25])
    state = half.state_dict()
    assert state["zo"]["state"]  # the server's momentum buffers go into its checkpoint
    other = ServerHandler(_model(seed=3)[1], "zo-sl", hyper(cfg), lambda *a: None, "classifier", train_dropout=False)
    other.load_state_dict(copy.deepcopy(state))
    other.zo_for(100)  # a resumed state waits for the optimizer to be built
    assert all(torch.equal(other.zo.state[q]["momentum_buffer"], half.zo.state[p]["momentum_buffer"])
               for p, q in zip(server.parameters(), other.server.parameters()))
    # both sides of a two-process run must agree on the family and the rule
    base = fingerprint(TrainConfig(mode="zo-sl"))
    assert fingerprint(cfg)["direction"] != base["direction"]
    assert fingerprint(cfg)["zo_optimizer"] != base["zo_optimizer"]
