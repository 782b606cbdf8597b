"""Kernel speed of the direction ops on CPU, single-threaded, against MeZO-style PyTorch and the memory roof.

Per element of a 16M-element float32 parameter list (16 tensors of 1M):

* ``perturb``     ``hosl.ops.perturb_`` in place      vs MeZO ``manual_seed`` + ``normal`` + ``add_`` per tensor
* ``perturb_out`` ``hosl.ops.perturb_(out=...)``     vs the same, ``torch.add(out=...)``
* ``update_q1``   ``hosl.ops.zo_update_``, Q=1       vs one MeZO update pass
* ``update_q10``  ``hosl.ops.zo_update_``, Q=10      vs ten MeZO update passes (MeZO walks the weights once per direction)

and the memory roof: ``add_`` of two tensors of the same sizes (``torch.add(out=)`` for ``perturb_out``).

Direction families (``family=``), each against the same MeZO-style Gaussian path and roof:

* ``perturb_rademacher``, ``perturb_out_rademacher``, ``update_q1_rademacher``, ``update_q10_rademacher``
* ``perturb_sphere``, ``update_q10_sphere``: with the per-tensor factors computed beforehand (as an
  optimizer does once per seed and step), and ``sphere_scales``: that norm pass on its own.
Times are the minimum over repeats (the development machine is shared and noisy).

On a GPU (``--device cuda``) the same cases run on CUDA tensors for each GPU backend (``cuda``: the
hosl._C_cuda kernels, ``triton``), timed with ``torch.cuda.Event`` around each call, and the roof is
the device's copy (``dst.copy_(src)``: one read and one write per element, the least any of these ops
can move). Every row also gives GB/s counted as one read and one write of each weight (what an op
that touches each weight once moves) and ``roof_fraction`` = hosl GB/s / roof GB/s.
Rows of a second backend are named ``<case>[<backend>]``.

The table's header and the JSON's ``meta`` name the CPU model and the SIMD variant (``cpu_isa``:
avx512 / avx2 / scalar) the C++ kernels ran; ``--isa`` forces one (the CPU must support it).

    python benchmarks/direction_kernels.py --json results.json [--numel 1048576 --tensors 16 --repeats 5]
    python benchmarks/direction_kernels.py --isa scalar --json scalar.json   # force a SIMD variant of hosl._C
    python benchmarks/direction_kernels.py --device cuda --json gpu.json [--numel 16777216 --repeats 20]
    python benchmarks/direction_kernels.py --device cuda --cases perturb_rademacher,update_q10_rademacher
    TRITON_INTERPRET=1 python benchmarks/direction_kernels.py --backends cpu,triton --numel 4096 --tensors 2 --repeats 1
"""

from __future__ import annotations

import os

# single-threaded: set before torch (and its OpenMP runtime) is imported
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

# run from a checkout without `pip install -e .`: import hosl from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_seconds(fn, repeats: int, device: str = "cpu") -> float:
    """Minimum seconds of ``fn()`` over ``repeats`` calls after a warm-up; CUDA events on a GPU."""
    fn()  # warm-up (first touch, lazy init, Triton compile)
    best = float("inf")
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return best
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# The ops timed, in the table's order (--cases picks some).
CASES = ("perturb", "perturb_out", "update_q1", "update_q10", "perturb_rademacher", "perturb_out_rademacher",
         "update_q1_rademacher", "update_q10_rademacher", "perturb_sphere", "update_q10_sphere", "sphere_scales")


