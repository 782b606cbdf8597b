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
            one batch (``server_batch``, ``docs/optimizer.md`` step 3).
* ``hosl-qb``  ``query_batch=D`` (``--query-batch``, default ``2Q``): ``D`` perturbed points per client
            forward over a ``D x B`` batch (fused perturbed linear/embedding with ``D`` directions on
            CUDA, the materialising ops on CPU), the server evaluating the ``D`` activations at once.
* ``hosl-auto`` ``query_batch="auto"`` within ``--query-memory-budget`` bytes (default: the
            optimizer's, a quarter of the client's weights); the ``D`` it picked is in the JSON.
* ``hosl-linear`` / ``hosl-linear-client`` ``server_estimate="linear"``: no server forward per point,
            ``<dL/dh, h+ - h->`` instead; the dot products on the server / on the client (the same
            work in one process; the placements differ in bytes, which the table states).
            ``--query-batch`` applies to these too.
* ``hosl``    takes ``--query-batch`` / ``--server-estimate`` / ``--linear-on`` as given (defaults: today's
            sequential exact step).
* ``--directions gaussian,lowrank:1,lowrank:4``: every hosl variant once per direction family
            (``lowrank:R``: ``direction="lowrank", rank=R``; its sequential passes run the fused
            ``x W^T + s (x V) U^T`` one point at a time, its batched ones one GEMM over the ``D*B``
            rows plus a rank-R term per direction); keys ``variant/qQ/lowrank-rR``, ``vs_hosl`` against
            ``hosl`` of the same direction.
* ``fo-sl``   FO-SL's step: client forward with autograd, server forward and backward, client backward
            with dL/dh, both SGD steps.

Forward-equivalents per step: the client's and the server's passes counted in batches of ``B`` rows,
a backward as two forwards, weighted by each half's share of the model's matmul weights (the
``fwd_equiv`` column: 1.0 is one forward of the whole model). Bytes per step between the halves
(fp32 activations ``B x T x H``): exact ``2Q+1`` up, linear on the server ``Q+1`` up (differences),
linear on the client and FO-SL one up and one down.

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
    python benchmarks/step.py --batches 1x32,4x64,16x128 --queries 10 --repeats 1 --warmup 0 \
        --variants hosl,hosl-qb,hosl-auto,hosl-linear,hosl-linear-client,fo-sl --json step_issue15.json
    python benchmarks/step.py --device cuda --model opt-1.3b-random --batch 16 --seq 128 --queries 10
    python benchmarks/step.py --variants hosl,hosl-qb --queries 10 --repeats 1 --warmup 0 \
        --directions gaussian,lowrank:1,lowrank:4 --json step_lowrank.json   # sequential vs D = 2Q, per family

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


BUCKETS = ("client_forward", "server_forward", "server_backward", "perturb_update", "client_backward")


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


class Passes:
    """Rows each half ran forward (and backward) in one step, in batches of ``B`` rows."""

    def __init__(self, rows: int):
        self.rows, self.client_fwd, self.server_fwd, self.client_bwd, self.server_bwd = rows, 0.0, 0.0, 0, 0

    def fwd_equiv(self, client_share: float) -> float:
        return (client_share * (self.client_fwd + 2 * self.client_bwd)
                + (1 - client_share) * (self.server_fwd + 2 * self.server_bwd))


def server_loss_fn(server, mask, labels, t: Buckets, passes: Passes | None = None):
    """LM cross-entropy of the answer token at the last position (one loss per concatenated copy)."""
    import torch
    import torch.nn.functional as F

    def loss(h):
        copies = h.shape[0] // labels.shape[0]
        if passes is not None:
            passes.server_fwd += copies
            passes.server_bwd += int(torch.is_grad_enabled())  # the clean point: its loss is back-propagated
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

