"""Sharded server checkpoints (hosl/training/sharded_checkpoint.py) in one process: the run's one
format, the round trip through torch.distributed.checkpoint without a process group, and the
refusals. Two server ranks writing and resharding them: tests/test_server_procs.py."""

import json

import pytest
import torch
from torch import nn

from hosl.training import checkpoint as ckpt
from hosl.training import sharded_checkpoint as sc
from hosl.training.server_group import ServerGroup


def _trained(seed: int = 0, lr: float = 0.1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i in range(2):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(run, step, model, opt, keep=2):
    sc.save_sharded(run, step, model, opt, {"step": step, "server_half": {"rng_state": torch.arange(3)}},
                    ServerGroup(), keep=keep, trainable_only=False)


def test_a_sharded_checkpoint_loads_its_weights_and_momentum_without_a_process_group(tmp_path):
    model, opt = _trained()
    _save(tmp_path, 2, model, opt)
    folder = tmp_path / "checkpoints/step-2"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "checksums.json", "state.pt"]
    assert ckpt.latest_checkpoint(tmp_path) == folder
    fresh, fresh_opt = _trained(seed=1, lr=0.5)  # other weights, other momentum, another lr
    state = sc.load_sharded(folder, fresh, fresh_opt)
    assert state["step"] == 2 and torch.equal(state["server_half"]["rng_state"], torch.arange(3))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for i, entry in opt.state_dict()["state"].items():
        assert torch.equal(fresh_opt.state_dict()["state"][i]["momentum_buffer"], entry["momentum_buffer"])
    assert fresh_opt.param_groups[0]["lr"] == 0.5  # the learning rate is this process's, not the checkpoint's


def test_a_run_keeps_the_format_it_began_with(tmp_path):
    assert sc.choose_format(tmp_path / "new", sharded=True) == "dcp"
    assert sc.choose_format(tmp_path / "new", sharded=False) == "safetensors"
    assert sc.choose_format(None, sharded=True) == "safetensors"
    old = tmp_path / "old"  # checkpoints from before formats were recorded: one process's
    ckpt.save_checkpoint(old, 1, {"server": nn.Linear(2, 2)}, {"step": 1})
    assert sc.choose_format(old, sharded=True) == "safetensors"
    model, opt = _trained()
    _save(tmp_path / "run", 1, model, opt)  # records dcp
    assert json.loads((tmp_path / "run/checkpoints/format.json").read_text()) == {"server": "dcp"}
    assert sc.choose_format(tmp_path / "run", sharded=False) == "dcp"  # resumed at P = 1, or with ddp
    (tmp_path / "run/checkpoints/format.json").write_text('{"server": "zip"}')
    with pytest.raises(ckpt.CheckpointError, match="format 'zip'"):
        sc.choose_format(tmp_path / "run", sharded=True)


def test_a_half_written_sharded_checkpoint_is_never_the_latest(tmp_path):
    model, opt = _trained()
    _save(tmp_path, 1, model, opt)
    staging = ckpt.begin_checkpoint(tmp_path, 2)  # rank 0 died while the ranks wrote step 2's shards
    (staging / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step-1"
    assert ckpt.checkpoint_steps(tmp_path) == [1]
    _save(tmp_path, 2, model, opt)  # the next save of that step starts from an empty folder
    assert not staging.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints/step-2").iterdir())[:2] == [".metadata", "__0_0.distcp"]


def _unchanged_after_refusal(folder, match):
    fresh, fresh_opt = _trained(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError, match=match):
        sc.load_sharded(folder, fresh, fresh_opt)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_damaged_or_non_finite_or_foreign_sharded_checkpoint_is_refused_and_changes_nothing(tmp_path):
    model, opt = _trained()
    _save(tmp_path / "damaged", 1, model, opt)
    shard = tmp_path / "damaged/checkpoints/step-1/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    _unchanged_after_refusal(shard.parent, r"__0_0.distcp does not match its sha256")

    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    _save(tmp_path / "nan", 1, model, opt)
    _unchanged_after_refusal(tmp_path / "nan/checkpoints/step-1", r"NaN or Inf weights \(in model.1.weight\)")

    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))  # another model's shapes
    _save(tmp_path / "foreign", 1, other, torch.optim.SGD(other.parameters(), lr=0.1))
    _unchanged_after_refusal(tmp_path / "foreign/checkpoints/step-1", "does not fit this server half")
