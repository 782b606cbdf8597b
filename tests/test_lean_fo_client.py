"""The lean FO-SL client (hosl/training/lean_fo_client.py): micro-batched gradient accumulation,
per-block activation checkpointing and the SGD step fused into backward each give the plain FO-SL
step's weights (checkpointing and the fused step bit for bit; micro-batching up to the summation
order of the slices' gradients), each lowers the client's peak of live tensors, and what they cannot
do is refused with one clear error."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from hosl.cli import main
from hosl.models import load_model, split
from hosl.training.config import TrainConfig
from hosl.training.lean_fo_client import FusedSGDStep, LeanFOClient, checkpoint_blocks
from hosl.training.memory import LiveTensorPeak

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

FAMILIES = {"tiny-opt": "causal_lm", "tiny-llama": "causal_lm", "tiny-bert": "sequence_classification"}
B, T = 8, 12
# micro-batching sums the slices' gradients in another order than one backward over the batch: its
# weights may differ from the plain step's by this fraction of the largest weight change two steps make
MICRO_BATCH_RTOL = 1e-5


def _client(name="tiny-opt", cut=2):
    kind = FAMILIES[name]
    model, _ = load_model(name, kind, num_labels=2 if kind != "causal_lm" else None)
    model.eval()
    client, _ = split(model, cut=cut)
    return client


def _batch(seed=0, rows=B, length=T):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask


def _backprop(h):
    """A fixed, row-separable 'server': mean over rows of a projection of each row, squared."""
    h = h.detach().requires_grad_(True)
    w = torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)
    loss = ((h @ w) ** 2).sum(-1).mean()
    loss.backward()
    return float(loss.detach()), h.grad


def _train(client, steps=2, weight_decay=0.0, **options):
    opt = torch.optim.SGD(client.parameters(), lr=0.01, momentum=0.9, weight_decay=weight_decay)
    lean = LeanFOClient(client, opt, **options)
    for step in range(steps):
        ids, mask = _batch(step)
        lean.step(lambda rows, ids=ids, mask=mask: client(ids[rows], mask[rows]), ids.shape[0], _backprop)
    return client


def _assert_weights(a, b, rtol=0.0, start=None):
    """``a`` and ``b`` equal bit for bit (``rtol=0``), or within ``rtol`` of ``a``'s largest change from ``start``."""
    if rtol == 0:
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
        return
    moved = max((p - s).abs().max().item() for p, s in zip(a.parameters(), start.parameters()))
    assert moved > 0
    worst = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert worst <= rtol * moved, (worst, moved)


def _assert_weights(a, b, rtol=0.0, start=None):
    """``a`` and ``b`` equal bit for bit (``rtol=0``), or within ``rtol`` of ``a``'s largest change from ``start``."""
    if rtol == 0:
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
        return
    moved = max((p - s).abs().max().item() for p, s in zip(a.parameters(), start.parameters()))
    assert moved > 0
    worst = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert worst <= rtol * moved, (worst, moved)


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("options,rtol", [
    (dict(checkpointing=True), 0.0),
    (dict(fused_step=True), 0.0),
    (dict(micro_batch=3), MICRO_BATCH_RTOL),  # 8 rows: slices of 3, 3, 2
    (dict(micro_batch=3, checkpointing=True, fused_step=True), MICRO_BATCH_RTOL),
])
def test_lean_options_give_the_plain_step_weights(family, options, rtol):
    start = _client(family)
    plain = _train(copy.deepcopy(start))
    lean = _train(copy.deepcopy(start), **options)
    assert not all(torch.equal(p, q) for p, q in zip(plain.parameters(), start.parameters()))
    _assert_weights(plain, lean, rtol, start)


def test_fused_step_with_weight_decay_is_bit_identical():
    start = _client()
    _assert_weights(_train(copy.deepcopy(start), weight_decay=0.01),
                    _train(copy.deepcopy(start), weight_decay=0.01, fused_step=True))


