"""Client-size study plot: training loss and eval accuracy against steps, one curve per run.

    python benchmarks/accuracy.py --config benchmarks/configs/client_size.yaml --out runs/client-size
    python benchmarks/client_size.py --runs runs/client-size runs/accuracy-cpu --seed 0 \
        --out docs/client_size.png --table docs/client_size.md

Reads the finished cells of one model/task/variant from the grid folder(s) (``cells/**/summary.json``
next to the ``cell.json`` the grid runner writes; a warning names any flag other than the cut, mode,
client lr and seed that differs between them), draws HOSL at each cut and the other modes on the same two
panels (left: training loss, moving average; right: eval accuracy at each evaluation), and prints
a Markdown table: the cell each row comes from and the commit it ran on (from the runner's
``cell.json``; "not recorded" for cells run before the runner kept commits), client size d_c
(parameters), final and best accuracy, mean loss over the last steps. ``--seed`` picks one seed
when a grid has several (default: the smallest per curve).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODE_STYLE = {"fo-sl": ("FO-SL", "black", "--"), "zo-sl": ("ZO-SL", "tab:red", ":"),
              "frozen-client": ("frozen client (server FO only)", "tab:olive", "-."),
              "fo-sl-lr1e-2": ("FO-SL, client lr 1e-2", "gray", "-."),
              "hosl-linear": ("HOSL, linear server estimate", "tab:pink", ":")}
HOSL_COLORS = ["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:cyan"]


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(loss by step, eval accuracy by step). A resumed run may repeat steps after its last
    checkpoint; the later record wins, as it is the one the final weights came from."""
    losses, accs = {}, {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("event") == "eval":
                accs[rec["step"]] = rec["eval_accuracy"]
            elif "loss" in rec:
                losses[rec["step"]] = rec["loss"]
    return losses, accs


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# flags that may differ between the curves of one plot; any other difference is reported
VARYING_FLAGS = ("cut", "mode", "lr_client", "seed")


def collect(run_roots: list[Path], seed: int | None, model: str, task: str, variant: str) -> list[dict]:
    runs = {}
    for root in run_roots:
        for summary_path in sorted(root.glob("cells/**/summary.json")):
            run_dir = summary_path.parent
            cell_json = run_dir / "cell.json"
            if not cell_json.exists():
                continue
            cell = json.loads(cell_json.read_text())
            axes = cell["axes"]
            if (axes["mode"] == "zero-shot" or (seed is not None and axes["seed"] != seed)
                    or (axes["model"], axes["task"], axes["variant"]) != (model, task, variant)):
                continue
            summary = json.loads(summary_path.read_text())
            key = (axes["model"], axes["task"], axes["variant"], axes["mode"], summary["cut"])
            if key in runs and runs[key]["seed"] <= axes["seed"]:
                continue
            losses, accs = read_metrics(run_dir)
            commits = list(dict.fromkeys((r.get("commit") or "unknown")[:10] for r in cell.get("runs") or []))
            runs[key] = {"mode": axes["mode"], "cut": summary["cut"], "seed": axes["seed"], "summary": summary,
                         "flags": cell["flags"], "dir": run_dir, "id": cell.get("id", run_dir.name),
                         "commit": " ".join(commits) or "not recorded",
                         # a cell run before the runner recorded its config cannot say which dropout it trained with
                         "dropout": (cell.get("config") or {}).get("dropout", "not recorded"),
                         "losses": losses, "accs": accs,
                         # fp32 weights: 4 bytes a parameter
                         "client_params": summary.get("client_weight_bytes", 0) // 4}
    return sorted(runs.values(), key=lambda r: (r["mode"] != "hosl", r["mode"], r["cut"]))


def budget_mismatches(runs: list[dict]) -> list[str]:
    """Flags (other than VARYING_FLAGS) on which a run differs from the first one."""
    if not runs:
        return []
    ref = runs[0]
    out = []
    for run in runs[1:]:
        keys = (set(ref["flags"]) | set(run["flags"])) - set(VARYING_FLAGS)
        diff = sorted(k for k in keys if ref["flags"].get(k) != run["flags"].get(k))
        if diff:
            out.append(f"{run['dir']} differs from {ref['dir']} in: {', '.join(diff)}")
    return out


def label_of(run: dict) -> str:
    millions = run["client_params"] / 1e6
    if run["mode"] == "hosl":
        return f"HOSL, cut {run['cut']} (d_c = {millions:.1f}M)"
    name = MODE_STYLE.get(run["mode"], (run["mode"],))[0]
    return f"{name}, cut {run['cut']}"


def plot(runs: list[dict], path: Path, window: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 5))
    # one colour per cut, shared by HOSL and the frozen-client control at that cut (the control dash-dotted)
    cuts = sorted({run["cut"] for run in runs if run["mode"] in ("hosl", "frozen-client")})
    cut_color = {cut: HOSL_COLORS[i % len(HOSL_COLORS)] for i, cut in enumerate(cuts)}
    for run in runs:
        if run["mode"] == "hosl":
            color, style = cut_color[run["cut"]], "-"
        elif run["mode"] == "frozen-client":
            color, style = cut_color[run["cut"]], "-."
        else:
            _, color, style = MODE_STYLE.get(run["mode"], (run["mode"], "gray", "-."))
        steps = sorted(run["losses"])
        ax_loss.plot(steps, moving_average([run["losses"][s] for s in steps], window), style, color=color,
                     label=label_of(run))
        eval_steps = sorted(run["accs"])
        ax_acc.plot(eval_steps, [100 * run["accs"][s] for s in eval_steps], style, marker="o", markersize=3,
                    color=color, label=label_of(run))
    ax_loss.set(xlabel="step", ylabel=f"training loss (moving average, {window} steps)", title="training loss")
    ax_acc.set(xlabel="step", ylabel="eval accuracy (%)", title="evaluation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(runs: list[dict], last: int) -> str:
    lines = ["| run | cell | commit | dropout | client params d_c | steps | eval acc at step 0 (%) "
             f"| final eval acc (%) | best eval acc (%) | mean loss, last {last} steps | seconds |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        steps = sorted(run["losses"])
        tail = [run["losses"][s] for s in steps[-last:]]
        accs = [run["accs"][s] for s in sorted(run["accs"])]
        lines.append(f"| {label_of(run)} | `{run['id']}` | {run['commit']} | {run['dropout']} | "
                     f"{run['client_params']:,} | "
                     f"{run['summary']['steps']} | "
                     f"{100 * accs[0]:.1f} | {100 * accs[-1]:.1f} | {100 * max(accs):.1f} | "
                     f"{sum(tail) / len(tail):.4f} | {run['summary']['seconds']:.0f} |")
    lines += ["", f"Loss: training loss as each cell trained (dropout as in the dropout column), mean of the "
              f"last {last} steps; compare modes' losses only where they trained with the same dropout."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="grid folder(s) written by accuracy.py")
    p.add_argument("--out", type=Path, default=Path("docs/client_size.png"), help="PNG (default %(default)s)")
    p.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--model", default="minilm-l6", help="model label of the cells to plot (default %(default)s)")
    p.add_argument("--task", default="sst2", help="(default %(default)s)")
    p.add_argument("--variant", default="full", help="(default %(default)s)")
    p.add_argument("--window", type=int, default=20, help="moving-average window for the loss (default %(default)s)")
    p.add_argument("--last", type=int, default=50, help="steps averaged for the table's loss column (default %(default)s)")
    p.add_argument("--title", default="MiniLM-L6 on SST-2: HOSL and the frozen-client control at several client sizes, "
                   "vs ZO-SL and FO-SL")
    args = p.parse_args(argv)
    runs = collect(args.runs, args.seed, args.model, args.task, args.variant)
    if not runs:
        print("no finished runs under " + ", ".join(map(str, args.runs)))
        return 2
    for problem in budget_mismatches(runs):
        print(f"warning: not the same budget: {problem}")
    plot(runs, args.out, args.window, args.title)
    text = table(runs, args.last)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
