"""A server half over P processes (``--server-procs``): server parameter bytes and peak memory per
rank, and step time, for P = 1, 2 and ddp / fsdp (hosl/training/server_group.py).

Each configuration starts fresh processes (``torch.multiprocessing``, gloo on CPU, NCCL where CUDA
is available): rank 0 holds the client half and drives ``--steps`` HOSL steps (plus one warm-up) of
the in-process client on synthetic causal-LM batches (random tokens, the last tokens the answer);
every rank holds its part of the server half. Reported per rank: the server half's parameter
bytes held by that rank (FSDP2: its shards), its peak resident memory (``ru_maxrss``: the whole
process, so rank 0's includes the client half and the interpreter), and rank 0's median step time.

    python benchmarks/server_scaling.py --json docs/server_scaling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time


def _batch(rows: int, seq: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -4:-1] = ids[:, -4:-1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _param_bytes(module) -> int:
    total = 0
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def _rank(rank: int, args, procs: int, parallel: str, port: int, results) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from hosl.training.config import TrainConfig
    from hosl.training.modes import make_mode
    from hosl.training.protocol import PHASE_NAMES
    from hosl.training.run import hyper, load_split_model, loss_fn
    from hosl.training.server_group import ServerGroup, follow
    from hosl.training.server_handler import ServerHandler
    from hosl.training.server_proxy import ServerProxy
    from hosl.transport import InProcessLink

    cfg = TrainConfig(model=args.model, task="sst2", mode="hosl", cut=args.cut, num_queries=args.num_queries,
                      lr_client=1e-5, lr_server=1e-3, batch_size=args.batch_size)
    torch.manual_seed(cfg.seed)
    kind, _tok, client, server = load_split_model(cfg)
    if rank != 0:
        del client
    group = ServerGroup.join(rank, procs, parallel, "127.0.0.1", port, args.timeout)
    hp, loss_of = hyper(cfg), loss_fn(kind)
    half = ServerHandler(server, "hosl", hp, loss_of, kind, train_dropout=False, group=group)
    times = []
    if rank == 0:
        mode = make_mode("hosl", client, None, hp, loss_of,
                         proxy=ServerProxy(InProcessLink(half.handle, PHASE_NAMES), kind))
        vocab = min(client.embed_tokens.num_embeddings, 256) if hasattr(client, "embed_tokens") else 256
        for step in range(args.steps + 1):  # step 0 warms up
            batch = _batch(args.batch_size, args.seq_len, vocab, seed=step)
            mode.step_number = step + 1
            start = time.perf_counter()
            mode.step(batch)
            times.append(time.perf_counter() - start)
        group.share(None)
    else:
        follow(group, half.answer)
    stats = torch.tensor([_param_bytes(server), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024],
                         dtype=torch.float64)
    if group.distributed:
        import torch.distributed as dist

        every = [torch.empty_like(stats) for _ in range(procs)]
        dist.all_gather(every, stats)
    else:
        every = [stats]
    group.leave()
    if rank == 0:
        results.put({"procs": procs, "parallel": parallel if procs > 1 else "-",
                     "server_param_bytes_per_rank": [int(s[0]) for s in every],
                     "peak_rss_bytes_per_rank": [int(s[1]) for s in every],
                     "step_seconds_median": statistics.median(times[1:]), "step_seconds": times[1:]})


def run_config(args, procs: int, parallel: str) -> dict:
    import torch.multiprocessing as mp

    from hosl.training.server_ranks import free_port

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(args, procs, parallel, free_port(), results), nprocs=procs,
                       join=True, start_method="spawn")
    return results.get()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv=None) -> list:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m-random", help="(default %(default)s)")
    p.add_argument("--cut", type=int, default=2, help="client blocks (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default %(default)s)")
    p.add_argument("--seq-len", type=int, default=32, help="(default %(default)s)")
    p.add_argument("--num-queries", type=int, default=2, help="(default %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default %(default)s)")
    p.add_argument("--procs", default="1,2", help="server process counts (default %(default)s)")
    p.add_argument("--parallel", default="ddp,fsdp", help="ddp and/or fsdp, for P > 1 (default %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for any collective (default %(default)s)")
    p.add_argument("--json", default=None, help="write the rows and the machine here")
    args = p.parse_args(argv)
    rows = []
    for procs in (int(x) for x in args.procs.split(",")):
        for parallel in (["ddp"] if procs == 1 else args.parallel.split(",")):
            row = run_config(args, procs, parallel)
            rows.append(row)
            print(f"P={procs} {parallel if procs > 1 else '-':4}  server params/rank "
                  f"{', '.join(f'{b / 2**20:.1f}' for b in row['server_param_bytes_per_rank'])} MiB  "
                  f"peak RSS/rank {', '.join(f'{b / 2**20:.0f}' for b in row['peak_rss_bytes_per_rank'])} MiB  "
                  f"step {row['step_seconds_median']:.3f} s", flush=True)
    if args.json:
        machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": _torch_version(),
                   "omp_num_threads": os.environ["OMP_NUM_THREADS"], "python": sys.version.split()[0]}
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "machine": machine, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