def test_checkpointing_replays_dropout():
    """With dropout on, the checkpointed blocks recompute with the masks of their first run."""
    start = _client()
    start.train()
    torch.manual_seed(5)
    plain = _train(copy.deepcopy(start))
    torch.manual_seed(5)
    _assert_weights(plain, _train(copy.deepcopy(start), checkpointing=True))


def _peak(client, **options):
    """Peak bytes of live tensors over one steady-state step (momentum buffers already there)."""
    opt = torch.optim.SGD(client.parameters(), lr=0.01, momentum=0.9)
    for p in client.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    lean = LeanFOClient(client, opt, **options)
    ids, mask = _batch(0, rows=16, length=64)
    grad = torch.randn(16, 64, client.config.hidden_size)
    probe = LiveTensorPeak()
    with probe:
        lean.step(lambda rows: client(ids[rows], mask[rows]), 16, lambda h: (1.0, grad))
    return probe.peak


@pytest.mark.parametrize("options", [dict(micro_batch=4), dict(checkpointing=True), dict(fused_step=True)])
def test_each_option_lowers_the_client_peak(options):
    start = _client("tiny-opt")
    plain, lean = _peak(copy.deepcopy(start)), _peak(copy.deepcopy(start), **options)
    assert lean < plain, (options, lean, plain)


def test_refusals():
    client = _client()
    with pytest.raises(ValueError, match="--client-fused-step applies plain SGD"):
        FusedSGDStep(torch.optim.AdamW(client.parameters()))
    with pytest.raises(ValueError, match="without nesterov"):
        FusedSGDStep(torch.optim.SGD(client.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(ValueError, match="without dampening"):
        FusedSGDStep(torch.optim.SGD(client.parameters(), lr=0.1, momentum=0.9, dampening=0.5))
    with pytest.raises(ValueError, match="--client-micro-batch must be an integer >= 1"):
        LeanFOClient(client, torch.optim.SGD(client.parameters(), lr=0.1), micro_batch=0)
    with pytest.raises(ValueError, match="--client-checkpointing needs a split client"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("flag_name", ["client_checkpointing", "client_fused_step"])
def test_train_config_takes_the_options_for_fo_sl_only(flag_name):
    TrainConfig(mode="fo-sl", **{flag_name: True}, client_micro_batch=4).validate()
    with pytest.raises(ValueError, match=f"--{flag_name.replace('_', '-')} applies to a first-order client"):
        TrainConfig(mode="hosl", **{flag_name: True}).validate()
    with pytest.raises(ValueError, match="must be true or false"):
        TrainConfig(mode="fo-sl", **{flag_name: "yes"}).validate()


def test_fo_sl_refuses_a_memory_budget():
    with pytest.raises(ValueError, match="--client-memory-budget slices the passes of a ZO client"):
        TrainConfig(mode="fo-sl", client_memory_budget="1GiB").validate()


# -- hosl train --mode fo-sl with the options: the same losses as the plain run ---------------------

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")
@pytest.mark.slow
def test_hosl_train_fo_sl_lean_matches_the_plain_run(tmp_path):
    def args(out, *extra):
        return ["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", "fo-sl",
                "--cut", "2", "--steps", "3", "--batch-size", "5", "--train-size", "15", "--eval-size", "4",
                "--max-length", "40", "--lr-client", "1e-2", "--lr-server", "1e-2", "--eval-every", "3",
                "--out", str(tmp_path / out), "--no-progress", *extra]

    assert main(args("plain")) == 0
    assert main(args("lean", "--client-micro-batch", "2", "--client-checkpointing", "--client-fused-step")) == 0
    plain, lean = _losses(tmp_path / "plain"), _losses(tmp_path / "lean")
    assert len(plain) == 3 and plain[0] != plain[-1]
    torch.testing.assert_close(torch.tensor(lean), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "lean" / "config.json").read_text())
    assert config["client_checkpointing"] is True and config["client_fused_step"] is True