def fosl_step(client, server, client_opt, server_opt, ids, mask, labels, t: Buckets, passes: Passes):
    """FO-SL: the client forward with autograd, the server's loss and backward, dL/dh back down."""
    with t("client_forward"):
        h = client(ids, mask)
    passes.client_fwd += 1
    hd = h.detach().requires_grad_(True)
    loss = server_loss_fn(server, mask, labels, t, passes)(hd)
    with t("server_backward"):
        loss.backward()
        server_opt.step()
        server_opt.zero_grad(set_to_none=True)
    with t("client_backward"):
        h.backward(hd.grad)
        client_opt.step()
        client_opt.zero_grad(set_to_none=True)
    passes.client_bwd += 1
    return float(loss.detach())


def hosl_options(variant: str, q: int, a) -> dict:
    """HybridOrderOptimizer options of a hosl variant (see the module docstring)."""
    qb = a.query_batch
    if variant == "hosl":
        return dict(query_batch=qb, server_estimate=a.server_estimate, linear_on=a.linear_on,
                    query_memory_budget=a.query_memory_budget)
    if variant == "hosl-sb":
        return dict(server_batch=2 * q)
    if variant == "hosl-qb":
        return dict(query_batch=2 * q if qb == 1 else qb, query_memory_budget=a.query_memory_budget)
    if variant == "hosl-auto":
        return dict(query_batch="auto", query_memory_budget=a.query_memory_budget)
    if variant in ("hosl-linear", "hosl-linear-client"):
        return dict(server_estimate="linear", linear_on="client" if variant.endswith("client") else "server",
                    query_batch=qb, query_memory_budget=a.query_memory_budget)
    raise ValueError(f"unknown variant {variant!r}")


VARIANTS = ("mezo", "hosl", "hosl-sb", "hosl-qb", "hosl-auto", "hosl-linear", "hosl-linear-client", "fo-sl")


def bytes_per_step(variant: str, opts: dict, q: int, activation: int) -> tuple[int, int]:
    """(up, down) bytes between the halves per step, activations only (losses are a few floats)."""
    if variant == "fo-sl":
        return activation, activation
    if variant == "mezo":
        return 0, 0
    if opts.get("server_estimate") == "linear":
        return ((activation, activation) if opts.get("linear_on") == "client" else ((q + 1) * activation, 0))
    return (2 * q + 1) * activation, 0


def parse_direction(text: str) -> dict:
    """``"gaussian"`` -> ``{"direction": "gaussian"}``; ``"lowrank:4"`` -> ``{"direction": "lowrank", "rank": 4}``."""
    name, _, rank = text.partition(":")
    return {"direction": name, **({"rank": int(rank)} if rank else {})}


def direction_tag(text: str) -> str:
    """The result key's suffix of a ``--directions`` entry ("" for gaussian, ``/lowrank-r4``)."""
    options = parse_direction(text)
    if options["direction"] == "gaussian":
        return ""
    return f"/{options['direction']}" + (f"-r{options['rank']}" if "rank" in options else "")


