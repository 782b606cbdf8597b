"""How close the linear server estimate is to the exact one, on real batches, as eps shrinks.

For each batch (SST-2 training examples through the ``hosl train`` pipeline: tokenizer, template,
collation) and each eps, one HOSL step with ``lr=0`` (no weight changes) is taken twice with the same
seeds: ``server_estimate="exact"`` and ``"linear"``. Reported per eps: the relative difference of the
Q projected gradients, ``||g_lin - g_exact|| / ||g_exact||`` (median and max over batches), and the
cosine between the two vectors. Both run in float32: the exact estimate divides a loss difference of
size ~eps by eps, so its own rounding noise grows as eps shrinks and bounds the agreement there.

    python benchmarks/linear_agreement.py --json docs/linear_agreement.json
    python benchmarks/linear_agreement.py --model minilm-l6 --task sst2 --cut 2 --batches 4 --batch-size 16 \\
        --eps 1e-1,1e-2,1e-3,1e-4 --queries 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import real_batches

    import hosl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    real_batches.add_args(p)
    p.add_argument("--eps", default="1e-1,1e-2,1e-3,1e-4")
    p.add_argument("--difference", default="central", choices=("central", "forward"))
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)

    real = real_batches.load(a)
    client, server, loss_of, batches = real.client, real.server, real.loss_of, real.batches
    eps_list = [float(e) for e in a.eps.split(",")]
    rows = {e: [] for e in eps_list}
    t0 = time.perf_counter()
    for b in range(a.batches):
        batch = next(batches)
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def server_loss(h):
            copies = h.shape[0] // ids.shape[0]
            return loss_of(server(h, mask.repeat(copies, 1) if copies > 1 else mask), batch, copies)

        for eps in eps_list:
            grads = {}
            for estimate in ("exact", "linear"):
                opt = hosl.HybridOrderOptimizer(client, None, lr=0.0, eps=eps, num_queries=a.queries, seed=100 + b,
                                                difference=a.difference, server_estimate=estimate)
                opt.step(lambda: client(ids, mask), server_loss)
                grads[estimate] = torch.tensor(opt.last_projected_grads, dtype=torch.float64)
                server.zero_grad(set_to_none=True)
            ex, li = grads["exact"], grads["linear"]
            rows[eps].append({"batch": b, "rel_diff": float((li - ex).norm() / ex.norm()),
                              "cosine": float(torch.dot(li, ex) / (li.norm() * ex.norm())),
                              "exact": ex.tolist(), "linear": li.tolist()})
            print(f"  batch {b} eps {eps:g}: rel diff {rows[eps][-1]['rel_diff']:.3g}, "
                  f"cosine {rows[eps][-1]['cosine']:.4f}", file=sys.stderr, flush=True)
    summary = {f"{e:g}": {"rel_diff_median": statistics.median(r["rel_diff"] for r in rows[e]),
                          "rel_diff_max": max(r["rel_diff"] for r in rows[e]),
                          "cosine_min": min(r["cosine"] for r in rows[e])} for e in eps_list}
    results = {"summary": summary, "per_batch": {f"{e:g}": rows[e] for e in eps_list}, "meta": {
        "command": "python benchmarks/linear_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": a.model, "task": a.task, "cut": a.cut, "batches": a.batches, "batch_size": a.batch_size,
        "max_length": a.max_length, "queries": a.queries, "difference": a.difference, "dtype": "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": time.perf_counter() - t0,
        "machine": platform.processor() or platform.machine()}}
    print(f"linear vs exact estimate, {a.model} cut {a.cut} on {a.task}, {a.batches} batches x {a.batch_size}, "
          f"Q={a.queries}, {a.difference}")
    print(f"{'eps':>8} {'rel diff (median)':>18} {'rel diff (max)':>15} {'cosine (min)':>13}")
    for e, s in summary.items():
        print(f"{e:>8} {s['rel_diff_median']:>18.3g} {s['rel_diff_max']:>15.3g} {s['cosine_min']:>13.4f}")
    if a.json:
        from hosl.provenance import stamped

        Path(a.json).write_text(json.dumps(stamped(results), indent=2))
        print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    main()
