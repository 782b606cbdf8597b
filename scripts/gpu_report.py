"""Turn a scripts/gpu_check.sh output folder into the Markdown of docs/results.md's "GPU" section.

    python scripts/gpu_report.py gpu-results > gpu.md                  # the folder ($OUT)
    python scripts/gpu_report.py gpu-results/gpu-results.tgz > gpu.md  # or the archive in it

Reads summary.json, info.json, tests.json, rademacher.json, kernels.json, linear.json, step-*.json and memory.json
(whichever exist: a stage that failed is shown as such, with its log) from the folder, or from the
gpu-results.tgz that gpu_check.sh packs them into. Prints to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

ARCHIVE = "gpu-results.tgz"


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _missing(stages: dict, name: str) -> list[str]:
    s = stages.get(name)
    if s is None or s["status"] == "skipped":
        return ["(not run)", ""]
    return [f"(stage {name}: {s['status']}, rc {s['rc']}; see `{s['log']}`)", ""]


def _kernels_table(folder: Path, stages: dict, stage: str) -> list[str]:
    """The table of a benchmarks/direction_kernels.py JSON (``<stage>.json``), or why it is missing."""
    kernels = _load(folder, f"{stage}.json")
    if not kernels:
        return _missing(stages, stage)
    meta = kernels["meta"]
    out = [f"`benchmarks/direction_kernels.py`: {meta['elements']:,} float32 elements in {meta['tensors']} "
           f"tensors; GB/s counts one read and one write per element; roof: {meta['roof']}; {meta['timing']}.", ""]
    rows = []
    for name, r in kernels.items():
        if name == "meta":
            continue
        rows.append([name.split("[")[0], r.get("backend", meta["backends"][0]), f"{r['hosl_gbps']:.4g}",
                     f"{r['mezo_gbps']:.4g}", f"{r['roof_gbps']:.4g}", f"{r['roof_fraction']:.0%}",
                     f"{r['speedup_vs_mezo']:.1f}x"])
    out += _table(["op", "backend", "hosl GB/s", "MeZO GB/s", "roof GB/s", "hosl / roof", "vs MeZO"], rows)
    return out + [""]


def render(folder: Path) -> str:
    summary = _load(folder, "summary.json")
    if summary is None:
        raise SystemExit(f"gpu_report.py: {folder / 'summary.json'} not found (is {folder} a gpu_check.sh output folder?)")
    stages = {s["name"]: s for s in summary["stages"]}
    info = _load(folder, "info.json") or {}
    out = ["## GPU", ""]
    out.append(f"`bash scripts/gpu_check.sh{' --dry-run' if summary['mode'] == 'dry-run' else ''}`, "
               f"{summary['started_utc'][:10]}, {info.get('device_name', '?')}"
               + (f" (sm_{''.join(map(str, info['capability']))})" if info.get("capability") else "")
               + f", torch {info.get('torch', '?')}, triton {info.get('triton', '?')}, "
               f"commit {str(info.get('git_commit') or '?')[:10]}; {summary['seconds']} s in all.")
    out.append("")

    out += ["### Stages", ""]
    out += _table(["stage", "status", "seconds"], [[s["name"], s["status"], s["seconds"]] for s in summary["stages"]])
    out.append("")
    tests = _load(folder, "tests.json")
    if tests:
        out.append(f"Tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                   f"{tests['skipped']} skipped" + (f" (failed: {', '.join(tests['failed'])})" if tests["failed"] else "")
                   + ".")
        out.append("")

    out += ["### Rademacher kernels (one Philox word per 32 coordinates)", ""]
    out += _kernels_table(folder, stages, "rademacher")
    out += ["### Direction kernels", ""]
    out += _kernels_table(folder, stages, "kernels")

    out += ["### Perturbed linear vs F.linear", ""]
    linear = _load(folder, "linear.json")
    if linear:
        out.append(f"`benchmarks/perturbed_linear.py`: {linear['meta']['timing']}; x clean = time / `F.linear` "
                   "over the same rows on clean weights.")
        out.append("")
        rows = []
        for key, r in linear.items():
            if key == "meta":
                continue
            dtype, shape, d, case = key.split("/", 3)
            rows.append([dtype, shape, r["tokens"], d[1:], case, f"{r['seconds'] * 1e3:.3f}", f"{r['over_clean']:.2f}x",
                         f"{r['tflops']:.3g}"])
        out += _table(["dtype", "in x out", "rows", "D", "case", "ms", "x clean", "TFLOP/s"], rows)
        out.append("")
    else:
        out += _missing(stages, "linear")

    out += ["### Step time", ""]
    step_files = sorted(folder.glob("step-*.json"))
    if step_files:
        rows = []
        for path in step_files:
            data = json.loads(path.read_text())
            meta = data["meta"]
            for key, r in data.items():
                if key == "meta":
                    continue
                variant, q = key.rsplit("/q", 1)
                speed = f"{r['speedup_vs_mezo']:.2f}x" if "speedup_vs_mezo" in r else ""
                rel = f"{r['vs_hosl']:.2f}x" if "vs_hosl" in r else ""
                rows.append([path.stem[len("step-"):], f"{meta['batch']}x{meta['seq']}", variant, q,
                             r.get("query_batch_used", ""), f"{r['step_s'] * 1e3:.1f}", rel, speed])
        first = json.loads(step_files[0].read_text())["meta"]
        out.append(f"`benchmarks/step.py` cut {first['cut']}, fp32, {first['timing']}.")
        out.append("")
        out.append("`vs hosl` is the step time over the sequential exact step's (`hosl`; below 1 is faster); "
                   "D is the points per client forward.")
        out.append("")
        out += _table(["run", "batch", "variant", "Q", "D", "step ms", "vs hosl", "vs MeZO"], rows)
        out.append("")
    else:
        out += _missing(stages, "step")

    out += ["### Client memory", ""]
    memory = _load(folder, "memory.json")
    if memory:
        meta = memory["meta"]
        out.append(f"`benchmarks/memory.py`: {meta['measured_as']}; cut {meta['cut']}, seq {meta['seq']}.")
        out.append("")
        rows = []
        for key, r in memory.items():
            if key in ("meta", "details"):
                continue
            batch = next(iter(memory["details"][key].values()))["batch"]

            def gib(mode, r=r):
                return f"{r[mode] / 2**30:.3f}" if mode in r else "-"

            def ratio(a, b, r=r):
                return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-"

            rows.append([key, batch, gib("fo-sl"), gib("hosl"), gib("floor"), ratio("fo-sl", "hosl"),
                         ratio("hosl", "floor")])
        out += _table(["config", "batch", "FO-SL GiB", "HOSL GiB", "floor GiB", "FO-SL / HOSL", "HOSL / floor"], rows)
        out.append("")
    else:
        out += _missing(stages, "memory")
    return "\n".join(out)


def _archive_of(path: Path) -> Path | None:
    """The archive to read: ``path`` itself, or the folder's gpu-results.tgz when its JSON was packed."""
    if path.is_file():
        return path
    if (path / ARCHIVE).is_file() and not (path / "info.json").exists():
        return path / ARCHIVE
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default="gpu-results",
                   help=f"gpu_check.sh's $OUT, or the {ARCHIVE} in it (default %(default)s)")
    a = p.parse_args(argv)
    archive = _archive_of(Path(a.folder))
    if archive is None:
        sys.stdout.write(render(Path(a.folder)) + "\n")
        return 0
    try:
        tar = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise SystemExit(f"gpu_report.py: {archive} is not a readable gpu_check.sh archive ({exc})") from exc
    with tar, tempfile.TemporaryDirectory() as tmp:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # pragma: no cover - Pythons without extraction filters
            tar.extractall(tmp)
        sys.stdout.write(render(Path(tmp)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