def run_variant(variant, q, client, server, batch, repeats, a=None, warmup=1, direction: dict | None = None):
    import torch

    import hosl

    ids, mask, labels = batch
    server_opt = torch.optim.SGD(server.parameters(), lr=1e-3, momentum=0.9)
    best, best_t, best_passes, extra = float("inf"), None, None, {}
    if variant == "fo-sl":
        client_opt = torch.optim.SGD(client.parameters(), lr=1e-3, momentum=0.9)
        for r in range(repeats + warmup):
            t, passes = Buckets(), Passes(ids.shape[0])
            t0 = time.perf_counter()
            fosl_step(client, server, client_opt, server_opt, ids, mask, labels, t, passes)
            _sync()
            total = time.perf_counter() - t0
            if r >= warmup and total < best:
                best, best_t, best_passes = total, dict(t.s), passes
    elif variant == "mezo":
        gen = torch.Generator().manual_seed(0)
        for r in range(repeats + warmup):
            t = Buckets()
            t0 = time.perf_counter()
            mezo_step(client, server, server_opt, ids, mask, labels, q=q, eps=1e-3, lr=1e-6, gen=gen, t=t)
            _sync()
            total = time.perf_counter() - t0
            if r >= warmup and total < best:
                best, best_t = total, dict(t.s)
        best_passes = Passes(ids.shape[0])
        best_passes.client_fwd = best_passes.server_fwd = 2 * q + 1
        best_passes.server_bwd = 1
    else:
        opts = hosl_options(variant, q, a) if a is not None else {"server_batch": 1 if variant == "hosl" else 2 * q}
        opt = hosl.HybridOrderOptimizer(client, server_opt, lr=1e-6, eps=1e-3, num_queries=q, **opts,
                                        **(direction or {}))
        for r in range(repeats + warmup):
            t, passes = Buckets(), Passes(ids.shape[0])
            t0 = time.perf_counter()
            _hosl_step(opt, client, server, ids, mask, labels, t, passes)
            _sync()
            total = time.perf_counter() - t0
            if r >= warmup and total < best:
                best, best_t, best_passes = total, dict(t.s), passes
        extra = {"query_batch_used": opt.last_query_batch,
                 **{k: v for k, v in opts.items() if k in ("query_batch", "server_estimate", "linear_on")}}
    row = {"step_s": best, **{k: best_t.get(k, 0.0) for k in BUCKETS}}
    row["other_s"] = best - sum(row[k] for k in BUCKETS)
    row["passes"] = {"client_fwd": best_passes.client_fwd, "server_fwd": best_passes.server_fwd,
                     "client_bwd": best_passes.client_bwd, "server_bwd": best_passes.server_bwd}
    row["_passes"] = best_passes
    row.update(extra)
    return row


