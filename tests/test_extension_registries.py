"""The extension points are registries: a direction family, an update rule and an architecture
registered from outside hosl (here, this test module) reach every place that lists or dispatches on
them -- the CLI's choices and help, ZOConfig's checks, the finite guard, the Triton compile check,
``split`` and LoRA's defaults -- with no edit to hosl, and are gone once unregistered."""

from __future__ import annotations

import argparse
import contextlib
import math

import pytest
import torch
from torch import nn

from hosl.cli import build_parser
from hosl.directions.families import FAMILIES, FAMILY_CODES, DirectionFamily, direction_reference
from hosl.forward.layout import ParameterLayout
from hosl.models import split
from hosl.models.architectures import ARCHITECTURES, Architecture, is_encoder, of_model
from hosl.models.lora import default_lora_targets
from hosl.optim.config import ZOConfig
from hosl.optim.rules import RULES, UpdateRule, rule_state_nbytes, update_is_safe, zo_step

HYPER = dict(lr=0.1, weight_decay=0.0, momentum=0.9, betas=(0.9, 0.999), adam_eps=1e-8)


def _dummy_reference(seed, numel, offset=0):
    return torch.full((numel,), 3.0)


DUMMY_FAMILY = DirectionFamily("dummy_family", code=max(FAMILY_CODES.values()) + 1, reference=_dummy_reference,
                               max_abs=lambda numel: 1e38, help="a test family", compile_dtypes=(torch.float16,))

steps_taken = []
DUMMY_RULE = UpdateRule("dummy_rule", state_elements=3, step=lambda layout, *a, **k: steps_taken.append(layout),
                        bound=lambda m, d, params, state, **hyper: m, help="a test rule")


class DummyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = argparse.Namespace(model_type="dummy_arch")
        self.proj = nn.Linear(2, 2)


DUMMY_ARCH = Architecture("dummy_arch", "DummyNet", (DummyModel,), lambda model, cut: (nn.Identity(), nn.Linear(1, 1)),
                          lora_targets=("proj",), encoder=True)


@pytest.fixture
def registered():
    with contextlib.ExitStack() as stack:
        stack.enter_context(FAMILIES.registered(DUMMY_FAMILY))
        stack.enter_context(RULES.registered(DUMMY_RULE))
        stack.enter_context(ARCHITECTURES.registered(DUMMY_ARCH))
        yield


def _train_action(dest):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices["train"]._actions if a.dest == dest)


def test_the_cli_and_zo_config_offer_the_new_entries(registered):
    direction, rule = _train_action("direction"), _train_action("zo_optimizer")
    assert "dummy_family" in direction.choices and "dummy_family (a test family)" in direction.help
    assert "dummy_rule" in rule.choices and "dummy_rule (a test rule)" in rule.help
    assert "DummyNet" in _train_action("model").help and "proj for DummyNet" in _train_action("lora_targets").help
    config = ZOConfig(direction="dummy_family", variant="dummy_rule")
    assert (config.direction, config.variant) == ("dummy_family", "dummy_rule")


def test_the_entries_are_gone_once_unregistered():
    assert "dummy_family" not in _train_action("direction").choices
    assert "dummy_rule" not in _train_action("zo_optimizer").choices
    assert "DummyNet" not in _train_action("model").help
    with pytest.raises(ValueError, match="direction must be one of"):
        ZOConfig(direction="dummy_family")


def test_the_family_reaches_the_reference_and_the_finite_guard(registered):
    assert torch.equal(direction_reference("dummy_family", 1, 4), torch.full((4,), 3.0))
    assert FAMILY_CODES["dummy_family"] == DUMMY_FAMILY.code
    layout = ParameterLayout(nn.Linear(3, 2))
    # the Gaussian bound (5.8) lets this step through; the dummy family's bound (1e38) does not
    assert update_is_safe("sgd", layout, [10.0], {}, direction="gaussian", **HYPER)
    assert not update_is_safe("sgd", layout, [10.0], {}, direction="dummy_family", **HYPER)


def test_the_family_reaches_the_compile_check(registered):
    pytest.importorskip("triton")
    from hosl.kernels.api import aot_specs

    variants = {(fn.__name__, cst.get("DTYPE")) for fn, _, cst in aot_specs() if cst.get("FAMILY") == DUMMY_FAMILY.code}
    assert variants == {("randn_kernel", None), ("perturb_kernel", 1), ("zo_update_kernel", 1)}


def test_the_rule_reaches_the_step_the_guard_and_the_memory_planner(registered):
    layout = ParameterLayout(nn.Linear(3, 2))
    steps_taken.clear()
    zo_step("dummy_rule", layout, [1], [1.0], {}, direction="gaussian", **HYPER)
    assert steps_taken == [layout]
    assert update_is_safe("dummy_rule", layout, [1.0], {}, **HYPER)
    assert rule_state_nbytes("dummy_rule", 10) == 4 * 3 * 10


def test_the_architecture_reaches_split_lora_and_the_encoder_check(registered):
    model = DummyModel()
    assert of_model(model) is DUMMY_ARCH
    client, server = split(model, 1)
    assert isinstance(client, nn.Identity) and isinstance(server, nn.Linear)
    assert default_lora_targets(model) == ("proj",)
    assert is_encoder("dummy_arch") and not is_encoder("opt")


def test_registries_refuse_a_second_entry_with_a_taken_name_or_code():
    with pytest.raises(ValueError, match="already registered"):
        RULES.register(DUMMY_RULE.__class__("sgd", 0, DUMMY_RULE.step, DUMMY_RULE.bound, ""))
    with pytest.raises(ValueError, match="code=0 is 'gaussian'"):
        FAMILIES.register(DirectionFamily("other", 0, _dummy_reference, lambda n: 1.0, help=""))
    assert math.isfinite(FAMILIES["gaussian"].max_abs(10))
