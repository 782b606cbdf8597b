"""Two-process training (client and server over torch.distributed/gloo on 127.0.0.1) against
in-process runs: same losses, same bytes, same final weights; dead peers; resume; refusal."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hosl.cli import main

pytestmark = [pytest.mark.filterwarnings("ignore:hosl. no compiled kernels"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
SECRET = "a-shared-secret-for-the-tests"
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _args(out, mode="hosl", steps=4, *extra):
    return ["--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", mode, "--cut", "1",
            "--steps", str(steps), "--batch-size", "4", "--train-size", "16", "--eval-size", "8",
            "--num-queries", "2", "--max-length", "48", "--lr-client", "1e-3", "--lr-server", "1e-2",
            "--eval-every", "2", "--checkpoint-every", "2", "--out", str(out), "--no-progress", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out, mode="hosl", steps=4, *extra, port, peer_timeout=20):
    conn = ["--master-addr", "127.0.0.1", "--master-port", str(port), "--peer-timeout", str(peer_timeout)]
    cmd = [sys.executable, "-m", "hosl"]
    env = dict(os.environ, HOSL_SECRET=SECRET)  # both sides prove it (hosl/transport/auth.py)
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    server = subprocess.Popen([*cmd, "serve", "--rank", "1", *_args(out, mode, steps, *extra), *conn], **common)
    client = subprocess.Popen([*cmd, "train", "--role", "client", "--rank", "0", *_args(out, mode, steps, *extra), *conn],
                              **common)
    return client, server


def _finish(proc, timeout=90):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses_by_step(run):
    """step -> loss, the last record of each step winning (a resumed run repeats the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _assert_same_weights(a: Path, b: Path):
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def _wait_for_step(run, step, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(r.get("step", 0) >= step and "loss" in r for r in _records(run)):
            return
        assert proc.poll() is None, _finish(proc)[1]
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


@needs_data
@pytest.mark.parametrize("mode", ["hosl", "fo-sl", "zo-sl", "frozen-client"])
def test_two_processes_match_one_process(tmp_path, mode):
    client, server = _start(tmp_path / "two", mode, port=_free_port())
    assert main(["train", *_args(tmp_path / "one", mode)]) == 0  # in-process reference, meanwhile
    (rc_c, out_c), (rc_s, out_s) = _finish(client), _finish(server)
    assert rc_c == 0 and rc_s == 0, out_c + out_s
    one, two = tmp_path / "one", tmp_path / "two" / "client"
    keys = ("step", "loss", "bytes_up", "bytes_down", "eval_accuracy", "eval_loss")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs]  # noqa: E731
    assert strip(_records(two)) == strip(_records(one))  # bit-identical losses, evaluations and traffic
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in _records(two) if "loss" in r)
    _assert_same_weights(one / "checkpoints/step-4/client.safetensors", two / "checkpoints/step-4/client.safetensors")
    _assert_same_weights(one / "checkpoints/step-4/server.safetensors",
                         tmp_path / "two/server/checkpoints/step-4/server.safetensors")
    summary = json.loads((two / "summary.json").read_text())
    h = 4 * 48 * 32 * 4  # rows x at most max_length tokens x hidden x fp32: the activation bounds the traffic
    if mode == "fo-sl":  # one activation up, its gradient down
        assert summary["bytes_down_per_step"] > summary["bytes_up_per_step"] / 2
    else:  # hosl, zo-sl: 2Q+ activations up, only losses down
        assert summary["bytes_down_per_step"] < 1000 < h < summary["bytes_up_per_step"]


@needs_data
@pytest.mark.slow
def test_the_authors_step_over_two_processes_matches_one_process(tmp_path):
    """--server-grad perturbed --client-update per-direction: the weighted-backward requests cross the
    socket and give the in-process run's losses and weights bit for bit."""
    authors = ("--server-grad", "perturbed", "--client-update", "per-direction")
    client, server = _start(tmp_path / "two", "hosl", 2, *authors, port=_free_port())
    assert main(["train", *_args(tmp_path / "one", "hosl", 2, *authors)]) == 0
    (rc_c, out_c), (rc_s, out_s) = _finish(client), _finish(server)
    assert rc_c == 0 and rc_s == 0, out_c + out_s
    one, two = tmp_path / "one", tmp_path / "two" / "client"
    assert _losses_by_step(two) == _losses_by_step(one)
    _assert_same_weights(one / "checkpoints/step-2/client.safetensors", two / "checkpoints/step-2/client.safetensors")
    _assert_same_weights(one / "checkpoints/step-2/server.safetensors",
                         tmp_path / "two/server/checkpoints/step-2/server.safetensors")


@needs_data
def test_killed_server_stops_the_client_and_both_resume_to_the_uninterrupted_result(tmp_path):
    run = tmp_path / "two"
    client, server = _start(run, "hosl", 6, port=_free_port(), peer_timeout=15)
    assert main(["train", *_args(tmp_path / "one", "hosl", 6)]) == 0
    _wait_for_step(run / "client", 3, client)
    server.kill()
    rc, out = _finish(client, timeout=30)
    assert rc == 2 and "lost the server (rank 1)" in out and "phase '" in out, out
    _finish(server)

    client, server = _start(run, "hosl", 6, "--resume", port=_free_port())
    (rc_c, out_c), (rc_s, out_s) = _finish(client), _finish(server)
    assert rc_c == 0 and rc_s == 0, out_c + out_s
    assert "resumed from" in out_c
    assert _losses_by_step(run / "client") == _losses_by_step(tmp_path / "one")
    _assert_same_weights(tmp_path / "one/checkpoints/step-6/client.safetensors",
                         run / "client/checkpoints/step-6/client.safetensors")
    _assert_same_weights(tmp_path / "one/checkpoints/step-6/server.safetensors",
                         run / "server/checkpoints/step-6/server.safetensors")


@needs_data
def test_killed_client_stops_the_server(tmp_path):
    run = tmp_path / "two"
    client, server = _start(run, "zo-sl", 40, port=_free_port(), peer_timeout=15)
    _wait_for_step(run / "client", 2, client)
    client.kill()
    rc, out = _finish(server, timeout=30)
    assert rc == 2 and "lost the client (rank 0)" in out and "phase '" in out, out
    _finish(client)


@needs_data
def test_ctrl_c_on_the_client_stops_both_cleanly(tmp_path):
    run = tmp_path / "two"
    client, server = _start(run, "hosl", 40, port=_free_port())
    _wait_for_step(run / "client", 2, client)
    client.send_signal(signal.SIGINT)
    (rc_c, out_c), (rc_s, out_s) = _finish(client, 30), _finish(server, 30)
    assert rc_c == 130 and "continue with --resume" in out_c, out_c
    assert rc_s == 130 and "said goodbye (interrupted)" in out_s, out_s


# Refusing mismatched configurations is tested at the handshake in test_transport.py (same code path,
# without paying for two model loads); the CLI wiring of the fingerprint is FINGERPRINT_FIELDS below.


def test_the_fingerprint_names_what_both_sides_must_share():
    from hosl.training.config import TrainConfig
    from hosl.training.remote import fingerprint

    fp = fingerprint(TrainConfig(model="tiny-opt", cut=1, mode="hosl"))
    assert {"model", "cut", "dtype", "task", "mode", "seed"} <= fp.keys()
    assert fp["lr_client"] == 1e-6 and fp["cut"] == 1
