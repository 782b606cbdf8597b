"""Bytes on the wire per training step (HOSL vs FO-SL vs ZO-SL) and step time in one process vs two.

    python scripts/measure_transport.py bytes                 # OPT-125M shapes, batch 16, seq 128, Q=10
    python scripts/measure_transport.py time --steps 3 ...    # same run in-process and as two processes

Bytes are what the links count (``hosl.transport.message_nbytes``), driving the real client-side
modes against a stand-in server that answers with correctly shaped replies, so no model runs.
Step times come from the runs' summaries (``seconds`` / steps); on a shared 2-core machine they
are noisy, and the two processes compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def bytes_per_step(mode: str, batch: int, seq: int, hidden: int, q: int) -> tuple[int, int]:
    from hosl.training.protocol import Phase
    from hosl.training.server_proxy import ServerProxy
    from hosl.transport import InProcessLink, Kind, Message

    def handle(req):  # answers shaped like the real server's
        if req.phase == Phase.BACKPROP:
            return Message(Kind.REPLY, req.phase, req.step, floats=[1.0], tensors=[torch.empty_like(req.tensors[0])])
        if req.phase in (Phase.CLEAN_LOSS, Phase.LOSSES):
            return Message(Kind.REPLY, req.phase, req.step, floats=[1.0] * (req.tensors[0].shape[0] // batch))
        return Message(Kind.REPLY, req.phase, req.step)

    link = InProcessLink(handle)
    proxy = ServerProxy(link, "causal_lm")
    data = {"attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": torch.zeros(batch, seq, dtype=torch.long)}
    h = torch.empty(batch, seq, hidden)
    proxy.begin_step(1, data)
    if mode == "hosl":  # clean (FO on the server) + 2Q perturbed, one activation each; step end
        proxy.clean_loss(h)
        for _ in range(2 * q):
            proxy.losses(h)
        proxy.end_step()
    elif mode == "zo-sl":  # 2Q perturbed, each with its (seed, scale); step end carries seeds and estimates
        for i in range(2 * q):
            proxy.losses(h, (i, 1e-3))
        proxy.end_step(list(range(q)), [0.0] * q)
    else:  # fo-sl: one activation up, its gradient down
        proxy.backprop(h)
        proxy.end_step()
    return link.bytes_up, link.bytes_down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_times(args) -> dict:
    common = ["--model", args.model, "--task", "sst2", "--data-dir", args.data_dir, "--mode", args.mode,
              "--cut", str(args.cut), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--num-queries", str(args.num_queries), "--train-size", "64",
              "--eval-size", "4", "--eval-every", str(10**6), "--checkpoint-every", str(10**6), "--no-progress"]
    cmd = [sys.executable, "-m", "hosl"]
    out = Path(tempfile.mkdtemp(prefix="hosl-measure-"))
    subprocess.run([*cmd, "train", *common, "--out", str(out / "one")], cwd=ROOT, check=True, timeout=1800,
                   stdout=subprocess.DEVNULL)
    port = _free_port()
    conn = ["--master-addr", "127.0.0.1", "--master-port", str(port), "--out", str(out / "two")]
    env = dict(os.environ, HOSL_SECRET=secrets.token_hex(32))  # the two sides' shared secret
    server = subprocess.Popen([*cmd, "serve", "--rank", "1", *common, *conn], cwd=ROOT, stdout=subprocess.DEVNULL,
                              env=env)
    subprocess.run([*cmd, "train", "--role", "client", "--rank", "0", *common, *conn], cwd=ROOT, check=True,
                   timeout=1800, stdout=subprocess.DEVNULL, env=env)
    server.wait(timeout=60)
    one = json.loads((out / "one" / "summary.json").read_text())
    two = json.loads((out / "two" / "client" / "summary.json").read_text())
    return {"in_process_s_per_step": one["seconds"] / one["steps"], "two_process_s_per_step": two["seconds"] / two["steps"],
            "bytes_up_per_step": two["bytes_up_per_step"], "bytes_down_per_step": two["bytes_down_per_step"],
            "runs": str(out)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bytes")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--seq", type=int, default=128)
    b.add_argument("--hidden", type=int, default=768, help="OPT-125M: 768")
    b.add_argument("--num-queries", type=int, default=10)
    t = sub.add_parser("time")
    t.add_argument("--model", default="opt-125m-random")
    t.add_argument("--mode", default="hosl")
    t.add_argument("--cut", type=int, default=5)
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--num-queries", type=int, default=10)
    t.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data"))
    args = p.parse_args()
    if args.what == "bytes":
        rows = {m: bytes_per_step(m, args.batch_size, args.seq, args.hidden, args.num_queries)
                for m in ("hosl", "fo-sl", "zo-sl")}
        print(f"batch {args.batch_size}, seq {args.seq}, hidden {args.hidden}, Q={args.num_queries} (fp32 activations)")
        print(f"{'mode':6} {'bytes up/step':>15} {'bytes down/step':>16}")
        for m, (up, down) in rows.items():
            print(f"{m:6} {up:>15,} {down:>16,}")
        print(json.dumps(rows))
    else:
        t0 = time.time()
        print(json.dumps(step_times(args), indent=2))
        print(f"(measured in {time.time() - t0:.0f} s; noisy: shared cores, both processes on one machine)")


if __name__ == "__main__":
    main()
