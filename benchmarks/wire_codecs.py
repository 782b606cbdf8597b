"""What each upload codec (``hosl.transport.codecs``) costs in bytes and in projected-gradient error, on real batches.

For each batch (training examples of the task through the ``hosl train`` pipeline: tokenizer,
template, collation) the client half runs once at its weights (``h0``) and at ``w +- eps z(seed)``
for Q seeds (``HybridOrderOptimizer.perturbed``, the model's own perturbation; seeds drawn as a
step draws them). The server half's loss on the 2Q perturbed copies gives the exact projected
gradients ``g_q = (L(h+) - L(h-)) / (2 eps)``; then each codec encodes and decodes the stacked
copies (``delta8`` against ``h0``; ``h0`` itself is always sent ``native``) and the server's loss
on the decoded copies gives ``g_codec``. Reported per codec: bytes up per step (``h0`` + the 2Q
encoded copies, ``encoded_nbytes``), the ratio to native, ``||g_codec - g_exact|| / ||g_exact||``
(median and max over batches) and the cosine of the two vectors (min). A codec whose decoded
copies are bit-identical to the originals reuses the exact losses (the server is deterministic).

    python benchmarks/wire_codecs.py --json docs/wire_codecs_minilm.json
    python benchmarks/wire_codecs.py --model smollm2-135m --cut 5 --batch-size 8 --json docs/wire_codecs_smollm2.json
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


def per_copy_losses(server, loss_of, batch, h, chunk: int):
    """The server's loss of each copy stacked in ``h`` (float64), ``chunk`` copies per forward."""
    import torch

    mask = batch["attention_mask"]
    n = mask.shape[0]
    copies = h.shape[0] // n
    out = []
    for start in range(0, copies, chunk):
        k = min(chunk, copies - start)
        loss = loss_of(server(h[start * n : (start + k) * n], mask.repeat(k, 1) if k > 1 else mask), batch, k)
        out += [float(loss)] if k == 1 else loss.float().tolist()
    return torch.tensor(out, dtype=torch.float64)


