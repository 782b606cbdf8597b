"""The last bad inputs of issue 35: each gets a one-line error naming what was wrong (and changes
nothing) or the right result (docs/reliability.md, "Faults tried")."""

import csv

import pytest
import torch
from torch import nn

from hosl import ops
from hosl.cli import main
from hosl.optim import HybridOrderOptimizer
from hosl.tasks.custom import FileTaskOptions, sample_file_task
from hosl.tasks.data import DataError
from hosl.training.memory import parse_bytes


def test_mixed_numeric_and_named_labels_are_refused_naming_both_sets(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *[(f"row {i}", ["0", "1", "neg", "pos"][i % 4]) for i in range(8)]])
    opts = FileTaskOptions(task="custom", train_file=str(path), text_field="text", label_field="label")
    with pytest.raises(DataError, match=r"mixes numeric labels \(0, 1\) with named ones \(neg, pos\)"):
        sample_file_task(opts, train_size=8, eval_size=2)
    listed = FileTaskOptions(task="custom", train_file=str(path), text_field="text", label_field="label",
                             verbalizer="0=zero,1=one,neg=bad,pos=good")  # four classes, said so
    assert sample_file_task(listed, train_size=8, eval_size=2).num_labels == 4


def _halves():
    torch.manual_seed(0)
    return nn.Linear(4, 4), nn.Linear(4, 2), torch.randn(2, 4), torch.tensor([0, 1])


def test_a_server_optimizer_over_another_module_is_refused_at_the_first_step_and_nothing_changes():
    client, server, x, y = _halves()
    other = nn.Linear(3, 3)
    before = [p.detach().clone() for p in (*client.parameters(), *other.parameters())]
    opt = HybridOrderOptimizer(client, torch.optim.SGD(other.parameters(), lr=0.1), num_queries=1)
    with pytest.raises(ValueError, match="none of server_optimizer's 2 parameters got a gradient .*pass server="):
        opt.step(lambda: client(x), lambda h: nn.functional.cross_entropy(server(h), y))
    assert all(torch.equal(a, b) for a, b in zip(before, (*client.parameters(), *other.parameters())))
    assert opt.steps_taken == 0
    right = HybridOrderOptimizer(client, torch.optim.SGD(server.parameters(), lr=0.1), num_queries=1)
    right.step(lambda: client(x), lambda h: nn.functional.cross_entropy(server(h), y))
    assert right.steps_taken == 1


@pytest.mark.parametrize("value", [None, "0.5"])
def test_a_server_loss_fn_that_returns_no_loss_is_named(value):
    client, _server, x, _y = _halves()
    opt = HybridOrderOptimizer(client, None, num_queries=1)
    with pytest.raises(TypeError, match=f"server_loss_fn must return the loss as a tensor .*got {type(value).__name__}"):
        opt.step(lambda: client(x), lambda h: value)


def test_a_seed_beyond_63_bits_is_refused_with_its_range():
    client, *_ = _halves()
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\], got 1180591620717411303424"):
        HybridOrderOptimizer(client, None, num_queries=1, seed=2**70)


@pytest.mark.parametrize("family", ["gaussian", "sphere"])
def test_randn_on_the_meta_device_gives_the_shape_as_torch_randn_does(family):
    z = ops.randn(7, 5, family=family, device="meta")
    assert z.device.type == "meta" and z.shape == (5,) and z.dtype == torch.float32
    with pytest.raises(ValueError, match="numel"):
        ops.randn(7, -1, device="meta")  # the arguments are still checked


def test_memory_budget_too_large_is_one_line():
    with pytest.raises(ValueError, match=r"--client-memory-budget must be a size below 8 EiB .*'1e400'"):
        parse_bytes("1e400")
    assert parse_bytes("1e3") == 1000


@pytest.mark.parametrize("argv,message", [
    (["--lr-client", "-1e-3"], "--lr-client must be >= 0 and finite, got -0.001"),
    (["--client-memory-budget", "-1GiB"], "--client-memory-budget must be a size"),
    (["--client-memory-budget", "1e400"], "--client-memory-budget must be a size below 8 EiB"),
])
def test_negative_and_huge_values_reach_the_options_own_check(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-opt", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "expected one argument" not in err and "Traceback" not in err
    assert not out.exists()


def test_a_config_file_with_a_null_setting_is_refused_naming_it(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("out: null\nsteps: 1\n")
    assert main(["train", "--model", "tiny-opt", "--config", str(config)]) == 2
    assert "out is null; give it a value (or leave the key out for its default, 'runs/hosl')" in capsys.readouterr().err


def test_delta8_never_decodes_a_finite_float16_value_to_inf_and_keeps_its_bound():
    from hosl.transport import codecs

    t = torch.tensor([[65504.0, -65504.0]], dtype=torch.float16)
    reference = torch.tensor([[64896.0, 65504.0]], dtype=torch.float16)  # the first delta rounds up by ~420
    out = codecs.decode(codecs.encode(t, "delta8", reference), "delta8", reference)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert ((out.float() - t.float()).abs() <= codecs.error_bound("delta8", t, reference)).all()


def test_a_metrics_file_that_cannot_be_rewritten_is_named_and_no_tmp_is_left(tmp_path, monkeypatch):
    from pathlib import Path

    from hosl.training.run import _drop_metrics_after

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    before = metrics.read_text()

    def immutable(self, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "replace", immutable)
    with pytest.raises(OSError, match=f"cannot rewrite {metrics} to resume \\(Operation not permitted\\)"):
        _drop_metrics_after(metrics, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"] and metrics.read_text() == before


def test_a_rendezvous_nobody_hosts_ends_in_one_line_without_cpp_frames():
    import socket
    import subprocess
    import sys
    import textwrap

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import time
        from hosl.transport.distributed import open_store
        open_store("127.0.0.1", {port}, 1, time.monotonic() + 2, 2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ConnectError: could not reach the rendezvous" in proc.stderr
    assert f"nothing listens on port {port}" in proc.stderr and "frame #" not in proc.stderr, proc.stderr
