"""Bytes of client-weight traffic per HOSL step: scratch path vs fused kernels, from the access patterns.

Counted per step's ``2Q`` perturbed client passes (the clean pass and the update are the same on both
paths and listed apart). Per parameter tensor ``W`` of ``|W|`` bytes:

* scratch (``ModuleScratchPerturber``), every pass: ``perturb_`` reads ``W`` and writes the scratch,
  the module reads the scratch: ``3|W|``; for an embedding the lookup reads only the gathered rows:
  ``2|W| + tokens*H*itemsize``.
* fused (``FusedPerturber``): ``perturbed_linear`` reads each ``W`` tile from global memory once per
  program, i.e. ``ceil(M/BM) * ceil(D/DB)`` times per launch: once from DRAM if those programs share
  it through L2 (the "ideal" column), all of them at worst (the "issued" column); ``W`` is never
  written. ``perturbed_embedding`` reads the gathered rows once per launch for all ``D`` directions.
  Norms and other small modules stay on the scratch path (``3|W|`` per pass).
  ``D = 1`` is the optimizer's wiring today (one launch per pass); ``D = 2Q`` is the batched kernels
  (all directions in one launch).

    python benchmarks/weight_traffic.py [--model opt-125m-random --cut 5 --queries 10 --batch 64 --seq 128
                                         --dtype float32 --json weight_traffic.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hosl.models.registry import resolve_model  # noqa: E402

GPU_BLOCKS = {"BM": 64, "DB": 4}  # kernels/perturbed_linear.py block_sizes() on a GPU


def client_modules(model_name: str, cut: int, dtype: torch.dtype):
    """(kind, numel, hidden) per client module that owns parameters; built on the meta device."""
    from transformers import AutoModelForCausalLM

    from hosl.models import split
    from hosl.forward.fused import EMBEDDING, EMBEDDING_INTERCEPT, LINEAR, fused_kind

    config = resolve_model(model_name).config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    client, _ = split(model, cut)
    out = []
    for mod in client.modules():
        own = {n: p for n, p in mod.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        kind = fused_kind(mod, own)
        numel = sum(p.numel() for p in own.values())
        if kind == LINEAR:
            out.append(("linear", numel, None))
        elif kind in (EMBEDDING, EMBEDDING_INTERCEPT):
            out.append(("embedding", numel, mod.weight.shape[1]))
        else:
            out.append(("scratch", numel, None))
    return out


def traffic(modules, itemsize: int, queries: int, tokens: int) -> dict:
    passes = 2 * queries
    m_tiles = math.ceil(tokens / GPU_BLOCKS["BM"])
    rows = {}

    scratch = 0
    for kind, numel, hidden in modules:
        w = numel * itemsize
        scratch += passes * ((2 * w + tokens * hidden * itemsize) if kind == "embedding" else 3 * w)
    rows["scratch path (module at a time)"] = {"ideal": scratch, "issued": scratch}

    for label, d in (("fused, D=1 (one launch per pass)", 1), (f"fused, D={passes} (all directions, one launch)", passes)):
        launches = passes // d
        groups = math.ceil(d / GPU_BLOCKS["DB"])
        ideal = issued = 0
        for kind, numel, hidden in modules:
            w = numel * itemsize
            if kind == "linear":
                ideal += launches * w
                issued += launches * w * m_tiles * groups
            elif kind == "embedding":
                ideal += launches * tokens * hidden * itemsize
                issued += launches * tokens * hidden * itemsize
            else:
                ideal += passes * 3 * w
                issued += passes * 3 * w
        rows[label] = {"ideal": ideal, "issued": issued}
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-125m-random")
    ap.add_argument("--cut", type=int, default=5)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    modules = client_modules(args.model, args.cut, dtype)
    tokens = args.batch * args.seq
    rows = traffic(modules, itemsize, args.queries, tokens)
    weights = sum(n for _, n, _ in modules) * itemsize
    by_kind = {k: sum(n for kk, n, _ in modules if kk == k) for k in ("linear", "embedding", "scratch")}

    print(f"{args.model} client (cut {args.cut}), Q={args.queries} ({2 * args.queries} perturbed passes), "
          f"{tokens} tokens, {args.dtype}: client weights {weights / 2**20:.1f} MiB "
          f"(linear {by_kind['linear'] / 1e6:.1f}M, embedding {by_kind['embedding'] / 1e6:.1f}M, "
          f"norms {by_kind['scratch'] / 1e6:.3f}M elements)")
    base = rows["scratch path (module at a time)"]["ideal"]
    print(f"{'path':48s} {'DRAM, W tiles shared in L2':>28s} {'vs scratch':>10s} {'global loads issued':>20s}")
    for label, r in rows.items():
        print(f"{label:48s} {r['ideal'] / 2**30:24.2f} GiB {base / r['ideal']:9.1f}x {r['issued'] / 2**30:16.2f} GiB")
    print(f"common to both: clean pass reads W once ({weights / 2**20:.1f} MiB), the update reads and writes W "
          f"once ({2 * weights / 2**20:.1f} MiB)")
    if args.json:
        from hosl.provenance import stamped

        Path(args.json).write_text(json.dumps(stamped({"args": vars(args), "tokens": tokens, "client_weight_bytes": weights,
                                                       "elements_by_kind": by_kind, "rows": rows}), indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