def main(argv=None) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import real_batches

    from hosl.optim import HybridOrderOptimizer
    from hosl.optim.functional import draw_seeds
    from hosl.transport import codecs as C

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    real_batches.add_args(p)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--codecs", default=",".join(C.CODECS), help="comma-separated, of " + ", ".join(C.CODECS))
    p.add_argument("--server-chunk", type=int, default=4,
                   help="perturbed copies per server forward (memory only; the losses are per copy)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    codec_list = [C.check_codec(c, "--codecs") for c in a.codecs.split(",")]

    real = real_batches.load(a)
    client, server, loss_of, batches = real.client, real.server, real.loss_of, real.batches
    rows = {c: [] for c in codec_list}
    context = []
    t0 = time.perf_counter()
    for b in range(a.batches):
        batch = next(batches)
        ids, mask = batch["input_ids"], batch["attention_mask"]

        with torch.no_grad():
            opt = HybridOrderOptimizer(client, None, num_queries=a.queries, eps=a.eps, lr=0.0, seed=100 + b)
            seeds = draw_seeds(opt.generator, a.queries)
            h0 = client(ids, mask).detach()
            copies = []
            for seed in seeds:
                for sign in (1.0, -1.0):
                    with opt.perturbed(seed, sign):
                        copies.append(client(ids, mask).detach())
            h = torch.cat(copies)  # [2Q * rows, seq, hidden]: h+ then h- of each seed
            del copies

            def grads(losses):
                return (losses[0::2] - losses[1::2]) / (2 * a.eps)

            exact_losses = per_copy_losses(server, loss_of, batch, h, a.server_chunk)
            g_exact = grads(exact_losses)
            n = ids.shape[0]
            diff = torch.cat([h[2 * i * n : (2 * i + 1) * n] - h[(2 * i + 1) * n : (2 * i + 2) * n]
                              for i in range(a.queries)])
            context.append({"batch": b, "seq": int(h0.shape[1]), "hidden": int(h0.shape[-1]),
                            "activation_dtype": str(h0.dtype).removeprefix("torch."),
                            "activation_abs_max": float(h0.abs().max()),
                            "activation_rms": float(h0.float().pow(2).mean().sqrt()),
                            "difference_rms": float(diff.float().pow(2).mean().sqrt()),
                            "g_exact": g_exact.tolist()})
            clean_bytes = C.encoded_nbytes(C.encode(h0, "native"))
            native_bytes = clean_bytes + C.encoded_nbytes(C.encode(h, "native"))
            for codec in codec_list:
                ref = h0 if codec == "delta8" else None
                te = time.perf_counter()
                parts = C.encode(h, codec, ref)
                decoded = C.decode(parts, codec, ref, dtype=h.dtype)
                codec_s = time.perf_counter() - te
                reused = torch.equal(decoded, h)
                g = g_exact if reused else grads(per_copy_losses(server, loss_of, batch, decoded, a.server_chunk))
                nbytes = clean_bytes + C.encoded_nbytes(parts)
                rows[codec].append({
                    "batch": b, "bytes_up": nbytes, "ratio_to_native": nbytes / native_bytes,
                    "rel_err": float((g - g_exact).norm() / g_exact.norm()),
                    "cosine": float(torch.dot(g, g_exact) / (g.norm() * g_exact.norm())),
                    "activation_max_abs_err": float((decoded.double() - h.double()).abs().max()),
                    "bit_identical": reused, "encode_decode_s": codec_s, "g": g.tolist()})
                r = rows[codec][-1]
                print(f"  batch {b} {codec:>8}: {nbytes} B up ({r['ratio_to_native']:.3f} of native), "
                      f"rel err {r['rel_err']:.3g}, cosine {r['cosine']:.6f}", file=sys.stderr, flush=True)
            del h, decoded, parts
    summary = {c: {"bytes_up_per_step_mean": statistics.mean(r["bytes_up"] for r in rows[c]),
                   "ratio_to_native": statistics.mean(r["ratio_to_native"] for r in rows[c]),
                   "rel_err_median": statistics.median(r["rel_err"] for r in rows[c]),
                   "rel_err_max": max(r["rel_err"] for r in rows[c]),
                   "cosine_min": min(r["cosine"] for r in rows[c])} for c in codec_list}
    results = {"summary": summary, "per_batch": rows, "batches": context, "meta": {
        "command": "python benchmarks/wire_codecs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": a.model, "task": a.task, "cut": a.cut, "batches": a.batches, "batch_size": a.batch_size,
        "max_length": a.max_length, "queries": a.queries, "eps": a.eps, "difference": "central",
        "clean_activation_codec": "native", "delta8_reference": "clean activation h0",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": time.perf_counter() - t0,
        "machine": platform.processor() or platform.machine()}}
    print(f"upload codecs, {a.model} cut {a.cut} on {a.task}, {a.batches} batches x {a.batch_size}, "
          f"max length {a.max_length}, Q={a.queries}, eps={a.eps:g}; activations {context[0]['activation_dtype']}, "
          f"hidden {context[0]['hidden']}")
    print(f"{'codec':>9} {'bytes up/step':>14} {'x native':>9} {'rel err (median)':>17} {'rel err (max)':>14} "
          f"{'cosine (min)':>13}")
    for c, s in summary.items():
        print(f"{c:>9} {s['bytes_up_per_step_mean']:>14,.0f} {s['ratio_to_native']:>9.3f} {s['rel_err_median']:>17.3g} "
              f"{s['rel_err_max']:>14.3g} {s['cosine_min']:>13.6f}")
    if a.json:
        from hosl.provenance import stamped

        Path(a.json).write_text(json.dumps(stamped(results), indent=2))
        print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    main()
