"""A server half over several processes (``--server-procs``, hosl/training/server_group.py):
the row deal, the refusals, and a two-rank gloo server that trains tiny OPT and tiny Llama halves to
the losses of one server process."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hosl.cli import main

from hosl.training.config import TrainConfig
from hosl.training.modes import make_mode
from hosl.training.protocol import PHASE_NAMES
from hosl.training.run import hyper, load_split_model, loss_fn
from hosl.training.server_group import ServerGroup
from hosl.training.server_handler import ServerHandler
from hosl.training.server_proxy import ServerProxy
from hosl.training.server_ranks import check_server_procs, server_ranks
from hosl.transport import InProcessLink

pytestmark = pytest.mark.filterwarnings("ignore:hosl. no compiled kernels", "ignore::FutureWarning")


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_the_rows_are_dealt_as_tensor_split_deals_them(rows, size):
    t = torch.arange(rows * 2).view(2 * rows, 1)  # two copies of a batch of `rows` rows, copy-major
    expected = torch.tensor_split(torch.arange(rows), size)
    for rank in range(size):
        group = ServerGroup(rank=rank, size=size)
        part = group.part(rows)
        assert torch.equal(torch.arange(rows)[part], expected[rank])
        if group.has_rows(rows) and size > 1:
            mine = group.rows_of(t, rows).view(-1)
            assert torch.equal(mine, torch.cat([expected[rank], expected[rank] + rows]))


@pytest.mark.parametrize("change, needle", [
    (dict(procs=0), "--server-procs"),
    (dict(parallel="zero3"), "--server-parallel"),
    (dict(mode="fo"), "--mode fo"),
    (dict(resume=True), "--resume"),
    (dict(parallel="fsdp"), "fsdp"),
])
def test_what_several_server_ranks_do_not_do_is_refused(change, needle):
    procs, parallel = change.pop("procs", 2), change.pop("parallel", "ddp")
    cfg = TrainConfig(model="tiny-opt", **{"batch_size": 4, **change})
    with pytest.raises(ValueError, match=needle):
        check_server_procs(cfg, procs, parallel)


def test_hosl_serve_takes_resume_and_fsdp_with_several_ranks():
    """Its checkpoints are one server process's (every rank loads them; fsdp gathers to rank 0)."""
    cfg = TrainConfig(model="tiny-opt", batch_size=4, resume=True)
    check_server_procs(cfg, 2, "fsdp", relayed=True)  # no refusal
    with pytest.raises(ValueError, match="hosl serve --server-procs"):
        check_server_procs(cfg, 2, "ddp")


def test_a_lost_rank_is_named_by_its_process_and_a_request_error_is_not_a_lost_rank():
    import subprocess as sp

    from hosl.training.server_group import ServerRankLost

    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # exited and reaped: no such process any more
    group = ServerGroup(rank=0, size=3, pids=[os.getpid(), os.getpid(), dead.pid])
    assert group.dead_ranks() == [2]
    lost = group.lost(RuntimeError("[../gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1. This is..."))
    assert isinstance(lost, ServerRankLost)
    assert str(lost) == ("server rank 0: lost server rank 2 of --server-procs 3: Connection closed by peer "
                         "[127.0.0.1]:1")
    alive = ServerGroup(rank=0, size=2, pids=[os.getpid(), os.getpid()])
    assert alive.lost(ValueError("a request's own error")) is None
    assert "none has exited" in str(alive.lost(RuntimeError("Timed out waiting 60000ms for recv")))


def _batch(rows: int, seq: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row
    labels = torch.full_like(ids, -100)
    for r in range(rows):  # rows answer with different token counts: the ranks' losses weigh differently
        labels[r, seq - 2 - r % 3:seq - 1] = ids[r, seq - 2 - r % 3:seq - 1]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "answer_mask": labels != -100}


def _train(cfg: TrainConfig, group: ServerGroup | None, steps: int = 3, rows: int = 5):
    """Losses of ``steps`` steps and the evaluation outputs after them, with the in-process client."""
    torch.manual_seed(cfg.seed)
    kind, _tok, client, server = load_split_model(cfg)
    hp, loss_of = hyper(cfg), loss_fn(kind)
    half = ServerHandler(server, cfg.mode, hp, loss_of, kind, train_dropout=False, group=group)
    mode = make_mode(cfg.mode, client, None, hp, loss_of,
                     proxy=ServerProxy(InProcessLink(half.handle, PHASE_NAMES), kind))
    vocab = client.embed_tokens.num_embeddings if hasattr(client, "embed_tokens") else 200
    losses = []
    for step in range(1, steps + 1):
        mode.step_number = step
        losses.append(float(mode.step(_batch(rows, 12, min(vocab, 200), seed=step))))
    scores, loss_sum = mode.eval_outputs(_batch(rows, 12, min(vocab, 200), seed=99), kind)
    return losses, scores, loss_sum


