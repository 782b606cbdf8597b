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
    """Every rank of hosl serve loads the run's checkpoints (one process's, or sharded)."""
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


def _elements_per_file(folder: Path) -> dict:
    """How many tensor elements (weights and optimizer state) each file of a DCP checkpoint holds,
    from its metadata (which chunk of which tensor is in which file)."""
    from math import prod

    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    counts: dict = {}
    for index, where in meta.storage_data.items():
        chunks = getattr(meta.state_dict_metadata[index.fqn], "chunks", None)
        if chunks is None:  # a non-tensor value (a learning rate, a step count)
            continue
        (chunk,) = [c for c in chunks if tuple(c.offsets) == tuple(index.offset)]
        counts[where.relative_path] = counts.get(where.relative_path, 0) + prod(chunk.sizes)
    return counts


def _client_checkpointed_run(run: Path, cfg: TrainConfig, client: torch.nn.Module, step: int) -> None:
    """``run`` as a two-process run's ``--out``: ``client/`` (its config and a checkpoint of
    ``client`` at ``step``) beside the ``server/`` checkpoints already there."""
    from hosl.training import checkpoint as ckpt

    (run / "client").mkdir(parents=True)
    (run / "client" / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    ckpt.save_checkpoint(run / "client", step, {"client": client}, {"step": step})


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_and_resume_over_two_ranks_and_one(tmp_path):
    """``hosl serve --server-parallel fsdp`` over 2 ranks (tiny Llama, SGD with momentum) writes its
    step-2 checkpoint with torch.distributed.checkpoint: one shard file per rank, each about half
    the weights and momentum (no rank holds a gathered copy). A fresh pair of fsdp ranks, and one
    server process without a process group, resume from it: steps 3 and 4 give the losses of an
    uninterrupted one-process run within 1e-5 relative (the float reduction order, as above).
    ``hosl export`` of the sharded run equals the export of a one-process run of the same steps
    within 1e-5."""
    from hosl.run_export import export_run
    from hosl.training import sharded_checkpoint
    from hosl.training.protocol import Phase
    from hosl.training.server_ranks import relayed_server_ranks
    from hosl.transport.wire import Kind, Message

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = TrainConfig(model="tiny-llama", task="sst2", mode="hosl", cut=1, num_queries=2, lr_client=1e-3,
                      lr_server=1e-2, batch_size=5)

    def one_process(checkpoint_dir, resume_allowed=False):
        torch.manual_seed(cfg.seed)
        kind, _tok, _client, server = load_split_model(cfg)
        assert kind == "causal_lm"  # as _client_steps takes it
        return ServerHandler(server, cfg.mode, hyper(cfg), loss_fn(kind), kind, train_dropout=False,
                             checkpoint_dir=checkpoint_dir, resume_allowed=resume_allowed)

    _, expected = _client_steps(cfg, one_process(tmp_path / "uninterrupted").handle, range(1, 5))
    sharded = tmp_path / "sharded"
    with relayed_server_ranks(cfg, 2, "fsdp", sharded / "server", 120.0, 120.0) as relay:
        mode, losses = _client_steps(cfg, relay.handle, range(1, 3))
        relay.handle(Message(Kind.REQUEST, Phase.SAVE, 2))
    step_2 = sharded / "server/checkpoints/step-2"
    assert sorted(p.name for p in step_2.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "checksums.json", "state.pt"]
    assert sharded_checkpoint.run_format(sharded / "server") == "dcp"
    # each rank's file holds its own half of every tensor's elements (no rank wrote a gathered copy)
    per_file = _elements_per_file(step_2)
    assert sorted(per_file) == ["__0_0.distcp", "__1_0.distcp"]
    total = sum(per_file.values())
    assert all(0.4 * total < n < 0.6 * total for n in per_file.values()), per_file
    # one process's checkpoint of the same two steps, and its client, for the export and P = 1 below
    reference = tmp_path / "reference"
    two_steps = one_process(reference / "server")
    client_at_2, _ = _client_steps(cfg, two_steps.handle, range(1, 3))
    two_steps.save(2)

    _client_checkpointed_run(sharded, cfg, mode.client, 2)
    _client_checkpointed_run(reference, cfg, client_at_2.client, 2)
    export_run(reference, tmp_path / "export-one")
    export_run(sharded, tmp_path / "export-sharded")
    a = load_file(str(tmp_path / "export-one/model.safetensors"))
    b = load_file(str(tmp_path / "export-sharded/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)

    with relayed_server_ranks(dataclasses.replace(cfg, resume=True), 2, "fsdp", sharded / "server",
                              120.0, 120.0) as relay:
        relay.handle(Message(Kind.REQUEST, Phase.RESUME, 2))
        _, after_p2 = _client_steps(cfg, relay.handle, range(3, 5), mode)
    assert losses + after_p2 == pytest.approx(expected, rel=1e-5)

    resumed = one_process(sharded / "server", resume_allowed=True)  # P = 1: DCP's load without a group
    resumed.handle(Message(Kind.REQUEST, Phase.RESUME, 2))
    _, after_p1 = _client_steps(cfg, resumed.handle, range(3, 5), client_at_2)
    assert after_p1 == pytest.approx(expected[2:], rel=1e-5)
    resumed.save(4)  # the run keeps its format: one rank's shards now
    assert sorted(p.name for p in (sharded / "server/checkpoints/step-4").iterdir()) == [
        ".metadata", "__0_0.distcp", "checksums.json", "state.pt"]