def _hosl_step(opt, client, server, ids, mask, labels, t: Buckets, passes: Passes | None = None):
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
        if passes is not None:
            passes.client_fwd += h.shape[0] / ids.shape[0]
        spent = time.perf_counter() - t0
        inner.s["client_forward"] += spent - (inner.s["perturb_update"] - before)
        return h

    t0 = time.perf_counter()
    with timed_ops(inner):
        opt.step(client_fn, server_loss_fn(server, mask, labels, inner, passes))
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
    p.add_argument("--variants", default="mezo,hosl,hosl-sb", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--batches", default=None, metavar="BxT[,BxT...]",
                   help="several batch shapes in one run, e.g. 1x32,4x64,16x128 (overrides --batch/--seq)")
    p.add_argument("--query-batch", type=lambda v: v if v == "auto" else int(v), default=1, metavar="D|auto",
                   help="hosl, hosl-linear*: points per client forward; hosl-qb: D (default 2Q when 1)")
    p.add_argument("--query-memory-budget", type=int, default=None, metavar="BYTES",
                   help="hosl-auto (and an explicit D): the bytes the batched points may add")
    p.add_argument("--directions", default="gaussian", metavar="NAME[:R],...",
                   help="direction families of the hosl variants, e.g. gaussian,lowrank:1,lowrank:4 (default %(default)s)")
    p.add_argument("--server-estimate", default="exact", choices=("exact", "linear"), help="of the hosl variant")
    p.add_argument("--linear-on", default="server", choices=("server", "client"), help="of the hosl variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the timed ones")
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
    n_client = sum(p.numel() for p in client.parameters())
    linear_numel = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))  # noqa: E731
    client_share = linear_numel(client) / (linear_numel(client) + linear_numel(server))
    shapes = ([tuple(int(v) for v in s.split("x")) for s in a.batches.split(",")] if a.batches
              else [(a.batch, a.seq)])
    hidden = client.config.hidden_size
    results: dict = {}
    for b, seq in shapes:
        a.batch, a.seq = b, seq
        batch = make_batch(client.config.vocab_size, b, seq, a.device)
        tag = f"/b{b}x{seq}" if a.batches else ""
        for q in [int(x) for x in a.queries.split(",")]:
            runs = [(v, d) for d in a.directions.split(",") for v in a.variants.split(",")
                    if d == a.directions.split(",")[0] or v not in ("mezo", "fo-sl")]  # those have no direction
            for variant, direction in runs:
                # every variant starts from the same weights (MeZO's walk and the updates change them)
                state_c = {k: v.clone() for k, v in client.state_dict().items()}
                state_s = {k: v.clone() for k, v in server.state_dict().items()}
                key = f"{variant}/q{q}{tag}" + ("" if variant in ("mezo", "fo-sl") else direction_tag(direction))
                row = run_variant(variant, q, client, server, batch, a.repeats, a, a.warmup, parse_direction(direction))
                row["fwd_equiv"] = row.pop("_passes").fwd_equiv(client_share)
                opts = {k: row.get(k) for k in ("server_estimate", "linear_on")}
                row["bytes_up"], row["bytes_down"] = bytes_per_step(variant, opts, q, b * seq * hidden * 4)
                results[key] = row
                client.load_state_dict(state_c)
                server.load_state_dict(state_s)
                print(f"  {key.split('/')[0]} Q={q} {b}x{seq} {direction}: {row['step_s']:.3f} s", file=sys.stderr,
                      flush=True)
                if a.json:  # as we go: a long run stopped early keeps what it measured
                    Path(a.json).write_text(json.dumps(results, indent=2))
            for variant, direction in runs:
                dtag = "" if variant in ("mezo", "fo-sl") else direction_tag(direction)
                key = f"{variant}/q{q}{tag}{dtag}"
                base = f"mezo/q{q}{tag}"
                if variant != "mezo" and base in results:
                    results[key]["speedup_vs_mezo"] = results[base]["step_s"] / results[key]["step_s"]
                if variant != "hosl" and f"hosl/q{q}{tag}{dtag}" in results:
                    results[key]["vs_hosl"] = results[key]["step_s"] / results[f"hosl/q{q}{tag}{dtag}"]["step_s"]

    results["meta"] = {
        "command": "python benchmarks/step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": a.model, "cut": a.cut, "batch": a.batch, "seq": a.seq, "batches": a.batches, "dtype": "float32",
        "device": a.device, "client_matmul_share": client_share,
        "device_name": torch.cuda.get_device_name() if a.device == "cuda" else None,
        "client_params": n_client, "directions": a.directions, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "timing": f"min of {a.repeats} steps after {a.warmup} warm-up step(s), per variant",
    }
    shape_text = f"batches {a.batches}" if a.batches else f"batch {a.batch} x seq {a.seq}"
    print(f"step time, {a.model} cut {a.cut}, {shape_text}, fp32, "
          f"{torch.get_num_threads()} threads, {n_client / 1e6:.1f}M client parameters")
    print(f"{'variant':<19} {'Q':>8} {'step s':>8} {'client fwd':>11} {'server fwd':>11} {'server bwd':>11} "
          f"{'perturb+upd':>12} {'D':>3} {'fwd-eq':>7} {'MB up':>8} {'MB down':>8} {'vs hosl':>8} {'vs MeZO':>8}")
    for key, r in results.items():
        if key == "meta":
            continue
        variant, q = key.split("/q", 1)
        speed = f"{r['speedup_vs_mezo']:.2f}x" if "speedup_vs_mezo" in r else ""
        rel = f"{r['vs_hosl']:.2f}x" if "vs_hosl" in r else ""
        print(f"{variant:<19} {q:>8} {r['step_s']:>8.3f} {r['client_forward']:>11.3f} {r['server_forward']:>11.3f} "
              f"{r['server_backward']:>11.3f} {r['perturb_update']:>12.3f} {r.get('query_batch_used', ''):>3} "
              f"{r['fwd_equiv']:>7.2f} {r['bytes_up'] / 1e6:>8.2f} {r['bytes_down'] / 1e6:>8.2f} {rel:>8} {speed:>8}")
    if a.json:
        from hosl.provenance import stamped

        with open(a.json, "w") as f:
            json.dump(stamped(results), f, indent=2)
        print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    main()
