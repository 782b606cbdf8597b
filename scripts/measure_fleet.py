"""Measure fleets on this machine: N client processes and one server on loopback (docs/fleet.md).

For each N: ``hosl serve --clients N`` and N ``hosl train --role client`` processes (one thread
each), then one single client that sees the same number of examples (batch N x B, the same steps)
for the accuracy comparison. Reported per N: wall time per step (the server's rounds), bytes up
and down per client per step, the relay's share of the download against sending the client's
weights, the server's peak RSS, and accuracy (rank 1 evaluates the shared model).

    python scripts/measure_fleet.py --clients 1,2,4,8 --json docs/fleet.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(a, out: Path, batch: int) -> list[str]:
    return ["--model", a.model, "--task", a.task, "--data-dir", a.data_dir, "--mode", "hosl", "--cut", str(a.cut),
            "--steps", str(a.steps), "--batch-size", str(batch), "--max-length", str(a.max_length),
            "--train-size", str(a.train_size), "--eval-size", str(a.eval_size), "--eval-every", str(a.steps),
            "--num-queries", str(a.num_queries), "--lr-client", str(a.lr_client), "--lr-server", str(a.lr_server),
            "--out", str(out), "--no-progress", "--wire", a.wire]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HOSL_SECRET="measure-fleet-secret-0123456789",
                HF_DATASETS_DISABLE_PROGRESS_BARS="1")


def run_fleet(a, n: int, out: Path) -> dict:
    port = _free_port()
    conn = ["--master-addr", "127.0.0.1", "--master-port", str(port), "--peer-timeout", "120",
            "--connect-timeout", "300"]
    fleet = ["--clients", str(n), "--client-sync", a.client_sync]
    cmd = [sys.executable, "-m", "hosl"]
    logs = []
    procs = []
    for role, rank in [("serve", None)] + [("client", r) for r in range(1, n + 1)]:
        argv = (["serve", "--server-procs", str(a.server_procs)] if role == "serve"
                else ["train", "--role", "client", "--rank", str(rank)])
        log = open(out.with_name(f"{out.name}.{role}{rank or ''}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen([*cmd, *argv, *_train_args(a, out, a.batch_size), *fleet, *conn], cwd=ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, env=_env()))
    t0 = time.monotonic()
    codes = [p.wait() for p in procs]
    wall = time.monotonic() - t0
    for log in logs:
        log.close()
    if any(codes):
        raise RuntimeError(f"N={n}: exit codes {codes}; see {out}.*.log")
    server = json.loads((out / "server" / "summary.json").read_text())
    clients = [json.loads((out / f"client{r}" / "summary.json").read_text()) for r in range(1, n + 1)]
    rounds = [json.loads(x) for x in (out / "server" / "fleet.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rounds if r["event"] == "step"]
    step_s = [b - a for a, b in zip(times, times[1:])] or [r["seconds"] for r in rounds if r["event"] == "step"]
    return {
        "clients": n, "wall_s": round(wall, 1),
        "step_s_median": statistics.median(step_s), "step_s_mean": statistics.fmean(step_s),
        "bytes_up_per_client_step": statistics.fmean(c["bytes_up_per_step"] for c in clients),
        "bytes_down_per_client_step": statistics.fmean(c["bytes_down_per_step"] for c in clients),
        "client_weight_bytes": clients[0]["client_weight_bytes"],
        "server_peak_rss_bytes": server["server_peak_rss_bytes"],
        "eval_accuracy": clients[0]["eval_accuracy"],
        "examples": n * a.batch_size * a.steps,
        "dropped": server["dropped"],
    }


def run_single(a, n: int, out: Path) -> dict:
    argv = [sys.executable, "-m", "hosl", "train", *_train_args(a, out, n * a.batch_size)]
    t0 = time.monotonic()
    subprocess.run(argv, cwd=ROOT, env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return {"batch": n * a.batch_size, "eval_accuracy": summary["eval_accuracy"], "wall_s": round(time.monotonic() - t0, 1),
            "step_s": summary["seconds"] / max(1, summary["steps"])}


def sync_cost(a, counts: list[int]) -> list[dict]:
    """What ``shared`` sync costs a client per step: applying N clients' updates (N x Q directions in
    one fused update) against its own Q, on this model's client half, one thread; and the bytes of
    the relay against the client half's weights."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from hosl.optim import HybridOrderOptimizer
    from hosl.training.config import TrainConfig
    from hosl.training.protocol import relay_fields
    from hosl.training.run import load_split_model
    from hosl.transport.wire import HEADER_LEN

    cfg = TrainConfig(model=a.model, task=a.task, cut=a.cut, data_dir=a.data_dir, progress=False)
    cfg.validate()
    _kind, _tok, client, _server = load_split_model(cfg)
    opt = HybridOrderOptimizer(client, None, lr=0.0, num_queries=a.num_queries)
    weights = sum(t.numel() * t.element_size() for t in client.state_dict().values())
    rows = []
    for n in counts:
        seeds = list(range(1, n * a.num_queries + 1))
        grads = [0.1] * len(seeds)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            opt.apply_update(seeds, grads)  # lr 0: the weights do not move, the work is the same
            times.append(time.perf_counter() - t0)
        ints, floats = relay_fields(0, [(r, seeds[(r - 1) * a.num_queries:r * a.num_queries],
                                         grads[:a.num_queries]) for r in range(1, n + 1)])
        relay_bytes = 8 * (HEADER_LEN + len(ints) + len(floats))
        rows.append({"clients": n, "apply_s": statistics.median(times), "relay_bytes": relay_bytes,
                     "client_weight_bytes": weights})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _stamped(result: dict) -> dict:
    """``result`` with the checkout's commit and clean-tree flag (hosl/provenance.py)."""
    sys.path.insert(0, str(ROOT))
    from hosl.provenance import stamped

    return stamped(result)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--task", default="sst2")
    p.add_argument("--cut", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--num-queries", type=int, default=2)
    p.add_argument("--lr-client", type=float, default=1e-5)
    p.add_argument("--lr-server", type=float, default=1e-2)
    p.add_argument("--client-sync", default="shared", choices=("shared", "local"))
    p.add_argument("--wire", default="native")
    p.add_argument("--data-dir", default=os.environ.get("HOSL_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--work", default="runs/measure-fleet", help="run folders (removed first)")
    p.add_argument("--no-single", action="store_true", help="skip the single-client comparison runs")
    p.add_argument("--server-procs", type=int, default=1,
                   help="the server half over P ranks (hosl serve --server-procs; its peak RSS is then the "
                   "serving process's alone)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--sync-only", action="store_true", help="only the shared-sync cost (no fleet runs)")
    a = p.parse_args(argv)
    counts = [int(x) for x in a.clients.split(",")]
    if a.sync_only:
        result = {"command": "python scripts/measure_fleet.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "settings": vars(a), "sync": sync_cost(a, counts)}
        if a.json:
            Path(a.json).write_text(json.dumps(_stamped(result), indent=2))
        return result
    work = Path(a.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows = []
    for n in counts:
        row = run_fleet(a, n, work / f"fleet{n}")
        if not a.no_single:
            row["single_client"] = run_single(a, n, work / f"single{n}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| N | s/step (median, server's view) | up / client / step | down / client / step | client weights | server peak RSS "
          "| accuracy (fleet) | accuracy (1 client, batch N x B) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        single = r.get("single_client", {}).get("eval_accuracy")
        print(f"| {r['clients']} | {r['step_s_median']:.3f} | {r['bytes_up_per_client_step'] / 1e6:.2f} MB | "
              f"{r['bytes_down_per_client_step']:.0f} B | {r['client_weight_bytes'] / 1e6:.1f} MB | "
              f"{r['server_peak_rss_bytes'] / 2**30:.2f} GiB | {r['eval_accuracy']} | {single} |")
    result = {"command": "python scripts/measure_fleet.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "settings": vars(a), "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(_stamped(result), indent=2))
    return result


if __name__ == "__main__":
    main()