def _default_backends(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda,triton"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--numel", type=int, default=1 << 20, help="elements per tensor")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the tensors live (default %(default)s)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated hosl backends to time (default: cpu on cpu, cuda,triton on cuda; "
                             "triton on cpu needs TRITON_INTERPRET=1)")
    parser.add_argument("--isa", default=None, choices=("avx512", "avx2", "scalar"),
                        help="SIMD variant of the C++ CPU kernels (default: the best this CPU supports, "
                             "or HOSL_CPU_ISA)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated ops to time (default: all), e.g. update_q10_rademacher; "
                             "each backend gets its row of each")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    backends = (args.backends or _default_backends(args.device)).split(",")
    wanted = CASES if args.cases is None else tuple(args.cases.split(","))
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)} (expected some of {', '.join(CASES)})")

    from hosl.ops import available_backends, perturb_, sphere_scales, zo_update_
    from hosl.ops.backends import cpu as cpu_backend

    via = "hosl.ops (public API, backend=...)"
    if args.isa is not None:
        if not cpu_backend.is_available():
            parser.error(f"--isa: the C++ CPU kernels are not built ({cpu_backend.unavailable_reason()})")
        if args.isa not in cpu_backend.supported_isas():
            parser.error(f"--isa {args.isa}: this CPU supports only {', '.join(cpu_backend.supported_isas())}")
        from hosl import _C

        _C.set_isa(args.isa)

    missing = [b for b in backends if b not in available_backends()]
    if missing:
        parser.error(f"--backends: {', '.join(missing)} not available here (available: {available_backends()})")
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(args.numel, generator=g) * 0.05).to(dev) for _ in range(args.tensors)]
    others = [torch.randn(args.numel, generator=g).to(dev) for _ in range(args.tensors)]
    outs = [torch.empty_like(w) for w in weights]
    n = args.numel * args.tensors
    seed, scale, lr = 2**63 + 12345, 1e-3, 1e-6
    seeds = [seed + q for q in range(10)]
    coeffs = [0.5 * (-1) ** q for q in range(10)]

    # --- MeZO-style: one torch.manual_seed per pass, torch.normal + add_ per tensor ---------------
    def mezo_perturb():
        torch.manual_seed(seed)
        for w in weights:
            z = torch.normal(mean=0.0, std=1.0, size=w.size(), dtype=w.dtype, device=dev)
            w.add_(z, alpha=scale)

    def mezo_perturb_out():
        torch.manual_seed(seed)
        for w, o in zip(weights, outs):
            z = torch.normal(mean=0.0, std=1.0, size=w.size(), dtype=w.dtype, device=dev)
            torch.add(w, z, alpha=scale, out=o)

    def mezo_update(q_count):
        def run():
            for q in range(q_count):  # MeZO regenerates z per direction: Q passes over the weights
                torch.manual_seed(seeds[q])
                for w in weights:
                    z = torch.normal(mean=0.0, std=1.0, size=w.size(), dtype=w.dtype, device=dev)
                    w.add_(z, alpha=-lr * coeffs[q])
        return run

    # --- roof: on CPU add_ of two tensors of the same sizes; on a GPU the device copy --------------
    def roof_inplace():
        if args.device == "cuda":
            for w, o in zip(weights, others):
                w.copy_(o)
            return
        for w, o in zip(weights, others):
            w.add_(o)

    def roof_out():
        if args.device == "cuda":
            for w, out in zip(weights, outs):
                out.copy_(w)
            return
        for w, o, out in zip(weights, others, outs):
            torch.add(w, o, out=out)

    # --- hosl --------------------------------------------------------------------------------------
    def hosl_perturb(backend, family="gaussian", scales=None):
        extra = {} if family == "gaussian" else {"family": family, "scales": scales}
        return lambda: perturb_(weights, seed, scale, backend=backend, **extra)

    def hosl_perturb_out(backend, family="gaussian"):
        extra = {} if family == "gaussian" else {"family": family}
        return lambda: perturb_(weights, seed, scale, out=outs, backend=backend, **extra)

    def hosl_update(backend, q_count, family="gaussian", scales=None):
        extra = {} if family == "gaussian" else {"family": family, "scales": scales and scales[:q_count]}

        def run():
            zo_update_(weights, seeds[:q_count], coeffs[:q_count], lr=lr, backend=backend, **extra)
        return run

    cases = {}
    for b_index, backend in enumerate(backends):
        suffix = "" if b_index == 0 else f"[{backend}]"
        rows = {
            "perturb": (hosl_perturb(backend), mezo_perturb, roof_inplace),
            "perturb_out": (hosl_perturb_out(backend), mezo_perturb_out, roof_out),
            "update_q1": (hosl_update(backend, 1), mezo_update(1), roof_inplace),
            "update_q10": (hosl_update(backend, 10), mezo_update(10), roof_inplace),
            "perturb_rademacher": (hosl_perturb(backend, "rademacher"), mezo_perturb, roof_inplace),
            "perturb_out_rademacher": (hosl_perturb_out(backend, "rademacher"), mezo_perturb_out, roof_out),
            "update_q1_rademacher": (hosl_update(backend, 1, "rademacher"), mezo_update(1), roof_inplace),
            "update_q10_rademacher": (hosl_update(backend, 10, "rademacher"), mezo_update(10), roof_inplace),
        }
        factors = [sphere_scales(weights, s, backend=backend) for s in seeds]
        rows.update({
            "perturb_sphere": (hosl_perturb(backend, "sphere", factors[0]), mezo_perturb, roof_inplace),
            "update_q10_sphere": (hosl_update(backend, 10, "sphere", factors), mezo_update(10), roof_inplace),
            "sphere_scales": (lambda backend=backend: sphere_scales(weights, seed, backend=backend),
                              mezo_perturb, roof_inplace),
        })
        assert tuple(rows) == CASES, "CASES lists the rows above, in order"
        rows = {name: fns for name, fns in rows.items() if name in wanted}
        cases.update({name + suffix: (backend, *fns) for name, fns in rows.items()})

    element_bytes = weights[0].element_size()
    results: dict = {}
    for name, (backend, hosl_fn, mezo_fn, roof_fn) in cases.items():
        row = {
            "backend": backend,
            "hosl_ns": best_seconds(hosl_fn, args.repeats, args.device) / n * 1e9,
            "mezo_ns": best_seconds(mezo_fn, args.repeats, args.device) / n * 1e9,
            "roof_ns": best_seconds(roof_fn, args.repeats, args.device) / n * 1e9,
        }
        row["speedup_vs_mezo"] = row["mezo_ns"] / row["hosl_ns"]
        row["hosl_over_roof"] = row["hosl_ns"] / row["roof_ns"]
        # one read and one write of each element (ns per element -> bytes per ns = GB/s)
        for who in ("hosl", "mezo", "roof"):
            row[f"{who}_gbps"] = 2 * element_bytes / row[f"{who}_ns"]
        row["roof_fraction"] = row["hosl_gbps"] / row["roof_gbps"]
        results[name] = row

    cpu_model = cpu_backend.cpu_model()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model
    results["meta"] = {
        "elements": n,
        "tensors": args.tensors,
        "dtype": "float32",
        "device": args.device,
        "device_name": device_name,
        "backends": backends,
        "threads": torch.get_num_threads(),
        "cpu_isa": cpu_backend.isa() if cpu_backend.is_available() else None,
        "via": via,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_model": cpu_model,
        "roof": "dst.copy_(src)" if args.device == "cuda" else "add_ of two tensors (torch.add(out=) for *_out)",
        "gbps_counts": "2 x element bytes per element (one read, one write)",
        "timing": f"min of {args.repeats} after a warm-up" + (", torch.cuda.Event" if args.device == "cuda" else ""),
    }

    where = (f"{device_name}" if args.device == "cuda"
             else f"1 thread, CPU variant {results['meta']['cpu_isa']}, {cpu_model}")
    print(f"hosl kernels, {n / 2**20:.0f}M float32 elements in {args.tensors} tensors, {where}, via {via}")
    print(f"{'op':<31} {'hosl ns/el':>11} {'MeZO ns/el':>11} {'roof ns/el':>11} {'MeZO/hosl':>10} {'hosl/roof':>10} "
          f"{'hosl GB/s':>10} {'of roof':>8}")
    for name in cases:
        r = results[name]
        print(f"{name:<31} {r['hosl_ns']:>11.3f} {r['mezo_ns']:>11.3f} {r['roof_ns']:>11.3f} "
              f"{r['speedup_vs_mezo']:>9.1f}x {r['hosl_over_roof']:>9.2f}x {r['hosl_gbps']:>10.1f} "
              f"{r['roof_fraction']:>7.0%}")
    if args.json:
        from hosl.provenance import stamped

        with open(args.json, "w") as f:
            json.dump(stamped(results), f, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
