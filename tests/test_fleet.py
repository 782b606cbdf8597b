"""Fleets (docs/fleet.md): the relay and catch-up formats, the update log, data shards, and real
fleets of client processes on loopback: shared client halves bit-identical and equal to a
single-process simulation written from the rules, a killed client rejoining by replay, strangers
refused."""

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

from hosl.tasks.shard import parse_shard, shard_indices
from hosl.training.fleet_client import step_seed
from hosl.training.fleet_log import UpdateLog, relayed
from hosl.training.protocol import CatchUp, Relay

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
SECRET = "a-shared-secret-for-the-fleet-tests"
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")

UPDATES = [(1, [2**64 - 5, 7], [0.25, -1.5]), (3, [11, 12], [1e-300, 3.0])]


# -- formats ----------------------------------------------------------------------------------------

def test_relay_fields_round_trip_seeds_above_int63_and_exact_floats():
    ints, floats = Relay(4, UPDATES).to_fields()
    skipped, back = Relay.from_fields(ints, floats)
    assert skipped == 4 and back == UPDATES
    assert all(-(2**63) <= i < 2**63 for i in ints)  # what an int64 tensor can carry
    with pytest.raises(ValueError, match="does not add up"):
        Relay.from_fields(ints + [5], floats)


def test_catch_up_round_trip_and_count_check():
    steps = [UPDATES, [], [UPDATES[1]]]
    start, to, back = CatchUp.from_fields(*CatchUp(2, 5, steps).to_fields())
    assert (start, to, back) == (2, 5, steps)
    with pytest.raises(ValueError, match="carries 3 steps"):
        CatchUp.from_fields(*CatchUp(2, 6, steps).to_fields())


def test_update_log_appends_in_order_survives_a_torn_line_and_truncates(tmp_path):
    log = UpdateLog(tmp_path / "log.jsonl")
    log.append(1, UPDATES)
    log.append(2, [UPDATES[0]])
    with pytest.raises(ValueError, match="cannot append step 4"):
        log.append(4, [])
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "upd')  # killed mid-write
    again = UpdateLog(tmp_path / "log.jsonl")
    assert again.last_step == 2 and again.between(0, 2) == [UPDATES, [UPDATES[0]]]
    again.truncate(1)
    assert UpdateLog(tmp_path / "log.jsonl").between(0, 1) == [UPDATES]
    with pytest.raises(ValueError, match="lacks steps"):
        again.between(0, 2)


def test_relayed_is_everyone_shared_and_own_local():
    assert relayed(UPDATES, 1, "shared") == UPDATES
    assert relayed(UPDATES, 3, "local") == [UPDATES[1]]
    assert relayed(UPDATES, 2, "local") == []


def test_step_seeds_differ_across_ranks_and_steps_and_fit_a_generator():
    seeds = {step_seed(0, r, s) for r in range(1, 9) for s in range(1, 200)}
    assert len(seeds) == 8 * 199
    assert all(0 <= s < 2**63 for s in seeds)
    assert step_seed(0, 1, 1) == step_seed(0, 1, 1) != step_seed(1, 1, 1)


# -- shards -----------------------------------------------------------------------------------------

def test_iid_shards_are_disjoint_cover_everything_and_balanced():
    labels = [i % 2 for i in range(101)]
    parts = [shard_indices(labels, r, 4, "iid", seed=3) for r in range(1, 5)]
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(101))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [shard_indices(labels, r, 4, "iid", seed=3) for r in range(1, 5)]  # every client agrees
    assert parts != [shard_indices(labels, r, 4, "iid", seed=4) for r in range(1, 5)]


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    labels = [i % 2 for i in range(2000)]

    def skew(alpha):  # mean over clients of the majority label's share
        shares = []
        for r in range(1, 5):
            idx = shard_indices(labels, r, 4, f"dirichlet:{alpha}", seed=0)
            ones = sum(labels[i] for i in idx)
            shares.append(max(ones, len(idx) - ones) / len(idx))
        return sum(shares) / len(shares)

    parts = [shard_indices(labels, r, 4, "dirichlet:0.1", seed=0) for r in range(1, 5)]
    assert sorted(i for p in parts for i in p) == list(range(2000)) and all(parts)
    assert skew(0.1) > 0.8 and skew(1000.0) < 0.6


