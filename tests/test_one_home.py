"""One home per concept (issue 30 item 2): the mode lists are derived from the mode classes, the
paper's lr/eps defaults are written once (hosl/optim/config.py), and the client's slice size lives
in one place per mode. Each test fails if a second copy comes back."""

import ast
from pathlib import Path

import pytest

import hosl.training.loop
import hosl.training.protocol
import hosl.training.remote
import hosl.training.run
import hosl.training.server_handler
from hosl.optim.config import FO_CLIENT_LR, LORA_ZO_EPS, LORA_ZO_LR, ZO_EPS, ZO_LR, ZOConfig
from hosl.training import modes
from hosl.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# -- the mode lists ----------------------------------------------------------------------------------

def test_the_mode_lists_are_the_mode_classes_attributes():
    classes = modes.MODE_CLASSES
    assert modes.MODES == tuple(c.name for c in classes) and len(set(modes.MODES)) == len(classes)
    assert modes.SPLIT_MODES == tuple(c.name for c in classes if issubclass(c, modes.SplitMode))
    assert modes.ZO_CLIENT_MODES == tuple(c.name for c in classes if hasattr(c, "plan_client_memory"))
    assert set(modes.CLIENT_SLICING_MODES) == set(modes.SPLIT_MODES) & set(modes.ZO_CLIENT_MODES)
    assert not set(modes.FO_CLIENT_MODES) & set(modes.ZO_CLIENT_MODES)


def test_the_protocol_and_its_users_read_the_split_modes_of_the_modes_module():
    assert not hasattr(hosl.training.protocol, "SPLIT_MODES")
    for module in (hosl.training.server_handler, hosl.training.loop, hosl.training.remote, hosl.training.run):
        assert module.SPLIT_MODES is modes.SPLIT_MODES, module.__name__


def test_no_literal_list_of_mode_names_in_the_training_package():
    """A tuple, list or set literal naming two modes or more is a second copy of a mode list."""
    found = []
    for path in sorted((ROOT / "hosl" / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in modes.MODES]
                if len(names) >= 2:
                    found.append(f"{path.name}:{node.lineno} {names}")
    assert not found


def test_the_cli_offers_the_modes_and_a_wrong_mode_for_slicing_names_the_right_ones():
    from hosl.cli import build_parser

    (mode,) = [a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
               if "--mode" in a.option_strings]
    assert tuple(mode.choices) == modes.MODES
    with pytest.raises(ValueError, match=r"\(--mode hosl or zo-sl\)( or .*\(--mode fo-sl\))?, got --mode fo"):
        TrainConfig(mode="fo", client_micro_batch=2).validate()


# -- the paper's lr / eps ------------------------------------------------------------------------------

def test_the_defaults_resolve_to_the_one_set_of_constants():
    assert (ZOConfig().lr, ZOConfig().eps) == (ZO_LR, ZO_EPS)
    assert (TrainConfig().resolved_lr_client(), TrainConfig().resolved_eps()) == (ZO_LR, ZO_EPS)
    lora = TrainConfig(lora=True)
    assert (lora.resolved_lr_client(), lora.resolved_eps()) == (LORA_ZO_LR, LORA_ZO_EPS)
    assert TrainConfig(mode="fo-sl").resolved_lr_client() == FO_CLIENT_LR


def test_no_module_writes_the_default_lr_or_eps_again():
    """Only hosl/optim/config.py holds the numbers; the training config, the CLI and the Trainer read them."""
    values = {ZO_LR, LORA_ZO_LR, LORA_ZO_EPS}  # not ZO_EPS: 1e-3 is also the server's lr and the demo's eps
    found = []
    for rel in ("hosl/training/config.py", "hosl/training/modes.py", "hosl/cli.py", "hosl/cli_options.py",
                "hosl/integrations/trainer.py"):
        for node in ast.walk(ast.parse((ROOT / rel).read_text())):
            if isinstance(node, ast.Constant) and type(node.value) is float and node.value in values:
                found.append(f"{rel}:{node.lineno} {node.value}")
    assert not found


def test_the_help_quotes_the_constants():
    from hosl.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for value in (ZO_LR, LORA_ZO_LR, FO_CLIENT_LR, LORA_ZO_EPS):
        mantissa, _, exponent = f"{value:.0e}".partition("e")
        assert f"{mantissa}e{int(exponent)}" in text


# -- the client's slice size ---------------------------------------------------------------------------

def test_the_client_slice_size_lives_in_one_place_per_mode():
    """HOSL: the optimizer's setting (it slices its own passes), read and set through the mode; zo-sl:
    the mode's. The run's settings (``hp.zo``) stay as given."""
    from torch import nn

    hp = modes.Hyper(zo=ZOConfig(client_micro_batch=2))
    mode = modes.make_mode("hosl", nn.Linear(2, 2), None, hp, loss_of=None, proxy=object())
    assert mode.client_micro_batch == 2
    mode.opt.client_micro_batch = 3
    assert mode.client_micro_batch == 3  # no copy of its own to fall out of step
    mode.set_client_micro_batch(4)
    assert (mode.opt.client_micro_batch, mode.opt.config.client_micro_batch, hp.zo.client_micro_batch) == (4, 4, 2)
    zosl = modes.make_mode("zo-sl", nn.Linear(2, 2), None, hp, loss_of=None, proxy=object())
    assert zosl.client_micro_batch == 2 and zosl.opt.config.client_micro_batch is None
    with pytest.raises(ValueError, match="--client-micro-batch"):
        zosl.set_client_micro_batch(0)
    assert zosl.client_micro_batch == 2


def test_hyper_declares_the_zo_options_it_offers_and_no_others():
    """``Hyper`` has no ``__getattr__``: what it reads from its ZOConfig is declared, the rest is ``hp.zo``."""
    assert "__getattr__" not in vars(modes.Hyper)
    hp = modes.Hyper(zo=ZOConfig(lr=2e-3, weight_decay=0.1, seed=4, server_estimate="linear", linear_on="client"))
    assert (hp.lr_client, hp.weight_decay) == (2e-3, 0.1)
    for zo_only in ("seed", "server_estimate", "linear_on", "zo_optimizer"):  # read as hp.zo.<field>
        with pytest.raises(AttributeError):
            getattr(hp, zo_only)


def test_every_mode_has_its_forward_pass_count():
    from hosl.training.loop import forward_passes_per_step

    for name in modes.MODES:
        passes = forward_passes_per_step(name, 2, "central")
        assert set(passes) == {"client_forward", "server_forward", "client_backward", "server_backward"}, name
