"""Time per training step: HOSL against the same step written the plain MeZO way, on one split model.

Both do the same work: the clean client forward, the server's forward and backward at the clean
point, ``2Q`` perturbed client forwards (central differences) each followed by a server forward
without grad, the client ZO update over all ``Q`` directions, and the server's SGD step.

* ``mezo``  MeZO's way: per direction ``torch.manual_seed(seed)`` then ``torch.normal`` + ``add_``
            per parameter, walking the weights in place +1 / -2 / +1 (``w + eps z``, ``w - eps z``,
            back to ``w``: three regenerations of ``z``), directions and server evaluations one after
            another, and the update regenerating each ``z`` again (``Q`` passes over the weights).
* ``hosl``  ``hosl.HybridOrderOptimizer`` (``server_batch=1``: server evaluations one after
            another too): perturbed forwards through the module-at-a-time scratch, one fused
            ``zo_update_`` for all ``Q`` directions.
* ``hosl-sb`` the same with ``server_batch=2Q``: the server evaluates all perturbed activations as
            one batch (DESIGN.md section 5).

Breakdown per step: client forwards (without the perturbation), server forwards, server backward
(+ the server's SGD step), perturbation and update (client side). For HOSL the perturbation is
timed by wrapping ``hosl.ops.perturb_`` / ``zo_update_`` (the scratch path calls them inside the
client's forward; their time is moved out of "client forwards"), and the server backward is the
rest of the step.

Times are the minimum over ``--repeats`` steps after one warm-up step per variant (the machine is
shared and noisy); ratios come from one run.

    python benchmarks/step.py --json step.json [--model opt-125m-random --cut 5 --batch 4 --seq 64
                                                --queries 1,10 --threads 1 --repeats 2]
    python benchmarks/step.py --tiny --json /tmp/s.json      # tiny-opt, seconds (smoke test)
    python benchmarks/step.py --device cuda --model opt-1.3b-random --batch 16 --seq 128 --queries 10

On a GPU (``--device cuda``) every bucket and step is closed by ``torch.cuda.synchronize()`` so the
times are the GPU's, not the launch queue's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path


def _threads_from_argv(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, item in enumerate(argv):
        if item == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if item.startswith("--threads="):
            return int(item.split("=", 1)[1])
    return 1


BUCKETS = ("client_forward", "server_forward", "server_backward", "perturb_update")


def _no_sync():
    pass


_sync = _no_sync  # torch.cuda.synchronize with --device cuda (set in main)


class Buckets:
    """Seconds per bucket; ``with b("name"):`` adds the block's time."""

    def __init__(self):
        self.s = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name):
        _sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.s[name] += time.perf_counter() - t0


def build(model_name: str, cut: int, seed: int = 0, device: str = "cpu"):
    from hosl.models import load_model, split

    model, _ = load_model(model_name, "causal_lm", seed=seed)
    client, server = split(model.to(device), cut)
    client.eval()
    server.eval()  # ZO estimates need the +/- passes to see the same function (no dropout)
    return client, server


def make_batch(vocab: int, batch: int, seq: int, device: str = "cpu"):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = torch.randint(3, vocab, (batch,), generator=g)
    return ids.to(device), mask.to(device), labels.to(device)


def server_loss_fn(server, mask, labels, t: Buckets):
    """LM cross-entropy of the answer token at the last position (one loss per concatenated copy)."""
    import torch
    import torch.nn.functional as F

    def loss(h):
        copies = h.shape[0] // labels.shape[0]
        with t("server_forward"):
            logits = server(h, mask.repeat(copies, 1) if copies > 1 else mask)[:, -1]
            per_row = F.cross_entropy(logits.float(), labels.repeat(copies), reduction="none")
            out = per_row.view(copies, -1).mean(1)
            return out[0] if copies == 1 else out
    return loss


# ---------------------------------------------------------------------------------------------
# the two steps
# ---------------------------------------------------------------------------------------------