def test_shard_errors_name_the_flag():
    with pytest.raises(ValueError, match="--shard"):
        parse_shard("random")
    with pytest.raises(ValueError, match="ALPHA"):
        parse_shard("dirichlet:-1")
    with pytest.raises(ValueError, match="--rank must be in 1..3"):
        shard_indices([0, 1], 4, 3, "iid", seed=0)
    with pytest.raises(ValueError, match="no labels"):
        shard_indices(None, 1, 2, "dirichlet:1", seed=0)
    assert shard_indices([0, 1, 0], 2, 3, "by-file", seed=0) == [0, 1, 2]


def test_fleet_options_are_checked():
    from hosl.training.config import TrainConfig

    for bad, match in ((dict(clients=-1), "--clients"), (dict(client_sync="both"), "--client-sync"),
                       (dict(clients=2, mode="fo-sl"), "fleet of hosl clients"), (dict(wire="int4"), "--wire")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad).validate()


# -- real fleets ------------------------------------------------------------------------------------

STEPS = 6


def _args(out, n, steps=STEPS, *extra):
    return ["--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", "hosl", "--cut", "1",
            "--steps", str(steps), "--batch-size", "4", "--train-size", "36", "--eval-size", "8",
            "--num-queries", "2", "--max-length", "48", "--lr-client", "1e-3", "--lr-server", "1e-2",
            "--eval-every", str(steps), "--checkpoint-every", "2", "--out", str(out), "--no-progress",
            "--clients", str(n), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(secret=SECRET):
    return dict(os.environ, HOSL_SECRET=secret, OMP_NUM_THREADS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")


def _conn(port, peer_timeout=20, connect_timeout=90):
    return ["--master-addr", "127.0.0.1", "--master-port", str(port), "--peer-timeout", str(peer_timeout),
            "--connect-timeout", str(connect_timeout)]


def _popen(cmd, secret=SECRET):
    return subprocess.Popen([sys.executable, "-m", "hosl", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(secret))


def _server(out, n, port, *extra, connect_timeout=90):
    return _popen(["serve", *_args(out, n, STEPS, *extra), *_conn(port, connect_timeout=connect_timeout)])


def _client(out, n, rank, port, *extra, secret=SECRET, connect_timeout=90):
    return _popen(["train", "--role", "client", "--rank", str(rank), *_args(out, n, STEPS, *extra),
                   *_conn(port, connect_timeout=connect_timeout)], secret=secret)


def _finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def _weights(out, rank, step=STEPS):
    return load_file(str(out / f"client{rank}" / "checkpoints" / f"step-{step}" / "client.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _simulate(n, steps=STEPS, losses=None):
    """(The settings of :func:`_args`.) The fleet in one process, written from docs/fleet.md's rules with the library's public pieces:
    per step, each client's batch; clean losses back-propagated into the server in rank order and
    averaged; each client's Q central differences with its step seeds; one server SGD step; one
    client update over all clients' directions in rank order. ``losses``: filled with each client's
    clean loss, {(rank, step): loss}."""
    from hosl.training.config import TrainConfig

    cfg = TrainConfig(model="tiny-opt", task="sst2", data_dir=str(DATA), mode="hosl", cut=1, steps=steps, batch_size=4,
                      train_size=36, eval_size=8, num_queries=2, max_length=48, lr_client=1e-3, lr_server=1e-2,
                      clients=n, progress=False)
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fleet's processes run (OMP_NUM_THREADS=1): the same reduction order
    try:
        return _simulate_steps(cfg, n, steps, {} if losses is None else losses)
    finally:
        torch.set_num_threads(threads)


def _simulate_steps(cfg, n, steps, clean_losses):
    from hosl.optim import HybridOrderOptimizer
    from hosl.optim import functional as F
    from hosl.tasks import ShuffledBatches, make_collate_fn
    from hosl.tasks.custom import sample_configured_task
    from hosl.training.run import _shard, hyper, load_split_model, loss_fn
    from hosl.training.schedule import make_server_optimizer

    torch.manual_seed(cfg.seed)
    data = sample_configured_task(cfg)
    kind, tokenizer, client, server = load_split_model(cfg, data)
    client.train(False)
    server.train(False)
    loss_of = loss_fn(kind)
    collate = make_collate_fn(data.template, tokenizer, kind, cfg.max_length)
    streams = {r: ShuffledBatches(_shard(data, cfg, r).train, cfg.batch_size, seed=cfg.seed, collate_fn=collate)
               for r in range(1, n + 1)}
    opt = HybridOrderOptimizer(client, None, config=cfg.zo_config())
    server_opt = make_server_optimizer(server.parameters(), hyper(cfg))
    for t in range(1, steps + 1):
        batches = {r: next(streams[r]) for r in streams}
        labels = {r: {"labels": b["labels"]} for r, b in batches.items()}  # what the server half is sent
        for r, b in batches.items():  # clean losses, rank order, accumulated
            with torch.no_grad():
                h = client(b["input_ids"], b["attention_mask"])
            loss = loss_of(server(h.detach(), b["attention_mask"]), labels[r], 1)
            loss.backward()
            clean_losses[(r, t)] = float(loss.detach())
        seeds, grads = [], []
        for r, b in batches.items():
            g = torch.Generator().manual_seed(step_seed(cfg.seed, r, t))
            mine = F.draw_seeds(g, cfg.num_queries)
            losses = []
            for s in mine:
                for sign in (1.0, -1.0):
                    with torch.no_grad(), opt.perturbed(s, sign):
                        h = client(b["input_ids"], b["attention_mask"])
                        losses.append(float(loss_of(server(h, b["attention_mask"]), labels[r], 1)))
            seeds += mine
            grads += [(losses[2 * q] - losses[2 * q + 1]) / (2 * cfg.resolved_eps()) for q in range(len(mine))]
        for p in server.parameters():
            if p.grad is not None and n > 1:
                p.grad.div_(n)
        server_opt.step()
        server_opt.zero_grad(set_to_none=True)
        opt.apply_update(seeds, grads)
    def copy(m):
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    return copy(client), copy(server)


@pytest.mark.slow
@needs_data
def test_three_shared_clients_are_bit_identical_equal_a_simulation_and_a_stranger_is_refused(tmp_path):
    out, port, n = tmp_path / "fleet", _free_port(), 3
    server = _server(out, n, port)
    stranger = _client(tmp_path / "stranger", n, 2, port, secret="not-the-secret-at-all-000")
    clients = [_client(out, n, r, port) for r in range(1, n + 1)]
    code_s, log_s = _finish(server)
    results = [_finish(c) for c in clients]
    code_x, log_x = _finish(stranger, 60)
    assert code_s == 0, log_s[-3000:]
    for code, log in results:
        assert code == 0, log[-3000:]
    assert code_x != 0 and "secret" in log_x.lower(), log_x[-2000:]
    summary = json.loads((out / "server" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["rounds"] == STEPS and summary["refused_joins"] >= 1
    assert summary["finished"] == [1, 2, 3] and summary["dropped"] == 0
    log = UpdateLog(out / "server" / "fleet_log.jsonl")
    assert [[u[0] for u in step] for step in log.between(0, STEPS)] == [[1, 2, 3]] * STEPS
    first = _weights(out, 1)
    for r in (2, 3):
        _assert_same(first, _weights(out, r))
    simulated_client, simulated_server = _simulate(n)
    _assert_same(first, {k: simulated_client[k] for k in first})
    server_weights = load_file(str(out / "server" / "checkpoints" / f"step-{STEPS}" / "server.safetensors"))
    _assert_same(server_weights, {k: simulated_server[k] for k in server_weights})
    start, _ = _simulate(n, steps=0)
    assert any(not torch.equal(start[k], first[k]) for k in first)  # training moved the weights


@pytest.mark.slow
@needs_data
def test_a_killed_client_is_dropped_the_others_go_on_and_it_rejoins_by_replay(tmp_path):
    out, port, n = tmp_path / "fleet", _free_port(), 3
    server = _server(out, n, port)
    clients = {r: _client(out, n, r, port) for r in range(1, n + 1)}
    metrics = out / "client3" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # kill rank 3 once it has a checkpoint (step 2) and is past it
        if metrics.exists() and any(json.loads(x).get("step", 0) >= 3 and "loss" in x
                                    for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    clients[3].send_signal(signal.SIGKILL)
    clients[3].communicate()
    again = _client(out, n, 3, port, "--resume")
    results = {r: _finish(clients[r]) for r in (1, 2)}
    code3, log3 = _finish(again)
    code_s, log_s = _finish(server)
    for r, (code, log) in results.items():
        assert code == 0, log[-3000:]
    assert code3 == 0, log3[-3000:]
    assert code_s == 0, log_s[-3000:]
    assert "caught up from step" in log3
    summary = json.loads((out / "server" / "summary.json").read_text())
    assert summary["dropped"] == 1 and summary["rejoins"] == 1 and summary["finished"] == [1, 2, 3]
    members = [[u[0] for u in step] for step in UpdateLog(out / "server" / "fleet_log.jsonl").between(0, STEPS)]
    assert any(3 not in m for m in members)  # the fleet went on without it
    for r in (2, 3):
        _assert_same(_weights(out, 1), _weights(out, r))


@pytest.mark.slow
@needs_data
def test_the_servers_death_stops_every_client_and_a_resumed_fleet_ends_identical(tmp_path):
    out, port, n = tmp_path / "fleet", _free_port(), 3
    server = _server(out, n, port)
    clients = [_client(out, n, r, port) for r in range(1, n + 1)]
    deadline = time.monotonic() + 180
    log_path = out / "server" / "fleet_log.jsonl"
    while time.monotonic() < deadline:  # kill the server once step 3 is logged (checkpoints at step 2)
        if log_path.exists() and len(log_path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    server.send_signal(signal.SIGKILL)
    server.communicate()
    for c in clients:
        code, log = _finish(c, 120)
        assert code == 2 and "server (rank 0)" in log, log[-2000:]  # a clear message, the peer-lost status
    for r in range(1, n + 1):  # what they leave is loadable: the step-2 checkpoint
        assert (out / f"client{r}" / "checkpoints" / "step-2" / "client.safetensors").exists()
    port = _free_port()
    server = _server(out, n, port, "--resume")
    clients = [_client(out, n, r, port, "--resume") for r in range(1, n + 1)]
    for proc in (*clients, server):
        code, log = _finish(proc)
        assert code == 0, log[-3000:]
    assert UpdateLog(log_path).last_step == STEPS
    for r in (2, 3):
        _assert_same(_weights(out, 1), _weights(out, r))
    simulated_client, _ = _simulate(n)
    first = _weights(out, 1)
    _assert_same(first, {k: simulated_client[k] for k in first})  # as if nothing had happened


@pytest.mark.slow
@needs_data
def test_local_clients_keep_their_own_halves_and_apply_only_their_own_updates(tmp_path):
    """(Also the linear server estimate and delta8 uploads through a fleet's per-client state, and every
    pair's messages encrypted: --encrypt.)"""
    out, port, n = tmp_path / "fleet", _free_port(), 2
    extra = ("--client-sync", "local", "--server-estimate", "linear", "--wire", "delta8", "--encrypt")
    server = _server(out, n, port, *extra)
    clients = [_client(out, n, r, port, *extra) for r in range(1, n + 1)]
    for proc in (*clients, server):
        code, log = _finish(proc)
        assert code == 0, log[-3000:]
    a, b = _weights(out, 1), _weights(out, 2)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(json.loads((out / f"client{r}" / "summary.json").read_text())["eval_accuracy"] is not None
               for r in (1, 2))  # each local model is evaluated
    members = [[u[0] for u in step] for step in UpdateLog(out / "server" / "fleet_log.jsonl").between(0, STEPS)]
    assert members == [[1, 2]] * STEPS


@pytest.mark.slow
@needs_data
def test_torchrun_launches_a_fleet_rank_0_serving(tmp_path):
    """(Every process gets --server-procs 2: rank 0 serves over two server ranks, the clients leave it.)"""
    out = tmp_path / "fleet"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "3", "--master-port", str(_free_port()), "-m", "hosl", "train",
           "--role", "auto", *_args(out, 2, 2), "--server-procs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "over 2 server processes (ddp)" in proc.stdout + proc.stderr
    assert json.loads((out / "server" / "summary.json").read_text())["finished"] == [1, 2]
    _assert_same(_weights(out, 1, step=2), _weights(out, 2, step=2))


@pytest.mark.slow
@needs_data
def test_a_second_client_with_a_taken_rank_is_refused_and_the_fleet_goes_on(tmp_path):
    out, port, n = tmp_path / "fleet", _free_port(), 3
    # it waits for all three ranks before the first step, up to --connect-timeout: long enough for the
    # twin to load, be refused, and rank 3 to load after it on a loaded machine
    server = _server(out, n, port, connect_timeout=300)
    clients = [_client(out, n, r, port, connect_timeout=300) for r in (1, 2)]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out / "client2" / "metrics.jsonl").exists():
        time.sleep(0.05)
    twin = _client(tmp_path / "twin", n, 2, port)
    code_t, log_t = _finish(twin, 120)
    clients.append(_client(out, n, 3, port, connect_timeout=300))
    for proc in (*clients, server):
        code, log = _finish(proc)
        assert code == 0, log[-3000:]
    assert code_t != 0 and "refused rank 2: rank 2 is connected already" in log_t, log_t[-2000:]
    summary = json.loads((out / "server" / "summary.json").read_text())
    assert summary["refused_joins"] == 1 and summary["steps"] == STEPS and summary["dropped"] == 0


# A stranger with access to the rendezvous store but not the secret, doing what issue 35 found:
# bumping the join counter, writing "refused" keys where clients would read them, and posting a rank
# it never proves. It goes on until the file named by its second argument appears.
STORE_STRANGER = """
import datetime, os, sys, time, torch.distributed as dist
port, stop = int(sys.argv[1]), sys.argv[2]
store = dist.TCPStore("127.0.0.1", port, 2, False, datetime.timedelta(seconds=60), wait_for_workers=False,
                      multi_tenant=True)
rounds = 0
try:
    while not os.path.exists(stop):
        n = int(store.add("hosl/fleet/v1/joins", 3))
        for k in range(max(1, n - 40), n + 40):
            store.set(f"hosl/fleet/v1/join/{k}/refused", b"STRANGER SAYS NO")
        if rounds % 50 == 0:  # a fake join about every 10 s: each holds a proof slot for --peer-timeout (20 s), so
            store.set(f"hosl/fleet/v1/join/{n}/rank", b"1")  # at most 2 of the 4 slots (docs/fleet.md: slots can be exhausted)
        rounds += 1
        time.sleep(0.2)
except Exception:  # the server finished and took its store with it
    pass
print("STRANGER ROUNDS", rounds, flush=True)
"""


@pytest.mark.slow
@needs_data
def test_a_stranger_writing_to_the_rendezvous_store_changes_nothing(tmp_path):
    out, port, n = tmp_path / "fleet", _free_port(), 2
    server = _server(out, n, port)
    stop = tmp_path / "stop"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _store_answers(port):
        time.sleep(0.2)
    stranger = subprocess.Popen([sys.executable, "-c", STORE_STRANGER, str(port), str(stop)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [_client(out, n, r, port) for r in range(1, n + 1)]
    results = [_finish(c) for c in clients]
    code_s, log_s = _finish(server)
    stop.touch()
    code_x, log_x = _finish(stranger, 60)
    assert code_s == 0, log_s[-3000:]
    for code, log in results:
        assert code == 0 and "STRANGER" not in log, log[-3000:]
    summary = json.loads((out / "server" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["dropped"] == 0 and summary["finished"] == [1, 2]
    assert code_x == 0 and "STRANGER ROUNDS" in log_x, log_x[-2000:]
    assert int(log_x.split("STRANGER ROUNDS")[1].split()[0]) >= 20  # it was at it for the whole run


def _store_answers(port) -> bool:
    """The fleet server's rendezvous store is up (its port accepts connections)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("argv,message", [
    (["train", "--clients", "3"], "is a fleet: start the server with hosl serve --clients 3"),
    (["train", "--role", "client", "--clients", "3", "--master-port", "29999"], "needs --rank in 1..3"),
    (["train", "--role", "client", "--clients", "3", "--rank", "4", "--master-port", "29999"], "needs --rank in 1..3"),
    (["serve", "--clients", "2", "--rank", "1", "--master-port", "29999"], "the server of a fleet is rank 0"),
    (["serve", "--clients", "2", "--mode", "fo-sl", "--master-port", "29999"], "fleet of hosl clients"),
    (["train", "--role", "client", "--clients", "2", "--rank", "1", "--shard", "half", "--master-port", "29999"],
     "--shard must be one of"),
])
def test_fleet_command_lines_that_cannot_work_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    from hosl.cli import main

    out = tmp_path / "run"
    assert main([*argv, "--model", "tiny-opt", "--data-dir", str(DATA), "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing written


# -- a fleet over several server ranks (--server-procs, issue 34) ---------------------------------------

def _logged_losses(out, rank) -> dict:
    """{step: clean loss} of client ``rank`` (a resumed step's last record)."""
    records = [json.loads(x) for x in (out / f"client{rank}" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_like_the_simulation(out, n, steps):
    """Every client's clean losses, the client half and the server half of the single-process
    simulation (the trajectory of a fleet with one server process, bit for bit: the first test
    above), within the float reduction order of two server ranks: 1e-5 relative for the losses,
    1e-5 absolute for the weights (measured after 6 steps, 2 clients: 1.7e-7 for the losses, 1.3e-6
    for the client half, whose ZO update divides a loss difference by 2 eps, and 2.4e-7 for the
    server half)."""
    simulated = {}
    client, server = _simulate(n, steps, simulated)
    for r in range(1, n + 1):
        logged = _logged_losses(out, r)
        assert sorted(logged) == list(range(1, steps + 1))
        assert [logged[t] for t in range(1, steps + 1)] == pytest.approx(
            [simulated[(r, t)] for t in range(1, steps + 1)], rel=1e-5)
    first = _weights(out, 1, steps)
    for r in range(2, n + 1):
        _assert_same(first, _weights(out, r, steps))  # one shared client model, whatever the server's ranks
    for k in first:
        torch.testing.assert_close(first[k], client[k], rtol=0, atol=1e-5)
    server_weights = load_file(str(out / "server" / "checkpoints" / f"step-{steps}" / "server.safetensors"))
    assert server_weights.keys() == {k for k in server}  # one server process's checkpoint
    for k in server_weights:
        torch.testing.assert_close(server_weights[k], server[k], rtol=0, atol=1e-5)


@pytest.mark.slow
@needs_data
def test_a_fleet_of_four_over_two_server_ranks_trains_as_one_server_process(tmp_path):
    """``hosl serve --clients 4 --server-procs 2`` (ddp over gloo; every client's rows split over the
    two ranks): a stranger is refused as by any fleet, and the four clients train to the losses and
    weights of one server process (:func:`_assert_like_the_simulation`)."""
    out, port, n, steps = tmp_path / "fleet", _free_port(), 4, 4
    server = _popen(["serve", *_args(out, n, steps, "--server-procs", "2"), *_conn(port)])
    stranger = _popen(["train", "--role", "client", "--rank", "2", *_args(tmp_path / "stranger", n, steps),
                       *_conn(port)], secret="not-the-secret-at-all-000")
    clients = [_popen(["train", "--role", "client", "--rank", str(r), *_args(out, n, steps), *_conn(port)])
               for r in range(1, n + 1)]
    results = [_finish(c) for c in clients]
    code_s, log_s = _finish(server)
    code_x, log_x = _finish(stranger, 60)
    assert code_s == 0, log_s[-3000:]
    for code, log in results:
        assert code == 0, log[-3000:]
    assert code_x != 0 and "secret" in log_x.lower(), log_x[-2000:]
    assert "over 2 server processes (ddp)" in log_s
    summary = json.loads((out / "server" / "summary.json").read_text())
    assert summary["finished"] == [1, 2, 3, 4] and summary["dropped"] == 0 and summary["refused_joins"] >= 1
    assert len(json.loads((out / "server" / "server_ranks.json").read_text())["pids"]) == 2
    _assert_like_the_simulation(out, n, steps)


@pytest.mark.slow
@needs_data
def test_a_killed_server_rank_stops_the_fleet_and_the_fleet_resumes_over_two_ranks(tmp_path):
    """Server rank 1 of ``--server-procs 2`` killed (SIGKILL) after step 3: the server and every
    client end with one line naming it within --peer-timeout, exit status 2; the fleet resumed from
    the step-2 checkpoint with --server-procs 2 trains on to the losses and weights of one server
    process."""
    out, port, n, peer_timeout = tmp_path / "fleet", _free_port(), 2, 20
    procs = ["--server-procs", "2"]
    server = _popen(["serve", *_args(out, n, STEPS, *procs), *_conn(port, peer_timeout)])
    clients = [_popen(["train", "--role", "client", "--rank", str(r), *_args(out, n), *_conn(port, peer_timeout)])
               for r in range(1, n + 1)]
    log_path, ranks = out / "server" / "fleet_log.jsonl", out / "server" / "server_ranks.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # once step 3 is logged (checkpoints every 2 steps)
        if log_path.exists() and len(log_path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(json.loads(ranks.read_text())["pids"]["1"], signal.SIGKILL)
    killed = time.monotonic()
    ended = []
    for proc in (server, *clients):
        code, log = _finish(proc, 120)
        ended.append(time.monotonic() - killed)
        named = [line for line in log.splitlines() if "lost server rank 1" in line]
        assert code == 2 and named and named[-1].startswith("hosl: error:"), log[-3000:]
        assert "killed by signal 9" in named[-1] and "--resume" in named[-1], named[-1]
    assert max(ended) < peer_timeout, ended
    summary = json.loads((out / "server" / "summary.json").read_text())
    assert "lost server rank 1" in summary["server_rank_lost"]
    port = _free_port()
    server = _popen(["serve", *_args(out, n, STEPS, *procs, "--resume"), *_conn(port, peer_timeout)])
    clients = [_popen(["train", "--role", "client", "--rank", str(r), *_args(out, n, STEPS, "--resume"),
                       *_conn(port, peer_timeout)]) for r in range(1, n + 1)]
    for proc in (*clients, server):
        code, log = _finish(proc)
        assert code == 0, log[-3000:]
    assert "resumed the fleet from its checkpoint at step" in log
    _assert_like_the_simulation(out, n, STEPS)
