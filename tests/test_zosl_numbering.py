"""ZO-SL is MeZO on the whole model: the server half's coordinates continue after the client's, so
ZO-SL at any cut moves the weights bit for bit as the unsplit ``zo`` mode does from the same seeds."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hosl.models import load_model, split
from hosl.training.run import loss_fn
from hosl.optim.config import ZOConfig
from hosl.training.modes import Hyper, make_mode
from hosl.training.protocol import PHASE_NAMES
from hosl.training.server_handler import ServerHandler
from hosl.training.server_proxy import ServerProxy
from hosl.transport import InProcessLink

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))


def _halves(cut, name="tiny-opt"):
    model, _ = load_model(name, "sequence_classification", num_labels=2, seed=0)
    client, server = split(model, cut=cut)
    client.train(False)  # dropout off, as the training loop has it in every ZO mode
    return client, server


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 200, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def _train(mode_name, cut, hp, steps=3, name="tiny-opt"):
    client, server = _halves(cut, name)
    loss_of = loss_fn("classifier")
    if mode_name == "zo-sl":
        half = ServerHandler(server, "zo-sl", hp, loss_of, "classifier", train_dropout=False)
        mode = make_mode("zo-sl", client, None, hp, loss_of,
                         proxy=ServerProxy(InProcessLink(half.handle, PHASE_NAMES), "classifier"))
    else:
        server.train(False)
        mode = make_mode(mode_name, client, server, hp, loss_of)
    losses = []
    for step in range(1, steps + 1):
        mode.step_number = step
        losses.append(mode.step(_batch()))
    return losses, client, server


def _assert_bitwise_equal(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_zo_sl_equals_unsplit_zo_bit_for_bit(cut):
    hp = Hyper(zo=ZOConfig(lr=1e-2, eps=1e-2, num_queries=3, weight_decay=0.1, seed=5), lr_server=0.0)
    zo_losses, zo_client, zo_server = _train("zo", cut, hp)
    sl_losses, sl_client, sl_server = _train("zo-sl", cut, hp)
    assert sl_losses == zo_losses
    _assert_bitwise_equal(sl_client, zo_client)
    _assert_bitwise_equal(sl_server, zo_server)
    # and the weights did move, on both halves
    start_client, start_server = _halves(cut)
    assert not all(torch.equal(p, q) for p, q in zip(start_client.parameters(), sl_client.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(start_server.parameters(), sl_server.parameters()))


@pytest.mark.parametrize("direction,variant,difference", [("sphere", "momentum", "central"),
                                                          ("rademacher", "sgd", "forward")])
def test_zo_sl_equals_unsplit_zo_with_other_families_and_rules(direction, variant, difference):
    hp = Hyper(zo=ZOConfig(lr=1e-2, eps=1e-2, num_queries=2, seed=1, direction=direction, variant=variant,
                           difference=difference), lr_server=0.0)
    zo_losses, zo_client, zo_server = _train("zo", 2, hp, name="tiny-llama")
    sl_losses, sl_client, sl_server = _train("zo-sl", 2, hp, name="tiny-llama")
    assert sl_losses == zo_losses
    _assert_bitwise_equal(sl_client, zo_client)
    _assert_bitwise_equal(sl_server, zo_server)


def test_server_half_direction_is_not_a_copy_of_the_clients():
    """The old bug: both halves numbered from 0, so the server moved along the client's first
    coordinates. Now the server's first coordinate is the client's count."""
    client, server = _halves(1)
    hp = Hyper(zo=ZOConfig(lr=1e-2, eps=1e-2, num_queries=1), lr_server=0.0)
    half = ServerHandler(server, "zo-sl", hp, loss_fn("classifier"), "classifier", train_dropout=False)
    mode = make_mode("zo-sl", client, None, hp, loss_fn("classifier"),
                     proxy=ServerProxy(InProcessLink(half.handle, PHASE_NAMES), "classifier"))
    mode.step_number = 1
    mode.step(_batch())
    client_count = mode.opt.layouts[0].numel
    assert half.zo.layouts[0].offset == client_count == sum(p.numel() for p in client.parameters())
    with pytest.raises(ValueError, match="coordinate"):
        half.zo_for(client_count + 1)


@pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")
@pytest.mark.slow
def test_hosl_train_zo_sl_and_zo_write_the_same_weights(tmp_path):
    from hosl.cli import main

    def args(mode):
        return ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", mode,
                "--cut", "1", "--steps", "3", "--batch-size", "4", "--train-size", "16", "--eval-size", "8",
                "--num-queries", "2", "--max-length", "48", "--lr-client", "1e-3", "--eval-every", "3",
                "--out", str(tmp_path / mode), "--no-progress"]

    assert main(args("zo")) == 0 and main(args("zo-sl")) == 0
    for half in ("client", "server"):
        a = load_file(str(tmp_path / "zo" / f"checkpoints/step-3/{half}.safetensors"))
        b = load_file(str(tmp_path / "zo-sl" / f"checkpoints/step-3/{half}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), half


@pytest.mark.parametrize("mode", ["hosl", "fo-sl", "zo-sl", "frozen-client", "fo", "zo"])
def test_one_dropout_policy_for_every_mode(mode):
    from hosl.cli import build_parser
    from hosl.training.config import TrainConfig
    from hosl.training.run import train_dropout

    args = build_parser().parse_args(["train", "--mode", mode])
    assert args.dropout == "off" and train_dropout(TrainConfig(mode=mode)) is False
    assert build_parser().parse_args(["train", "--mode", mode, "--dropout", "on"]).dropout == "on"
    assert train_dropout(TrainConfig(mode=mode, dropout="on")) is True
    with pytest.raises(ValueError, match="--dropout"):
        TrainConfig(mode=mode, dropout="maybe").validate()


@pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")
@pytest.mark.slow
def test_zo_sl_resume_equals_uninterrupted(tmp_path):
    """The server half's ZO state waits for its optimizer (built at the first begin-step) on resume."""
    from hosl.cli import main

    def args(out, steps, *extra):
        return ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", "zo-sl",
                "--cut", "1", "--steps", str(steps), "--batch-size", "4", "--train-size", "16", "--eval-size", "8",
                "--num-queries", "2", "--max-length", "48", "--lr-client", "1e-3", "--zo-optimizer", "momentum",
                "--eval-every", "2", "--out", str(out), "--no-progress", *extra]

    assert main(args(tmp_path / "straight", 4)) == 0
    assert main(args(tmp_path / "split", 2)) == 0
    assert main(args(tmp_path / "split", 4, "--resume")) == 0
    for half in ("client", "server"):
        a = load_file(str(tmp_path / "straight" / f"checkpoints/step-4/{half}.safetensors"))
        b = load_file(str(tmp_path / "split" / f"checkpoints/step-4/{half}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), half
