"""``server_estimate="linear"``: g_q = <dL/dh, h+ - h-> / 2eps from the server's clean backward.

In-process on a tiny OPT split: it tends to the exact estimate as eps shrinks, both placements give
the same scalars, a server without a gradient is refused before any weight changes, batched
points give the same estimate; through hosl train (in-process and two processes): both placements
give the same run, and the traffic is what the placement says.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import hosl  # noqa: E402
from hosl.cli import main  # noqa: E402
from hosl.models import load_model, split  # noqa: E402
from hosl.optim.linear_estimate import LocalLinearServer, dot_per_copy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")


def _halves():
    torch.manual_seed(0)
    model, _ = load_model("tiny-opt", "causal_lm")
    client, server = split(model, cut=2)
    return client.eval(), server.eval()


def _batch():
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    target = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
    return ids, mask, target


def _loss_fn(server, mask, target):
    def loss(h):
        copies = h.shape[0] // mask.shape[0]
        logits = server(h, mask.repeat(copies, 1)).float()
        per = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          target.repeat(copies, 1).reshape(-1), reduction="none")
        return hosl.per_copy_mean(per, copies) if copies > 1 else per.mean()
    return loss


def _grads(estimate, eps, difference="central", **kw):
    client, server = _halves()
    ids, mask, target = _batch()
    opt = hosl.HybridOrderOptimizer(client, None, lr=0.0, eps=eps, num_queries=4, seed=7, difference=difference,
                                    server_estimate=estimate, **kw)
    opt.step(lambda: client(ids, mask), _loss_fn(server, mask, target))
    return torch.tensor(opt.last_projected_grads, dtype=torch.float64)


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_linear_tends_to_exact_as_eps_shrinks(difference):
    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        exact, linear = _grads("exact", eps, difference), _grads("linear", eps, difference)
        errors.append(float((linear - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[-1] < 0.05, errors
    assert float(_grads("linear", 1e-3, difference).abs().max()) > 1e-1  # not trivially zero


def test_both_placements_give_the_same_scalars_and_keep_the_weights():
    client, _ = _halves()
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    on_server, on_client = _grads("linear", 0.1, linear_on="server"), _grads("linear", 0.1, linear_on="client")
    assert torch.equal(on_server, on_client)
    after, _ = _halves()  # lr=0: the client the optimizer ran is the same fresh one
    assert all(torch.equal(before[n], p.detach()) for n, p in after.named_parameters())


@pytest.mark.parametrize("query_batch", [3, 8])
def test_batched_points_give_the_same_linear_estimate(query_batch):
    torch.testing.assert_close(_grads("linear", 0.1, query_batch=query_batch), _grads("linear", 0.1),
                               rtol=1e-4, atol=1e-5)


def test_dot_per_copy():
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    deltas = torch.cat([torch.ones(2, 2), torch.eye(2)])
    assert dot_per_copy(g, deltas) == [10.0, 5.0]
    assert LocalLinearServer(g).directional(deltas) == [10.0, 5.0]
    with pytest.raises(ValueError, match="not copies"):
        dot_per_copy(g, torch.ones(3, 2))


def test_a_server_without_gradient_is_refused_before_any_weight_changes():
    client, server = _halves()
    ids, mask, target = _batch()
    before = {n: p.detach().clone() for n, p in client.named_parameters()}
    opt = hosl.HybridOrderOptimizer(client, None, lr=1e-2, num_queries=2, server_estimate="linear")
    frozen = _loss_fn(server, mask, target)
    with pytest.raises(ValueError, match="server_estimate='linear' needs dL/dh.*frozen server"):
        opt.step(lambda: client(ids, mask), lambda h: frozen(h.detach()))
    assert all(torch.equal(before[n], p.detach()) for n, p in client.named_parameters())
    with pytest.raises(ValueError, match="server_estimate must be one of"):
        hosl.HybridOrderOptimizer(client, None, server_estimate="approx")
    with pytest.raises(ValueError, match="linear_on must be one of"):
        hosl.HybridOrderOptimizer(client, None, server_estimate="linear", linear_on="both")


def test_config_refusals():
    from hosl.training.config import TrainConfig

    for kw, match in ((dict(mode="zo-sl", server_estimate="linear"), "needs the server's gradient"),
                      (dict(linear_on="client"), "applies to --server-estimate linear"),
                      (dict(mode="fo-sl", query_batch=2), "--query-batch batches"),
                      (dict(query_batch=0), "--query-batch must be")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw).validate()


# -- hosl train: in-process and two processes -------------------------------------------------------

def _args(out, *extra):
    return ["--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", "hosl", "--cut", "1",
            "--steps", "2", "--batch-size", "4", "--train-size", "8", "--eval-size", "4", "--num-queries", "3",
            "--max-length", "32", "--lr-client", "1e-3", "--eps", "1e-2", "--out", str(out), "--no-progress",
            "--server-estimate", "linear", *extra]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@needs_data
@pytest.mark.slow
def test_train_in_process_placements_agree_and_traffic_is_as_placed(tmp_path):
    assert main(["train", *_args(tmp_path / "server")]) == 0
    assert main(["train", *_args(tmp_path / "client", "--linear-on", "client")]) == 0
    assert main(["train", *_args(tmp_path / "exact", "--server-estimate", "exact")]) == 0
    on_server, on_client, exact = (_records(tmp_path / n) for n in ("server", "client", "exact"))
    assert [r["loss"] for r in on_server] == [r["loss"] for r in on_client]
    # the summary counts the passes each estimate runs: linear needs the server's clean pass only
    passes = {n: json.loads((tmp_path / n / "summary.json").read_text())["forward_passes_per_step"]
              for n in ("server", "client", "exact")}
    assert passes["server"]["server_forward"] == passes["client"]["server_forward"] == 1
    assert passes["exact"]["server_forward"] == 1 + 2 * 3
    assert passes["server"]["client_forward"] == passes["exact"]["client_forward"] == 1 + 2 * 3
    if "bytes_up" in on_server[0]:
        # server: Q+1 activations up; client: 1 up and dL/dh down; exact: 2Q+1 up
        up = lambda rs: rs[0]["bytes_up"]  # noqa: E731
        assert up(on_client) < up(on_server) < up(exact)
        assert on_client[0]["bytes_down"] > on_server[0]["bytes_down"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("placement", ["server", "client"])
def test_two_processes_match_one_process(tmp_path, placement):
    extra = ["--linear-on", placement]
    conn = ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--peer-timeout", "30"]
    env = dict(os.environ, HOSL_SECRET="a-shared-secret-for-the-tests")
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    cmd = [sys.executable, "-m", "hosl"]
    server = subprocess.Popen([*cmd, "serve", "--rank", "1", *_args(tmp_path / "two", *extra), *conn], **common)
    client = subprocess.Popen([*cmd, "train", "--role", "client", "--rank", "0", *_args(tmp_path / "two", *extra),
                               *conn], **common)
    assert main(["train", *_args(tmp_path / "one", *extra)]) == 0
    outs = []
    for proc in (client, server):
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outs.append((proc.returncode, out))
    assert all(rc == 0 for rc, _ in outs), "".join(out for _, out in outs)
    keys = ("step", "loss", "bytes_up", "bytes_down")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs]  # noqa: E731
    assert strip(_records(tmp_path / "two" / "client")) == strip(_records(tmp_path / "one"))
