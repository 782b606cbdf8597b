"""``--client-params GLOBS``: only the client parameters whose names match train, in every mode
that trains the client; everything else on the client stays bit for bit, the server still trains."""

import os
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch

from hosl.models.trainable import keep_trainable, norm_parameter_names, parse_globs
from hosl.optim.config import ZOConfig
from hosl.training.config import TrainConfig
from hosl.training.modes import Hyper, make_mode
from hosl.training.protocol import PHASE_NAMES
from hosl.training.recipes import RECIPES
from hosl.training.run import load_split_model, loss_fn
from hosl.training.server_handler import ServerHandler
from hosl.training.server_proxy import ServerProxy
from hosl.transport import InProcessLink

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

DATA = Path(os.environ.get("HOSL_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
NORMS = "*LayerNorm*"  # tiny-bert's norms: embeddings.LayerNorm.*, layers.N.{attention.output,output}.LayerNorm.*


def _cfg(**kw):
    return TrainConfig(**{"model": "tiny-bert", "task": "sst2", "cut": 2, **kw})


def _halves(**kw):
    torch.manual_seed(0)
    cfg = _cfg(**kw)
    cfg.validate()
    _kind, _tok, client, server = load_split_model(cfg)
    client.train(False)
    server.train(False)
    return client, server


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _mode(name, client, server, hp):
    loss_of = loss_fn("classifier")
    half = ServerHandler(server, name, hp, loss_of, "classifier", train_dropout=False)
    proxy = ServerProxy(InProcessLink(half.handle, PHASE_NAMES), "classifier")
    return make_mode(name, client, None, hp, loss_of, proxy=proxy), half


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("mode,pattern,options", [
    ("hosl", NORMS, {}), ("fo-sl", NORMS, {}), ("zo-sl", NORMS, {}),
    ("hosl", "*.bias", {"query_batch": 2}),  # BitFit: linears whose weight is frozen, through the batched pass
])
def test_only_the_matching_client_parameters_change(mode, pattern, options):
    client, server = _halves(mode=mode, client_params=pattern)
    matching = {n for n, _ in client.named_parameters() if fnmatchcase(n, pattern)}
    assert {n for n, p in client.named_parameters() if p.requires_grad} == matching
    # embeddings + 2 norms per block x 2 blocks, weight and bias each; or embeddings' norm + 8 per block
    assert len(matching) == (10 if pattern == NORMS else 17)
    start_client, start_server = _snapshot(client), _snapshot(server)
    hp = Hyper(zo=ZOConfig(lr=1e-2, eps=1e-2, num_queries=2, seed=1, **options), lr_server=1e-2)
    run, half = _mode(mode, client, server, hp)
    for step in (1, 2):
        run.step_number = step
        run.step(_batch())
    for name, p in client.named_parameters():
        if name in matching:
            assert not torch.equal(p, start_client[name]), f"{name} matches {pattern} but did not train"
        else:
            assert torch.equal(p, start_client[name]), f"{name} matches no pattern but changed"
    assert any(not torch.equal(p, start_server[n]) for n, p in server.named_parameters()), "the server did not train"
    if mode != "fo-sl":  # the ZO layout numbers the matching coordinates only
        numel = sum(p.numel() for n, p in client.named_parameters() if n in matching)
        assert run.opt.layouts[0].numel == numel
    if mode == "zo-sl":  # the server's coordinates start after the client's (fewer) ones
        assert half.zo.layouts[0].offset == numel


def test_a_pattern_that_matches_nothing_names_the_flag_and_changes_nothing():
    client, _ = _halves()
    with pytest.raises(ValueError, match=r"--client-params: '\*layer_norm\*' matches no trainable client") as err:
        keep_trainable(client, ["*LayerNorm.weight", "*layer_norm*"])  # fnmatch is case-sensitive
    assert "embeddings.LayerNorm.weight/.bias, " in str(err.value)  # the real names, in short
    assert "layers.*.output.LayerNorm.weight/.bias (37 in all)" in str(err.value)
    assert all(p.requires_grad for p in client.parameters())  # the first pattern matched: still nothing frozen


@pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")
def test_hosl_train_refuses_a_bad_pattern_before_writing_the_run(tmp_path, capsys):
    from hosl.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", "tiny-bert", "--task", "sst2", "--data-dir", str(DATA), "--cut", "1",
            "--steps", "1", "--train-size", "8", "--eval-size", "4", "--batch-size", "4", "--max-length", "16",
            "--out", str(out), "--no-progress", "--client-params", "*LayerNorm*,*nope*"]
    assert main(args) == 2
    assert "--client-params: '*nope*' matches no trainable client parameter" in capsys.readouterr().err
    assert not out.exists()


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--client-params has no effect with --mode frozen-client"):
        _cfg(mode="frozen-client", client_params=NORMS).validate()
    for bad in (" , ", 3):
        with pytest.raises(ValueError, match="--client-params"):
            _cfg(client_params=bad).validate()
    assert parse_globs(" *LayerNorm* ,*.bias,") == ["*LayerNorm*", "*.bias"]


def test_with_lora_it_narrows_the_adapters():
    client, _ = _halves(lora=True, lora_halves="client", client_params="*lora_A*")
    trainable = [n for n, p in client.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n for n in trainable)
    with pytest.raises(ValueError, match="matches no trainable client parameter"):  # base weights are frozen
        _halves(lora=True, lora_halves="client", client_params="*LayerNorm*")


def test_resume_and_the_handshake_refuse_other_patterns():
    from hosl.training.remote import fingerprint
    from hosl.training.run_folder import RunFolderError, compare

    run = _cfg(client_params="*LayerNorm*,*.bias").to_dict()
    assert compare(run, _cfg(client_params=" *LayerNorm* , *.bias")) == {}  # the same patterns
    for other in ("*LayerNorm*", None):
        with pytest.raises(RunFolderError, match="--client-params was"):
            compare(run, _cfg(client_params=other))
    assert fingerprint(_cfg(client_params=NORMS))["client_params"] != fingerprint(_cfg())["client_params"]


# -- the word "norms" and --recipe -------------------------------------------------------------------
@pytest.mark.parametrize("model,norm_leaves", [
    ("tiny-bert", {"LayerNorm"}),
    ("tiny-opt", {"self_attn_layer_norm", "final_layer_norm"}),
    ("tiny-llama", {"input_layernorm", "post_attention_layernorm"}),  # RMSNorm: weights only
    ("tiny-gpt2", {"ln_1", "ln_2"}),
    ("tiny-qwen3", {"input_layernorm", "post_attention_layernorm", "q_norm", "k_norm"}),
])
def test_norms_is_every_normalisation_layer_whatever_its_name(model, norm_leaves):
    torch.manual_seed(0)
    cfg = TrainConfig(model=model, task="sst2", cut=2, client_params="norms")
    cfg.validate()
    _kind, _tok, client, _server = load_split_model(cfg)
    trainable = {n for n, p in client.named_parameters() if p.requires_grad}
    assert trainable == norm_parameter_names(client)
    assert {n.split(".")[-2] for n in trainable} == norm_leaves
    assert all(p.dim() == 1 for n, p in client.named_parameters() if n in trainable)  # no weight matrix
    frozen = [n for n, p in client.named_parameters() if not p.requires_grad]
    assert any(n.endswith("weight") and "embed" not in n for n in frozen)


def test_norms_mixes_with_patterns_and_a_client_without_norms_is_refused():
    client, _ = _halves()
    kept = keep_trainable(client, ["norms", "*.query.bias"])
    assert set(kept) == norm_parameter_names(client) | {n for n in kept if n.endswith("query.bias")}
    assert any(n.endswith("query.bias") for n in kept)
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'norms' matches no trainable normalisation-layer client parameter"):
        keep_trainable(bare, ["norms"])
    assert all(p.requires_grad for p in bare.parameters())


def test_a_recipe_fills_in_only_what_is_not_given():
    recipe = RECIPES["zo-norms"]
    cfg = _cfg(recipe="zo-norms")
    cfg.validate()
    assert {name: getattr(cfg, name) for name in recipe.settings} == dict(recipe.settings)
    zo = cfg.zo_config()
    assert (zo.lr, zo.difference) == (recipe.settings["lr_client"], recipe.settings["difference"])
    mine = _cfg(recipe="zo-norms", lr_client=3e-3, client_params="*.bias", difference="central")
    mine.validate()
    assert (mine.client_params, mine.lr_client, mine.difference) == ("*.bias", 3e-3, "central")  # given values win
    again = TrainConfig(**cfg.to_dict())  # a run's config.json: the recipe's values are there
    again.validate()
    assert again.to_dict() == cfg.to_dict()


def test_difference_left_unset_is_central_for_the_run_its_resume_and_the_handshake():
    from hosl.training.remote import fingerprint
    from hosl.training.run_folder import compare

    assert _cfg().difference is None and _cfg().zo_config().difference == "central"
    assert compare(_cfg(difference="central").to_dict(), _cfg()) == {}  # a run saved before None meant central
    assert fingerprint(_cfg()) == fingerprint(_cfg(difference="central"))


def test_recipe_errors_name_the_flag_and_change_nothing():
    cfg = _cfg(mode="fo-sl", recipe="zo-norms")
    with pytest.raises(ValueError, match="--recipe zo-norms is for --mode hosl or zo-sl, got --mode fo-sl"):
        cfg.validate()
    assert cfg.client_params is None and cfg.lr_client is None
    with pytest.raises(ValueError, match="--recipe must be one of .*zo-norms.*, got 'nope'"):
        _cfg(recipe="nope").validate()


def test_a_registered_recipe_reaches_the_cli():
    from hosl.cli import build_parser
    from hosl.training.recipes import Recipe

    dummy = Recipe("dummy-recipe", "a test's recipe", {"eps": 5e-3}, modes=("hosl",), evidence="tests/")
    with RECIPES.registered(dummy):
        args = build_parser().parse_args(["train", "--recipe", "dummy-recipe"])
        assert args.recipe == "dummy-recipe"
        cfg = _cfg(recipe="dummy-recipe")
        cfg.validate()
        assert cfg.eps == 5e-3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--recipe", "dummy-recipe"])


def test_every_recipe_names_only_fields_that_default_to_none_and_its_evidence_exists():
    defaults = TrainConfig()
    root = Path(__file__).resolve().parents[1]
    for recipe in RECIPES.entries():
        assert recipe.settings and all(getattr(defaults, name) is None for name in recipe.settings), recipe.name
        assert (root / recipe.evidence).exists(), recipe.evidence
        assert recipe.modes
