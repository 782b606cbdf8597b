"""Micro-batched client passes (client_micro_batch / --client-micro-batch / --client-memory-budget):
the same activations, directions, weights and updates as whole-batch passes, and budgets refused early."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hosl import HybridOrderOptimizer, ZOConfig
from hosl.cli import main
from hosl.models import load_model, split
from hosl.optim.micro_batch import MicroBatchedClient, row_slices, wrap_client_fn
from hosl.training.memory import LiveTensorPeak, parse_bytes, plan_micro_batch
from hosl.training.modes import Hyper, make_mode

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")

FAMILIES = {"tiny-opt": "causal_lm", "tiny-llama": "causal_lm", "tiny-bert": "sequence_classification"}
B, T = 8, 12


def _client(name, dtype=torch.float32):
    kind = FAMILIES[name]
    model, _ = load_model(name, kind, num_labels=2 if kind != "causal_lm" else None, dtype=dtype)
    model.eval()
    client, _ = split(model, cut=2)
    return client


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # padded rows: the mask must follow its rows into their slice
    mask[6, 4:] = 0
    return ids, mask


def _rows_fn(client, ids, mask, calls=None):
    def run(rows):
        if calls is not None:
            calls.append((rows.start, rows.stop))
        return client(ids[rows], mask[rows])
    return run


def _server_loss(h):
    """A fixed, deterministic 'server': a projection of the activation, squared."""
    w = torch.linspace(-1, 1, h.shape[-1], dtype=torch.float32)
    return ((h.float() @ w) ** 2).mean()


# -- the wrapper -----------------------------------------------------------------------------------

def test_row_slices_cover_the_batch_once_in_order():
    assert [(s.start, s.stop) for s in row_slices(8, 3)] == [(0, 3), (3, 6), (6, 8)]
    assert [(s.start, s.stop) for s in row_slices(8, 8)] == [(0, 8)]
    assert [(s.start, s.stop) for s in row_slices(3, 16)] == [(0, 3)]


def test_bad_options_and_contracts_are_clear_errors():
    with pytest.raises(ValueError, match="client_micro_batch must be None .* or an integer >= 1, got 0"):
        HybridOrderOptimizer(torch.nn.Linear(2, 2), None, client_micro_batch=0)
    with pytest.raises(ValueError, match="needs batch_size="):
        wrap_client_fn(lambda rows: None, 4, None)
    with pytest.raises(ValueError, match="batch_size is only used with client_micro_batch"):
        wrap_client_fn(lambda: None, None, 8)
    wrong_rows = MicroBatchedClient(lambda rows: torch.zeros(2, 3), 8, 3)
    with pytest.raises(ValueError, match=r"rows 0:3 \(3 rows along dim 0\), got \(2, 3\)"):
        wrong_rows()


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("perturbed_forward", ["auto", "scratch"])
@pytest.mark.slow
def test_micro_batched_activation_equals_the_whole_batch_clean_and_perturbed(name, micro, perturbed_forward):
    client = _client(name)
    ids, mask = _batch()
    opt = HybridOrderOptimizer(client, None, eps=1e-2, perturbed_forward=perturbed_forward)
    with torch.no_grad():
        whole = client(ids, mask)
        sliced = MicroBatchedClient(_rows_fn(client, ids, mask), B, micro)()
        torch.testing.assert_close(sliced, whole)  # fp32 matmul tolerance
        for seed, sign in ((11, 1.0), (11, -1.0), (12, 1.0)):
            with opt.perturbed(seed, sign):
                whole_p = client(ids, mask)
                sliced_p = MicroBatchedClient(_rows_fn(client, ids, mask), B, micro)()
            torch.testing.assert_close(sliced_p, whole_p)
            assert not torch.allclose(whole_p, whole)  # the perturbation is visible, so every slice saw it


# -- inside a step ----------------------------------------------------------------------------------

@pytest.mark.parametrize("difference", ["central", "forward"])
def test_every_pass_uses_the_same_slicing_and_every_slice_of_a_pass_the_same_direction(difference):
    client = _client("tiny-opt")
    ids, mask = _batch()
    opt = HybridOrderOptimizer(client, None, lr=0.0, eps=1e-2, num_queries=2, difference=difference,
                               client_micro_batch=3)
    calls, seen = [], []
    opt.step(_rows_fn(client, ids, mask, calls), lambda h: (seen.append(h.clone()), _server_loss(h))[1],
             batch_size=B)
    passes = 1 + len(opt.points(opt.last_seeds))
    expected = ((0, 3), (3, 6), (6, 8))
    assert opt.last_client_fn.slicings == [expected] * passes  # clean, then + and - of each direction
    assert calls == list(expected) * passes
    # each assembled activation is the whole batch at that pass's point: one seed, one scale for all slices
    with torch.no_grad():
        torch.testing.assert_close(seen[0], client(ids, mask))
        for h, (seed, sign) in zip(seen[1:], opt.points(opt.last_seeds)):
            with opt.perturbed(seed, sign):
                torch.testing.assert_close(h, client(ids, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("perturbed_forward", ["auto", "scratch"])
def test_weights_are_bit_exact_after_micro_batched_passes(dtype, perturbed_forward):
    client = _client("tiny-llama", dtype)
    before = {k: v.clone() for k, v in client.state_dict().items()}
    ids, mask = _batch()
    opt = HybridOrderOptimizer(client, None, lr=0.0, num_queries=3, client_micro_batch=2,
                               perturbed_forward=perturbed_forward)
    for _ in range(2):
        opt.step(_rows_fn(client, ids, mask), _server_loss, batch_size=B)
    for k, v in client.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.slow
def test_a_step_with_micro_batches_gives_the_whole_batch_update(name):
    whole_client = _client(name)
    sliced_client = copy.deepcopy(whole_client)
    ids, mask = _batch(1)
    kw = dict(lr=1e-2, eps=1e-2, num_queries=3, seed=5)
    whole, sliced = HybridOrderOptimizer(whole_client, None, **kw), HybridOrderOptimizer(sliced_client, None,
                                                                                         client_micro_batch=3, **kw)
    for _ in range(2):
        loss_w = whole.step(lambda: whole_client(ids, mask), _server_loss)
        loss_s = sliced.step(_rows_fn(sliced_client, ids, mask), _server_loss, batch_size=B)
        torch.testing.assert_close(loss_s, loss_w)
        assert sliced.last_seeds == whole.last_seeds
        # g = (L+ - L-) / (2 eps): the losses' rounding, divided by 2 eps
        torch.testing.assert_close(torch.tensor(sliced.last_projected_grads), torch.tensor(whole.last_projected_grads),
                                   rtol=1e-4, atol=1e-4)
    moved = False
    for (k, a), b in zip(sliced_client.state_dict().items(), whole_client.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
        moved |= not torch.equal(a, _client(name).state_dict()[k])
    assert moved  # the update did change the weights, and identically


def _per_copy_loss(h):
    """_server_loss of each of the ``len(h) / B`` stacked copies (query_batch hands the server D copies)."""
    w = torch.linspace(-1, 1, h.shape[-1], dtype=torch.float32)
    return ((h.float() @ w) ** 2).reshape(h.shape[0] // B, -1).mean(1)


@pytest.mark.parametrize("server_estimate", ["exact", "linear"])
def test_micro_batches_compose_with_query_batch(server_estimate):
    """query_batch=D: each slice of M rows runs as D copies; the assembled D x B activation, the
    estimate and the update are those of the sequential whole-batch passes."""
    base = _client("tiny-opt")
    seq_client, both_client = copy.deepcopy(base), copy.deepcopy(base)
    ids, mask = _batch(2)
    kw = dict(lr=1e-2, eps=1e-2, num_queries=3, seed=7, server_estimate=server_estimate)
    sequential = HybridOrderOptimizer(seq_client, None, **kw)
    both = HybridOrderOptimizer(both_client, None, query_batch=2, client_micro_batch=3, **kw)
    calls = []
    sequential.step(lambda: seq_client(ids, mask), _per_copy_loss)
    both.step(_rows_fn(both_client, ids, mask, calls), _per_copy_loss, batch_size=B)
    assert both.last_seeds == sequential.last_seeds
    torch.testing.assert_close(torch.tensor(both.last_projected_grads), torch.tensor(sequential.last_projected_grads),
                               rtol=1e-4, atol=1e-4)
    forwards = len(both.last_client_fn.slicings)  # the clean pass, then 6 points in forwards of D = 2 copies
    assert forwards == 1 + 3 and calls == [(0, 3), (3, 6), (6, 8)] * forwards
    for a, b in zip(both_client.parameters(), seq_client.parameters()):
        torch.testing.assert_close(a, b)


# -- budgets ----------------------------------------------------------------------------------------

def test_parse_bytes_units_and_errors():
    assert parse_bytes("1.0GiB") == 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("4096") == 4096
    for bad in ("lots", "1.0 parsecs", "-1GiB", "0"):
        with pytest.raises(ValueError, match="--client-memory-budget must be"):
            parse_bytes(bad)


def test_live_tensor_peak_counts_allocations_inside_only():
    outside = torch.zeros(1000)
    probe = LiveTensorPeak()
    with probe:
        a = torch.ones(1000)  # 4000 bytes
        view = outside[:10]  # a view of a tensor from outside: no allocation
        b = a * 2  # 4000 more: peak 8000
        del a, b
        c = torch.empty(250, dtype=torch.float64)  # 2000 bytes, after 8000 were freed
    assert probe.peak == 8000
    assert probe.live == 2000
    del c, view


def test_plan_picks_the_largest_slice_that_fits():
    parts = dict(weights=1000, scratch=100, output=400, fixed_transient=50, per_row_transient=30, batch_size=64)
    assert plan_micro_batch(1000 + 100 + 400 + 50 + 5 * 30 + 29, **parts).micro_batch == 5
    assert plan_micro_batch(10**9, **parts).micro_batch == 64
    with pytest.raises(ValueError, match=r"cannot hold the client's weights \(1000 bytes\) and its output activation "
                                         r"\(400 bytes\)"):
        plan_micro_batch(1399, **parts)
    with pytest.raises(ValueError, match="not the perturbed pass on one row"):
        plan_micro_batch(1000 + 100 + 400 + 50 + 29, **parts)


def _hosl_mode(client):
    hp = Hyper(zo=ZOConfig(lr=1e-3, eps=1e-3, num_queries=2), lr_server=1e-3)
    return make_mode("hosl", client, None, hp, loss_of=None, proxy=object()), hp  # the proxy is not used here


def test_an_impossible_budget_is_refused_before_anything_changes():
    client = _client("tiny-opt")
    before = {k: v.clone() for k, v in client.state_dict().items()}
    mode, hp = _hosl_mode(client)
    weights = sum(p.numel() * p.element_size() for p in client.parameters())
    with pytest.raises(ValueError, match="cannot hold the client's weights .* and its output activation"):
        mode.plan_client_memory(weights + 1, batch_size=64, seq_len=T)
    assert mode.client_micro_batch is None and mode.opt.client_micro_batch is None
    for k, v in client.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_budget_sets_the_rows_the_step_then_runs():
    client = _client("tiny-opt")
    mode, hp = _hosl_mode(client)
    roomy = mode.plan_client_memory(10**9, batch_size=B, seq_len=T)
    assert roomy.micro_batch == B
    assert roomy.output == B * T * client.config.hidden_size * 4  # the probe measured the activation's rows
    assert roomy.per_row_transient > 0
    three_rows = roomy.planned_peak() - (B - 3) * roomy.per_row_transient
    plan = mode.plan_client_memory(three_rows + roomy.per_row_transient - 1, batch_size=B, seq_len=T)
    assert plan.micro_batch == 3 and plan.planned_peak() <= plan.budget
    assert mode.opt.client_micro_batch == mode.client_micro_batch == 3
    ids, mask = _batch()
    calls = []
    mode.opt.step(_rows_fn(client, ids, mask, calls), _server_loss, batch_size=B)
    assert calls[:3] == [(0, 3), (3, 6), (6, 8)]


@needs_data
def test_hosl_train_refuses_an_impossible_budget_with_one_line_and_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--cut", "1",
               "--steps", "1", "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--max-length", "32",
               "--client-memory-budget", "64KiB", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc != 0
    assert err.startswith("hosl: error: --client-memory-budget 64.000 KiB cannot hold the client's weights")
    assert "output activation" in err
    assert not out.exists()


def test_the_micro_batch_flags_are_checked_in_the_config():
    from hosl.training.config import TrainConfig

    for kw, match in ((dict(mode="fo", client_micro_batch=2), r"\(--mode fo-sl\), got --mode fo"),
                      (dict(mode="fo-sl", client_memory_budget="1GiB"), r"\(--mode hosl or zo-sl\), got --mode fo-sl"),
                      (dict(client_micro_batch=0), "--client-micro-batch must be"),
                      (dict(client_micro_batch=2, client_memory_budget="1GiB"), "not both"),
                      (dict(client_memory_budget="big"), "--client-memory-budget must be a size")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw).validate()


# -- hosl train: in one process and as a client process ---------------------------------------------

def _train_args(out, mode, *extra):
    return ["--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", mode, "--cut", "1",
            "--steps", "3", "--batch-size", "5", "--train-size", "15", "--eval-size", "4", "--num-queries", "2",
            "--max-length", "40", "--lr-client", "1e-2", "--eps", "1e-2", "--lr-server", "1e-2", "--eval-every", "3",
            "--out", str(out), "--no-progress", *extra]


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@needs_data
@pytest.mark.parametrize("mode", ["hosl", "zo-sl"])
@pytest.mark.slow
def test_hosl_train_with_micro_batches_matches_the_whole_batch_run(tmp_path, mode):
    assert main(["train", *_train_args(tmp_path / "whole", mode)]) == 0
    assert main(["train", *_train_args(tmp_path / "sliced", mode, "--client-micro-batch", "2")]) == 0
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "sliced")), torch.tensor(_losses(tmp_path / "whole")),
                               rtol=1e-4, atol=1e-5)
    whole, sliced = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("whole", "sliced"))
    assert sliced["client_micro_batch"] == 2 and whole["client_micro_batch"] is None
    assert sliced["client_peak_bytes"] == whole["client_peak_bytes"]  # the assembled activation is the same size


@needs_data
@pytest.mark.slow
def test_a_client_process_slices_locally_and_sends_the_assembled_activation(tmp_path):
    """--role client with --client-micro-batch, the server process without: same losses and traffic as
    the whole-batch run in one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = ["--master-addr", "127.0.0.1", "--master-port", str(port), "--peer-timeout", "20"]
    env = {**os.environ, "HOSL_SECRET": "a-shared-secret-for-the-tests"}  # where the transport asks for one
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    cmd = [sys.executable, "-m", "hosl"]
    server = subprocess.Popen([*cmd, "serve", "--rank", "1", *_train_args(tmp_path / "two", "hosl"), *conn], **common)
    client = subprocess.Popen([*cmd, "train", "--role", "client", "--rank", "0",
                               *_train_args(tmp_path / "two", "hosl", "--client-micro-batch", "2"), *conn], **common)
    assert main(["train", *_train_args(tmp_path / "one", "hosl")]) == 0
    outs = []
    for proc in (client, server):
        try:
            outs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            outs.append(proc.communicate()[0])
    assert client.returncode == 0 and server.returncode == 0, "\n".join(outs)
    two, one = tmp_path / "two" / "client", tmp_path / "one"
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-4, atol=1e-5)
    up = lambda run: [r["bytes_up"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if "loss" in r]
    assert up(two) == up(one)  # the server receives whole activations, as without slicing


@pytest.mark.slow
def test_memory_benchmark_adds_micro_batch_and_budget_rows(tmp_path):
    """benchmarks/memory.py --client-micro-batch / --client-memory-budget: one row each, with the M used,
    the activation actually sent (B x T x H fp32 for tiny-opt at --tiny: 4 x 16 x 32) and the budget's plan;
    a budget too small for the client is a row saying so, not a failed command."""
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--tiny", "--modes", "hosl",
                           "--client-micro-batch", "4,1", "--client-memory-budget", "10GiB,1KiB", "--threads", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["details"]["tiny-opt"]
    assert set(rows) == {"hosl", "hosl-m4", "hosl-m1", "hosl-budget-10GiB", "hosl-budget-1KiB"}
    assert rows["hosl-m4"]["micro_batch"] == 4 and rows["hosl-m1"]["micro_batch"] == 1
    # a budget the plan refuses is a row saying why, and the other rows still ran
    refused = rows.pop("hosl-budget-1KiB")
    assert "cannot hold the client's weights" in refused["refused"] and "peak" not in refused
    for row in rows.values():
        assert row["output"] == 4 * 16 * 32 * 4
        assert row["step_seconds"] >= 0
    plan = rows["hosl-budget-10GiB"]["plan"]
    assert rows["hosl-budget-10GiB"]["micro_batch"] == plan["micro_batch"] == 4  # 10 GiB holds the whole batch
    assert plan["output"] == 4 * 16 * 32 * 4 and plan["planned_peak"] <= plan["budget"]