@pytest.mark.slow
@pytest.mark.parametrize("model, mode, parallel", [("tiny-opt", "hosl", "ddp"), ("tiny-llama", "fo-sl", "ddp"),
                                                   ("tiny-llama", "hosl", "fsdp")])
def test_two_server_ranks_train_to_the_losses_of_one(model, mode, parallel):
    """P = 2 (gloo; ddp replicas, or FSDP2 shards) against P = 1 on the same batches: the same
    losses and evaluation outputs within 1e-5 relative. Not bit for bit: the batch's loss is a sum
    over two ranks' partial sums and the gradients an average of two ranks' (the float reduction
    order changes), and the server's SGD steps carry the difference on; measured below 1e-6."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = TrainConfig(model=model, task="sst2", mode=mode, cut=1, num_queries=2, lr_client=1e-3, lr_server=1e-2,
                      batch_size=5)
    one = _train(cfg, None)
    with server_ranks(cfg, 2, parallel, timeout_s=120.0) as group:
        two = _train(cfg, group)
    assert two[0] == pytest.approx(one[0], rel=1e-5)
    assert one[0][0] != one[0][-1]  # the steps trained something
    torch.testing.assert_close(two[1], one[1], rtol=1e-5, atol=1e-5)
    assert two[2] == pytest.approx(one[2], rel=1e-5)


ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HOSL_DATA_DIR", ROOT / ".." / "shared" / "data"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "sst2" / "train.tsv").exists(), reason=f"no task data at {DATA}")
def test_a_client_process_and_two_server_ranks_train_to_the_losses_of_one_process(tmp_path):
    """``hosl serve --server-procs 2`` (the serving process relays to two gloo ranks, ddp) and a
    ``hosl train --role client`` process, zo-sl (both halves perturbed on every rank): the losses
    of an in-process run with one server process within 1e-5 relative (the float reduction order,
    as above), and its server checkpoint within 1e-5 absolute: a ZO update divides a loss
    difference by 2 eps, so a 1e-7 loss difference moves a weight by ~1e-7 a step (measured 1.2e-6
    after 3 steps)."""
    args = ["--model", "tiny-opt", "--task", "sst2", "--data-dir", str(DATA), "--mode", "zo-sl", "--cut", "1",
            "--steps", "3", "--batch-size", "5", "--train-size", "15", "--eval-size", "5", "--num-queries", "2",
            "--max-length", "32", "--lr-client", "1e-3", "--eval-every", "3", "--no-progress"]
    conn = ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--peer-timeout", "60"]
    env = dict(os.environ, HOSL_SECRET="a-shared-secret-for-the-tests", OMP_NUM_THREADS="1")
    common = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    two = tmp_path / "two"
    server = subprocess.Popen([sys.executable, "-m", "hosl", "serve", "--rank", "1", "--server-procs", "2",
                               *args, "--out", str(two), *conn], **common)
    client = subprocess.Popen([sys.executable, "-m", "hosl", "train", "--role", "client", "--rank", "0",
                               *args, "--out", str(two), *conn], **common)
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0  # in-process, one server process
    outs = []
    for proc in (client, server):
        try:
            outs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            proc.kill()
            outs.append(proc.communicate()[0])
    assert client.returncode == 0 and server.returncode == 0, "".join(outs)
    one, served = _losses(tmp_path / "one"), _losses(two / "client")
    assert sorted(served) == [1, 2, 3]
    assert [served[s] for s in sorted(served)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-5)
    a = load_file(str(tmp_path / "one/checkpoints/step-3/server.safetensors"))
    b = load_file(str(two / "server/checkpoints/step-3/server.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_killed_server_rank_is_named_at_the_next_request():
    """Rank 1 killed (SIGKILL): rank 0's next collective fails at once (the connection resets) and
    the group raises a PeerLostError naming the rank and how it ended."""
    import multiprocessing
    import signal

    from hosl.transport.link import PeerLostError
    from hosl.transport.wire import Kind, Message

    cfg = TrainConfig(model="tiny-opt", task="sst2", mode="hosl", cut=1, batch_size=4)
    with pytest.raises(PeerLostError, match=r"lost server rank 1 \(killed by signal 9\)"):
        with server_ranks(cfg, 2, "ddp", timeout_s=120.0) as group:
            (rank_1,) = multiprocessing.active_children()
            os.kill(rank_1.pid, signal.SIGKILL)
            rank_1.join(30)
            group.share(Message(Kind.REQUEST, 1, 1))


def _client_steps(cfg: TrainConfig, handle, steps, mode=None):
    """The in-process client (``mode``, or a fresh one seeded as every run is) after ``steps`` (step
    numbers) against the server answering ``handle``, and its losses."""
    kind = "causal_lm"  # tiny-llama's (asserted below)
    proxy = ServerProxy(InProcessLink(handle, PHASE_NAMES), kind)
    if mode is None:
        torch.manual_seed(cfg.seed)
        kind, _tok, client, _server = load_split_model(cfg)
        mode = make_mode(cfg.mode, client, None, hyper(cfg), loss_fn(kind), proxy=proxy)
    mode.proxy = proxy
    losses = []
    for step in steps:
        mode.step_number = step
        losses.append(float(mode.step(_batch(5, 12, 200, seed=step))))
    return mode, losses


@pytest.mark.slow
def test_fsdp_checkpoints_are_one_server_process_s_and_resume_over_two_ranks(tmp_path):
    """``hosl serve --server-parallel fsdp`` over 2 ranks (tiny Llama, SGD with momentum): its
    step-2 checkpoint (the shards gathered to rank 0) holds one server process's weights and
    momentum buffers under the same names, within 1e-5 (the float reduction order, as above); a
    fresh pair of fsdp ranks resumes from it and steps 3 and 4 give one process's losses."""
    from hosl.training import checkpoint as ckpt
    from hosl.training.server_ranks import relayed_server_ranks
    from hosl.transport.wire import Kind, Message
    from hosl.training.protocol import Phase

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = TrainConfig(model="tiny-llama", task="sst2", mode="hosl", cut=1, num_queries=2, lr_client=1e-3,
                      lr_server=1e-2, batch_size=5)
    torch.manual_seed(cfg.seed)
    kind, _tok, _client, server = load_split_model(cfg)
    assert kind == "causal_lm"  # as _client_steps takes it
    one = ServerHandler(server, cfg.mode, hyper(cfg), loss_fn(kind), kind, train_dropout=False,
                        checkpoint_dir=tmp_path / "one")
    _, expected = _client_steps(cfg, one.handle, range(1, 5))
    sharded = tmp_path / "fsdp"
    with relayed_server_ranks(cfg, 2, "fsdp", sharded, 120.0, 120.0) as relay:
        mode, losses = _client_steps(cfg, relay.handle, range(1, 3))
        relay.handle(Message(Kind.REQUEST, Phase.SAVE, 2))
    assert (sharded / "server_ranks.json").exists()
    reference = tmp_path / "reference"  # one process's checkpoint after the same two steps
    torch.manual_seed(cfg.seed)
    _kind, _tok, _client, server = load_split_model(cfg)
    two_steps = ServerHandler(server, cfg.mode, hyper(cfg), loss_fn(kind), kind, train_dropout=False,
                              checkpoint_dir=reference)
    _client_steps(cfg, two_steps.handle, range(1, 3))
    two_steps.save(2)
    a = load_file(str(reference / "checkpoints/step-2/server.safetensors"))
    b = load_file(str(sharded / "checkpoints/step-2/server.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    sa = ckpt.read_state(reference / "checkpoints/step-2")["server_half"]["optimizer"]
    sb = ckpt.read_state(sharded / "checkpoints/step-2")["server_half"]["optimizer"]
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    assert any(float(v["momentum_buffer"].abs().sum()) > 0 for v in sa["state"].values())
    for i in sa["state"]:
        torch.testing.assert_close(sb["state"][i]["momentum_buffer"], sa["state"][i]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-5)
    with relayed_server_ranks(dataclasses.replace(cfg, resume=True), 2, "fsdp", sharded, 120.0, 120.0) as relay:
        relay.handle(Message(Kind.REQUEST, Phase.RESUME, 2))
        _, after = _client_steps(cfg, relay.handle, range(3, 5), mode)
    assert losses + after == pytest.approx(expected, rel=1e-5)
