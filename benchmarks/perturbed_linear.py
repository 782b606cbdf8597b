"""The fused perturbed linear (``hosl.ops.perturbed_linear``) against ``F.linear`` on clean weights.

For each layer shape (default: OPT-1.3B's attention projection 2048 -> 2048 and its MLP 2048 -> 8192,
over ``--tokens`` rows, 16 x 128 by default) and each number of directions ``D`` (default 1 and
2Q = 20):

* ``clean``     ``F.linear(x, W, b)`` over the same ``D x tokens`` rows on the clean weights (one matmul):
                the cost floor a perturbed forward is held to;
* ``<backend>`` ``perturbed_linear(x, W, b, seeds=D seeds, ...)`` with one input per direction
                (``per_direction_input``, the batched client forward) and, as ``<backend>/shared``, one
                input shared by all directions (the first layer of a client: the embedding output is the
                same for every direction).

* ``<backend>-<family>`` (``--families``, e.g. ``rademacher``): the same two calls with ``family=``
                (the fused Triton tile of that family, or the backend's materialised weights), and
                ``<backend>-<family>/shared``.

* ``lowrank-r<R>`` (``--ranks``, e.g. ``1,4``): the same call with ``family="lowrank", rank=R``:
                one GEMM ``x W^T`` over all ``D x tokens`` rows plus a batched rank-R term per direction
                (``hosl/ops/lowrank.py``, any device), and ``lowrank-r<R>/shared``.

``triton`` is the fused kernel (weights read once per tile, the direction generated in registers);
``cuda`` and ``cpu`` materialise one perturbed copy of the layer per direction and call ``F.linear``.
Times are the minimum over ``--repeats`` after a warm-up (``torch.cuda.Event`` on a GPU);
``over_clean`` = time / clean time, ``tflops`` = 2 x rows x in x out / time.

    python benchmarks/perturbed_linear.py --device cuda --json linear.json
    TRITON_INTERPRET=1 python benchmarks/perturbed_linear.py --device cpu --backends triton,cpu \\
        --shapes 32x48 --tokens 8 --directions 1,2 --repeats 1        # seconds: the dry run
    python benchmarks/perturbed_linear.py --device cpu --backends cpu --ranks 1,4 --shapes 768x768 \
        --tokens 256 --directions 10 --dtypes float32                 # low rank vs clean on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_seconds(fn, repeats: int, device: str) -> float:
    """Minimum seconds of ``fn()`` over ``repeats`` calls after a warm-up; CUDA events on a GPU."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"2048x2048,2048x8192"`` -> ``[(2048, 2048), (2048, 8192)]`` (in x out)."""
    shapes = []
    for item in text.split(","):
        try:
            k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected INxOUT items like 2048x8192, got {item!r}") from None
        shapes.append((k, n))
    return shapes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--backends", default=None,
                   help="comma-separated (default: triton,cuda on cuda; cpu on cpu)")
    p.add_argument("--shapes", default="2048x2048,2048x8192", help="INxOUT layer shapes (default %(default)s)")
    p.add_argument("--tokens", type=int, default=16 * 128, help="rows per direction (default %(default)s)")
    p.add_argument("--directions", default="1,20", help="values of D (default %(default)s: 1 and 2Q at Q=10)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ranks", default="", help="also the lowrank family at these ranks, e.g. 1,4 (default: none)")
    p.add_argument("--families", default="",
                   help="also these direction families through each backend, e.g. rademacher (default: none; "
                        "the Gaussian always runs)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")

    import hosl
    from hosl.directions.families import FAMILIES

    families = [f for f in a.families.split(",") if f]
    kernel_families = [f.name for f in FAMILIES.entries() if f.code is not None and f.name != "gaussian"]
    unknown = [f for f in families if f not in kernel_families]
    if unknown:
        p.error(f"--families: {', '.join(unknown)} is not one of {', '.join(kernel_families)} "
                "(the Gaussian always runs; lowrank: --ranks)")

    backends = (a.backends or ("triton,cuda" if a.device == "cuda" else "cpu")).split(",")
    available = hosl.ops.available_backends()
    missing = [b for b in backends if b not in available]
    if missing:
        p.error(f"--backends: {', '.join(missing)} not available here (available: {available})")
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    results: dict = {}
    print(f"perturbed linear vs F.linear, {a.tokens} rows per direction, {a.device}")
    print(f"{'case':<44} {'ms':>9} {'x clean':>8} {'TFLOP/s':>8}")
    for dtype_name in a.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for k, n in parse_shapes(a.shapes):
            w = (torch.randn(n, k, generator=g) * 0.02).to(dtype).to(dev)
            b = torch.zeros(n, dtype=dtype, device=dev)
            for d in (int(v) for v in a.directions.split(",")):
                x = torch.randn(d, a.tokens, k, generator=g).to(dtype).to(dev)
                seeds = [2**63 + 7 * i for i in range(d)]
                scales = [1e-3 * (-1) ** i for i in range(d)]
                flops = 2.0 * d * a.tokens * k * n
                prefix = f"{dtype_name}/{k}x{n}/D{d}"
                clean = best_seconds(lambda: F.linear(x, w, b), a.repeats, a.device)
                rows = {"clean": clean}
                for backend in backends:
                    rows[backend] = best_seconds(
                        lambda: hosl.ops.perturbed_linear(x, w, b, seeds=seeds, scales=scales, weight_offset=0,
                                                          bias_offset=n * k, per_direction_input=True,
                                                          backend=backend), a.repeats, a.device)
                    rows[f"{backend}/shared"] = best_seconds(
                        lambda: hosl.ops.perturbed_linear(x[0], w, b, seeds=seeds, scales=scales, weight_offset=0,
                                                          bias_offset=n * k, backend=backend), a.repeats, a.device)
                for family in families:
                    fam = dict(seeds=seeds, scales=scales, weight_offset=0, bias_offset=n * k, family=family)
                    for backend in backends:
                        rows[f"{backend}-{family}"] = best_seconds(
                            lambda: hosl.ops.perturbed_linear(x, w, b, per_direction_input=True, backend=backend,
                                                              **fam), a.repeats, a.device)
                        rows[f"{backend}-{family}/shared"] = best_seconds(
                            lambda: hosl.ops.perturbed_linear(x[0], w, b, backend=backend, **fam), a.repeats,
                            a.device)
                for rank in (int(v) for v in a.ranks.split(",") if v):
                    low = dict(seeds=seeds, scales=scales, weight_offset=0, bias_offset=n * k, family="lowrank",
                               rank=rank)
                    rows[f"lowrank-r{rank}"] = best_seconds(
                        lambda: hosl.ops.perturbed_linear(x, w, b, per_direction_input=True, **low), a.repeats,
                        a.device)
                    rows[f"lowrank-r{rank}/shared"] = best_seconds(
                        lambda: hosl.ops.perturbed_linear(x[0], w, b, **low), a.repeats, a.device)
                for case, seconds in rows.items():
                    key = f"{prefix}/{case}"
                    results[key] = {"seconds": seconds, "over_clean": seconds / clean, "tflops": flops / seconds / 1e12,
                                    "dtype": dtype_name, "in": k, "out": n, "directions": d, "tokens": a.tokens}
                    print(f"{key:<44} {seconds * 1e3:>9.3f} {seconds / clean:>7.2f}x {flops / seconds / 1e12:>8.2f}")
    results["meta"] = {
        "command": "python benchmarks/perturbed_linear.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": a.device,
        "device_name": torch.cuda.get_device_name() if a.device == "cuda" else (platform.processor() or platform.machine()),
        "backends": backends, "ranks": [int(v) for v in a.ranks.split(",") if v], "families": families,
        "torch": torch.__version__,
        "repeats": a.repeats,
        "timing": f"min of {a.repeats} after a warm-up" + (", torch.cuda.Event" if a.device == "cuda" else ""),
    }
    if a.json:
        from hosl.provenance import stamped

        with open(a.json, "w") as f:
            json.dump(stamped(results), f, indent=2)
        print(f"wrote {a.json}")
    return results


if __name__ == "__main__":
    main()
