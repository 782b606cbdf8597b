"""ZOConfig (hosl/optim/config.py): one declaration per ZO option reaches the optimizers, the
training config, the CLI, the resume rules and the two-process fingerprint.

The tables below name every ZOConfig field: a field added without an entry fails
``test_the_tables_name_every_field``, so the checks here cover it too."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from torch import nn

import hosl
from hosl.cli import build_parser
from hosl.optim.config import ZOConfig, field_help, train_fields, train_name
from hosl.training.config import TrainConfig
from hosl.training.modes import Hyper, make_mode
from hosl.training.remote import FINGERPRINT_FIELDS, fingerprint
from hosl.training.run_folder import NOT_COMPARED, OVERRIDABLE

FIELDS = [f.name for f in dataclasses.fields(ZOConfig)]
BY_NAME = {f.name: f for f in dataclasses.fields(ZOConfig)}

# a valid value other than the default, and how it is written on the command line
OTHER = {
    "lr": (1e-3, "1e-3"), "eps": (1e-2, "1e-2"), "num_queries": (3, "3"), "weight_decay": (0.1, "0.1"),
    "difference": ("forward", "forward"), "seed": (7, "7"), "backend": ("reference", "reference"),
    "perturbed_forward": ("scratch", None), "direction": ("rademacher", "rademacher"),
    "variant": ("momentum", "momentum"), "momentum": (0.5, "0.5"), "betas": ((0.8, 0.9), "0.8,0.9"),
    "adam_eps": (1e-6, None), "coordinate_offset": (5, None), "query_batch": (2, "2"),
    "query_memory_budget": (1000, "1000"), "server_batch": (2, "2"), "server_estimate": ("linear", "linear"),
    "linear_on": ("client", "client"), "client_micro_batch": (2, "2"), "step_scale": ("loss-std", "loss-std"),
    "rank": (2, "2"), "resample_every": (3, "3"),
    "server_grad": ("perturbed", "perturbed"), "client_update": ("per-direction", "per-direction"),
}
# a value the one validation refuses, and the error's type
BAD = {
    "lr": (-1.0, ValueError), "eps": (0.0, ValueError), "num_queries": (0, ValueError),
    "weight_decay": (-0.1, ValueError), "difference": ("backward", ValueError), "seed": (1.5, TypeError),
    "backend": ("tpu", ValueError), "perturbed_forward": ("fast", ValueError), "direction": ("uniform", ValueError),
    "variant": ("lion", ValueError), "momentum": (1.0, ValueError), "betas": ((0.9,), ValueError),
    "adam_eps": (0.0, ValueError), "coordinate_offset": (-1, ValueError), "query_batch": (0, ValueError),
    "query_memory_budget": (-1, ValueError), "server_batch": (0, ValueError),
    "server_estimate": ("quadratic", ValueError), "linear_on": ("nowhere", ValueError),
    "client_micro_batch": (0, ValueError), "step_scale": ("sigma", ValueError),
    "rank": (0, ValueError), "resample_every": (0, ValueError),
    "server_grad": ("sideways", ValueError), "client_update": ("each", ValueError),
}
# the options hosl train does not expose (a deliberate choice for each: add the field here, or give it
# a training name in its metadata)
LIBRARY_ONLY = {"perturbed_forward", "adam_eps", "coordinate_offset"}
# the options both processes of a two-process run must share: the server half's optimizer (zo-sl) or the
# update it applies depends on them; the others only shape the client's work (the server follows it)
MUST_AGREE = {"lr", "eps", "weight_decay", "seed", "direction", "variant", "momentum", "betas", "adam_eps", "rank",
              "resample_every"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _train_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions}


def _client(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)


def test_the_tables_name_every_field():
    assert set(OTHER) == set(FIELDS) and set(BAD) == set(FIELDS)
    assert {f.name for f in dataclasses.fields(ZOConfig) if f.metadata["train"] is None} == LIBRARY_ONLY


# -- one declaration reaches every place ----------------------------------------------------------

def test_every_exposed_field_is_a_train_config_field_and_a_flag_with_the_same_default():
    actions = _train_actions()
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for f in train_fields():
        name = train_name(f)
        assert name in train, name
        assert train[name].default == f.metadata["train_default"], name
        action = actions[name]
        assert action.option_strings == [_flag(name)]
        assert action.default == train[name].default, name
        assert action.help == field_help(f), name
        if "choices" in f.metadata["cli"]:
            assert tuple(action.choices) == tuple(f.metadata["cli"]["choices"]), name
    # the training defaults are ZOConfig's, but for lr and eps (None: the paper's value for the mode and
    # --lora) and difference (None: central, so that a --recipe can tell it was not given)
    differ = {f.name for f in train_fields() if f.metadata["train_default"] != f.default}
    assert differ == {"lr", "eps", "difference"}
    assert TrainConfig().zo_config() == ZOConfig()


@pytest.mark.parametrize("name", [n for n in FIELDS if n not in LIBRARY_ONLY])
def test_a_flag_reaches_the_train_config_and_its_zo_config(name):
    value, text = OTHER[name]
    key = train_name(BY_NAME[name])
    args = build_parser().parse_args(["train", _flag(key), text])
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    assert getattr(cfg, key) == value
    assert getattr(cfg.zo_config(), name) == value


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_reaches_the_optimizers_that_take_it(name):
    value, _ = OTHER[name]
    takers = BY_NAME[name].metadata["optimizers"]
    for kind, build in (("zo", lambda **kw: hosl.ZerothOrderOptimizer(_client(), **kw)),
                        ("hybrid", lambda **kw: hosl.HybridOrderOptimizer(_client(), None, **kw))):
        if kind not in takers:
            with pytest.raises(TypeError, match=f"does not take {name}"):
                build(**{name: value})
            with pytest.raises(ValueError, match=f"config.{name}="):
                build(config=ZOConfig(**{name: value}))
            assert getattr(build(config=ZOConfig(**{name: value}).for_optimizer(kind)).config, name) \
                == BY_NAME[name].default
            continue
        opt = build(**{name: value})
        assert getattr(opt.config, name) == value
        assert opt.config == dataclasses.replace(ZOConfig.defaults_for(kind), **{name: value})
        if BY_NAME[name].metadata["param_group"]:
            assert all(g[name] == value for g in opt.param_groups)
        elif hasattr(type(opt), name):  # the options the optimizer reads as attributes
            assert getattr(opt, name) == value


@pytest.mark.parametrize("name", FIELDS)
def test_a_bad_value_is_one_error_naming_the_field(name):
    value, exc = BAD[name]
    with pytest.raises(exc) as err:
        ZOConfig(**{name: value})
    assert str(err.value).startswith(name), str(err.value)
    if name in LIBRARY_ONLY:
        return
    key = train_name(BY_NAME[name])  # the training side: the same check, naming the flag, always a ValueError
    with pytest.raises(ValueError) as err:
        TrainConfig(**{key: value}).validate()
    assert str(err.value).startswith(_flag(key)), str(err.value)


def test_cross_field_rule_and_frozen_config():
    with pytest.raises(ValueError, match="query_batch=2 batches the perturbed points itself.*server_batch > 1"):
        ZOConfig(query_batch=2, server_batch=2)
    with pytest.raises(ValueError, match="--query-batch=2 batches .* --server-batch > 1"):
        TrainConfig(query_batch=2, server_batch=2).validate()
    c = ZOConfig(betas=[0.8, 0.9], query_memory_budget=1e3)
    assert c.betas == (0.8, 0.9) and c.query_memory_budget == 1000  # normalised as the optimizers use them
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.lr = 1.0
    with pytest.raises(ValueError, match="eps must be > 0"):
        dataclasses.replace(c, eps=-1.0)  # replace validates again


# -- config= and keywords --------------------------------------------------------------------------

KW = dict(lr=1e-2, eps=1e-2, num_queries=3, seed=4, variant="adam", direction="rademacher", weight_decay=0.01)


def _hybrid_step(opt, client, server):
    x, y = _data()
    return float(opt.step(lambda: client(x), lambda h: nn.functional.mse_loss(server(h), y)))


def test_config_and_keywords_give_identical_hybrid_optimizers():
    server = nn.Linear(3, 3)
    a, b = _client(), _client()
    opt_a = hosl.HybridOrderOptimizer(a, None, **KW)
    opt_b = hosl.HybridOrderOptimizer(b, None, config=ZOConfig(**KW))
    assert opt_a.config == opt_b.config and opt_a.param_groups[0].keys() == opt_b.param_groups[0].keys()
    assert _hybrid_step(opt_a, a, server) == _hybrid_step(opt_b, b, server)
    before = _client()
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), before.parameters()))  # it moved
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["hosl"]["num_queries"] == sb["hosl"]["num_queries"] == 3
    for ta, tb in zip(sa["state"].values(), sb["state"].values()):
        assert ta.keys() == tb.keys() and any(isinstance(v, torch.Tensor) for v in ta.values())
        assert all(torch.equal(ta[k], tb[k]) if isinstance(ta[k], torch.Tensor) else ta[k] == tb[k] for k in ta)


def test_config_and_keywords_give_identical_zo_optimizers():
    a, b = _client(), _client()
    x, y = _data()
    opt_a = hosl.ZerothOrderOptimizer(a, **KW)
    opt_b = hosl.ZerothOrderOptimizer(b, config=dataclasses.replace(ZOConfig.defaults_for("zo"), **KW))
    la = float(opt_a.step(lambda: nn.functional.mse_loss(a(x), y)))
    lb = float(opt_b.step(lambda: nn.functional.mse_loss(b(x), y)))
    assert la == lb and opt_a.config == opt_b.config
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_defaults_and_keywords_over_a_config():
    assert hosl.ZerothOrderOptimizer(_client()).config == ZOConfig(num_queries=1)  # MeZO's Q
    assert hosl.HybridOrderOptimizer(_client(), None).config == ZOConfig()
    opt = hosl.HybridOrderOptimizer(_client(), None, config=ZOConfig(lr=1e-3, num_queries=4), lr=5e-2)
    assert opt.config.lr == 5e-2 and opt.config.num_queries == 4 and opt.param_groups[0]["lr"] == 5e-2
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        hosl.HybridOrderOptimizer(_client(), None, learning_rate=1e-3)
    with pytest.raises(TypeError, match="config must be a ZOConfig"):
        hosl.HybridOrderOptimizer(_client(), None, config={"lr": 1e-3})
    with pytest.raises(AttributeError):
        opt.num_queries = 2  # fixed at construction (the perturbers and sphere factors depend on it)
    opt.client_micro_batch = 2  # the one option set later (hosl train's --client-memory-budget)
    assert opt.config.client_micro_batch == 2
    with pytest.raises(ValueError, match="client_micro_batch must be"):
        opt.client_micro_batch = 0


def test_the_training_modes_build_their_optimizers_from_the_run_config():
    cfg = TrainConfig(mode="hosl", num_queries=3, zo_optimizer="momentum", server_batch=2, client_micro_batch=4,
                      zo_betas=(0.8, 0.9), lr_client=1e-2, seed=9)
    from hosl.training.run import hyper

    hp = hyper(cfg)
    assert hp.zo == cfg.zo_config() and hp.lr_client == 1e-2 and hp.zo.variant == "momentum"
    mode = make_mode("hosl", _client(), None, hp, loss_of=None, proxy=object())
    assert mode.opt.config == cfg.zo_config()
    zo_mode = make_mode("zo", _client(), nn.Linear(3, 3), hp, loss_of=None)
    assert zo_mode.opt.config == cfg.zo_config().for_optimizer("zo")  # server_batch, client_micro_batch: HOSL's
    assert zo_mode.opt.config.server_batch == 1 and zo_mode.opt.config.num_queries == 3
    assert isinstance(Hyper().zo, ZOConfig)


def test_hyper_copies_every_other_setting_from_the_run_config():
    from dataclasses import fields

    from hosl.training.run import hyper

    cfg = TrainConfig(lr_server=0.5, momentum=0.1, server_optimizer="adamw", lr_schedule="cosine", warmup_steps=7,
                      steps=11, client_checkpointing=True, client_fused_step=True)
    hp = hyper(cfg)
    assert hp.total_steps == 11 and hp.zo == cfg.zo_config()
    for f in fields(Hyper):
        if f.name not in ("zo", "total_steps"):  # each set above to other than its default, so a miss shows
            assert getattr(hp, f.name) == getattr(cfg, f.name) != f.default, f.name


# -- the two-process fingerprint and the resume rules ---------------------------------------------

@pytest.mark.parametrize("name", [n for n in FIELDS if n not in LIBRARY_ONLY])
def test_the_fingerprint_changes_with_a_must_agree_option_only(name):
    value, _ = OTHER[name]
    key = train_name(BY_NAME[name])
    base = fingerprint(TrainConfig())
    changed = fingerprint(TrainConfig(**{key: value}))
    assert changed.keys() == base.keys()
    assert (changed != base) == (name in MUST_AGREE), name


def test_the_fingerprint_takes_the_zo_options_from_zo_config():
    assert {f.name for f in dataclasses.fields(ZOConfig) if f.metadata["agree"]} == MUST_AGREE
    assert not {train_name(f) for f in train_fields()} & set(FINGERPRINT_FIELDS)  # no second list
    fp = fingerprint(TrainConfig(zo_betas=(0.8, 0.95), lora=True))
    assert fp["zo_betas[0]"] == 0.8 and fp["zo_betas[1]"] == 0.95
    assert fp["lr_client"] == 5e-5 and fp["eps"] == 5e-3  # resolved: the paper's LoRA values
    assert isinstance(fingerprint(TrainConfig(weight_decay=0))["weight_decay"], float)  # 0 and 0.0 agree


def test_resume_rules_come_from_the_field_metadata():
    for f in train_fields():
        rule, key = f.metadata["on_resume"], train_name(f)
        assert (key in OVERRIDABLE) == (rule == "override"), key
        assert (key in NOT_COMPARED) == (rule == "ignore"), key
    assert {"lr_client", "server_batch", "client_micro_batch"} <= OVERRIDABLE and "backend" in NOT_COMPARED



def test_train_config_declares_every_zo_option_as_zoconfig_does():
    """TrainConfig's ZO fields are written out (hosl/training/config.py): the exposed ZOConfig fields,
    last and in ZOConfig's order, each under its training name with ZOConfig's type (``| None``
    where the training default is None) and the training default. A ZO option added to one and not
    the other fails here."""
    exposed = list(train_fields())
    declared = dataclasses.fields(TrainConfig)[-len(exposed):]
    assert [f.name for f in declared] == [train_name(f) for f in exposed]
    for mine, theirs in zip(declared, exposed):
        default = theirs.metadata["train_default"]
        assert mine.default == default, mine.name
        assert mine.type == (theirs.type if default == theirs.default else f"{theirs.type} | None"), mine.name
    run_own = {f.name for f in dataclasses.fields(TrainConfig)[:-len(exposed)]}
    assert not run_own & {train_name(f) for f in dataclasses.fields(ZOConfig)}  # no option declared twice