def mezo_step(client, server, server_opt, ids, mask, labels, *, q, eps, lr, gen, t: Buckets):
    import torch

    params = [p for p in client.parameters() if p.requires_grad]
    loss_of = server_loss_fn(server, mask, labels, t)

    def walk(seed, scale):
        torch.manual_seed(seed)
        for p in params:
            z = torch.normal(mean=0.0, std=1.0, size=p.size(), dtype=p.dtype, device=p.device)
            p.data.add_(z, alpha=scale)

    with torch.no_grad(), t("client_forward"):
        h0 = client(ids, mask)
    loss0 = loss_of(h0)
    with t("server_backward"):
        loss0.backward()
    del h0
    seeds = torch.randint(0, 2**62, (q,), generator=gen).tolist()
    grads = []
    for seed in seeds:
        losses = []
        for scale in (eps, -2 * eps):
            with t("perturb_update"):
                walk(seed, scale)
            with torch.no_grad():
                with t("client_forward"):
                    h = client(ids, mask)
                losses.append(float(loss_of(h)))
            del h
        with t("perturb_update"):
            walk(seed, eps)  # back to w (up to rounding: MeZO's walk drifts)
        grads.append((losses[0] - losses[1]) / (2 * eps))
    with t("perturb_update"):
        for seed, g in zip(seeds, grads):
            walk(seed, -lr * g / q)
    with t("server_backward"):
        server_opt.step()
        server_opt.zero_grad(set_to_none=True)
    return float(loss0.detach())


@contextlib.contextmanager
def timed_ops(t: Buckets):
    """Charge ``hosl.ops.perturb_`` and ``zo_update_`` to the perturbation bucket while inside.

    The optimizer and the scratch perturber call them as ``ops.perturb_`` / ``ops.zo_update_``
    (module attributes, looked up at call time), so wrapping the attributes of ``hosl.ops`` sees
    every call; they are restored on exit.
    """
    from hosl import ops

    saved = {name: getattr(ops, name) for name in ("perturb_", "zo_update_")}

    def wrap(fn):
        def run(*args, **kwargs):
            with t("perturb_update"):
                return fn(*args, **kwargs)
        return run

    try:
        for name, fn in saved.items():
            setattr(ops, name, wrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


# ---------------------------------------------------------------------------------------------

def run_variant(variant, q, client, server, batch, repeats):
    import torch

    import hosl

    ids, mask, labels = batch
    server_opt = torch.optim.SGD(server.parameters(), lr=1e-3, momentum=0.9)
    best, best_t = float("inf"), None
    if variant == "mezo":
        gen = torch.Generator().manual_seed(0)
        for r in range(repeats + 1):  # the first is the warm-up
            t = Buckets()
            t0 = time.perf_counter()
            mezo_step(client, server, server_opt, ids, mask, labels, q=q, eps=1e-3, lr=1e-6, gen=gen, t=t)
            _sync()
            total = time.perf_counter() - t0
            if r and total < best:
                best, best_t = total, dict(t.s)
    else:
        opt = hosl.HybridOrderOptimizer(client, server_opt, lr=1e-6, eps=1e-3, num_queries=q,
                                        server_batch=1 if variant == "hosl" else 2 * q)
        for r in range(repeats + 1):
            t = Buckets()
            t0 = time.perf_counter()
            _hosl_step(opt, client, server, ids, mask, labels, t)
            _sync()
            total = time.perf_counter() - t0
            if r and total < best:
                best, best_t = total, dict(t.s)
    row = {"step_s": best, **{k: best_t.get(k, 0.0) for k in BUCKETS}}
    row["other_s"] = best - sum(row[k] for k in BUCKETS)
    return row


def _hosl_step(opt, client, server, ids, mask, labels, t: Buckets):
    """One HOSL step with its time split into the buckets.

    Client forwards and server forwards are timed around ``client_fn`` / ``server_loss_fn``;
    ``perturb_`` calls (inside the client forwards) and ``zo_update_`` (after them) are timed by
    :func:`timed_ops`; the perturbation time spent inside ``client_fn`` is moved out of the client
    bucket; the server backward and the server's step are what remains of the step.
    """
    inner = Buckets()

    def client_fn():
        before = inner.s["perturb_update"]
        t0 = time.perf_counter()
        h = client(ids, mask)
        _sync()
        spent = time.perf_counter() - t0
        inner.s["client_forward"] += spent - (inner.s["perturb_update"] - before)
        return h

    t0 = time.perf_counter()
    with timed_ops(inner):
        opt.step(client_fn, server_loss_fn(server, mask, labels, inner))
    _sync()
    total = time.perf_counter() - t0
    for k in ("client_forward", "server_forward", "perturb_update"):
        t.s[k] = inner.s[k]
    t.s["server_backward"] = total - sum(inner.s[k] for k in ("client_forward", "server_forward", "perturb_update"))


def main(argv=None) -> dict:
    threads = _threads_from_argv(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--model", default="opt-125m-random")
    p.add_argument("--cut", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--queries", default="1,10")
    p.add_argument("--variants", default="mezo,hosl,hosl-sb")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads, read before torch loads (1: on a shared machine 2 threads stall "
                        "whenever another process holds a core)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per variant after one warm-up step")
    p.add_argument("--tiny", action="store_true", help="tiny-opt, cut 2, batch 2, seq 8, 1 repeat (smoke test; Q in 1,2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the model and batch live (default %(default)s; cuda: times closed by synchronize)")
    a = p.parse_args(argv)
    if a.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch.cuda.is_available() is False")
        global _sync
        _sync = torch.cuda.synchronize
    if a.tiny:
        a.model, a.cut, a.batch, a.seq, a.repeats, a.queries = "tiny-opt", 2, 2, 8, 1, "1,2"

    client, server = build(a.model, a.cut, device=a.device)
    batch = make_batch(client.config.vocab_size, a.batch, a.seq, a.device)
    n_client = sum(p.numel() for p in client.parameters())
    results: dict = {}
    for q in [int(x) for x in a.queries.split(",")]:
        for variant in a.variants.split(","):
            # every variant starts from the same weights (MeZO's walk and the updates change them)
            state_c = {k: v.clone() for k, v in client.state_dict().items()}
            state_s = {k: v.clone() for k, v in server.state_dict().items()}
            results[f"{variant}/q{q}"] = run_variant(variant, q, client, server, batch, a.repeats)
            client.load_state_dict(state_c)
            server.load_state_dict(state_s)
            print(f"  {variant} Q={q}: {results[f'{variant}/q{q}']['step_s']:.3f} s", file=sys.stderr)
        for variant in a.variants.split(","):
            if variant != "mezo" and f"mezo/q{q}" in results:
                results[f"{variant}/q{q}"]["speedup_vs_mezo"] = (
                    results[f"mezo/q{q}"]["step_s"] / results[f"{variant}/q{q}"]["step_s"])

    results["meta"] = {
        "command": "python benchmarks/step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": a.model, "cut": a.cut, "batch": a.batch, "seq": a.seq, "dtype": "float32", "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device == "cuda" else None,
        "client_params": n_client, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "timing": f"min of {a.repeats} steps after a warm-up step, per variant",
    }
    print(f"step time, {a.model} cut {a.cut}, batch {a.batch} x seq {a.seq}, fp32, "
          f"{torch.get_num_threads()} threads, {n_client / 1e6:.1f}M client parameters")
    print(f"{'variant':<10} {'Q':>3} {'step s':>8} {'client fwd':>11} {'server fwd':>11} {'server bwd':>11} "
          f"{'perturb+upd':>12} {'vs MeZO':>8}")
    for key, r in results.items():
        if key == "meta":
            continue
        variant, q = key.split("/q")
        speed = f"{r['speedup_vs_mezo']:.2f}x" if "speedup_vs_mezo" in r else ""
        print(f"{variant:<10} {q:>3} {r['step_s']:>8.3f} {r['client_forward']:>11.3f} {r['server_forward']:>11.3f} "
              f"{r['server_backward']:>11.3f} {r['perturb_update']:>12.3f} {speed:>8}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    main()
