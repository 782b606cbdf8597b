"""Per-seed tables for ``docs/accuracy.md`` from a grid's ``cells.csv``.

``benchmarks/accuracy.py`` writes ``results.md`` (means and spreads over seeds, budgets, verdicts) and
``cells.csv`` (one row per cell). The discussion page wants two more views, one value per seed, which
this script prints as markdown so that they are generated rather than typed:

- ``results``: per model/task/variant[/cut], each mode's accuracy as ``s0 / s1`` and the HOSL − FO-SL
  and HOSL − ZO-SL differences per seed (only seeds where both cells have a result);
- ``changes`` (needs ``--before``): every cell of ``cells.csv`` that ran with a recorded commit and
  replaces a finished cell of an earlier ``cells.csv``, with both accuracies and the new verdict.

Marks: ``†`` a result with no recorded commit (carried over from an earlier table), ``‡`` a result a
later fix superseded (status ``superseded``: its rerun has not finished).

    python benchmarks/accuracy_summary.py docs/accuracy-cpu.csv
    git show dcc27e1:docs/accuracy-cpu.csv > /tmp/before.csv
    python benchmarks/accuracy_summary.py docs/accuracy-cpu.csv --before /tmp/before.csv --section changes
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from accuracy import HAS_RESULT, PREVIOUS_MARK, SUPERSEDED_MARK, ZERO_SHOT  # the grid runner beside this script

# (mode, column header) in the order the page shows them; the differences sit between HOSL and the controls
MODES = ((ZERO_SHOT, "zero-shot"), ("fo-sl", "FO-SL"), ("zo-sl", "ZO-SL"), ("hosl", "HOSL"))
CONTROLS = (("frozen-client", "frozen client"), ("fo-sl-lr1e-2", "FO-SL lr 1e-2"))
DIFFS = (("hosl", "fo-sl", "HOSL − FO-SL"), ("hosl", "zo-sl", "HOSL − ZO-SL"))
SEEDS = (0, 1)


def read_cells(path: Path) -> dict[str, dict]:
    """``cells.csv`` rows by cell id (a clear error if the file is not one)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"id", "model", "task", "variant", "mode", "seed", "status", "eval_accuracy"}
    missing = needed - set(rows[0] if rows else needed)
    if not rows or missing:
        raise SystemExit(f"{path}: expected a cells.csv written by benchmarks/accuracy.py"
                         + (f" (missing columns: {', '.join(sorted(missing))})" if rows else " (no rows)"))
    # older tables lack some columns (cut, majority, commit, verdict): an absent value reads as empty
    return {r["id"]: {k: v if v is not None else "" for k, v in r.items()} for r in rows}


def accuracy(row: dict | None) -> float | None:
    """Accuracy in points, or None for a cell without a result."""
    if row is None or row["status"] not in HAS_RESULT or not row["eval_accuracy"]:
        return None
    return 100.0 * float(row["eval_accuracy"])


def marks(row: dict) -> str:
    """The runner's marks, unspaced: † no recorded commit (an earlier table's result), ‡ superseded."""
    return ((PREVIOUS_MARK.strip() if not row.get("commit") else "")
            + (SUPERSEDED_MARK.strip() if row["status"] == "superseded" else ""))


def _group_key(row: dict) -> tuple:
    return row["model"], row["task"], row["variant"], row.get("cut", "")


def results_table(cells: dict[str, dict]) -> str:
    """One line per group with a FO-SL or HOSL result; values per seed (``s0 / s1``)."""
    by_group: dict[tuple, dict] = {}
    for r in cells.values():
        by_group.setdefault(_group_key(r), {})[(r["mode"], r["seed"])] = r
    with_cut = any(g[3] for g in by_group)

    def cell(group, mode, seed) -> dict | None:
        return by_group[group].get((mode, str(seed)))

    def per_seed(group, mode) -> str:
        vals = []
        for s in SEEDS:
            r = cell(group, mode, s)
            a = accuracy(r)
            if a is not None:
                vals.append(f"{a:.1f}{marks(r)}")
        return " / ".join(vals) or "—"

    def diff(group, a_mode, b_mode) -> str:
        out = []
        for s in SEEDS:
            a, b = accuracy(cell(group, a_mode, s)), accuracy(cell(group, b_mode, s))
            if a is not None and b is not None:
                out.append(f"{a - b:+.1f}")
        return " / ".join(out) or "—"

    def majority(group) -> str:
        vals = []
        for s in SEEDS:  # the first mode with a result at this seed gives its evaluation set's rate
            for mode in ("hosl", "fo-sl", ZERO_SHOT):
                r = cell(group, mode, s)
                if accuracy(r) is not None and r.get("majority_accuracy"):
                    vals.append(f"{100.0 * float(r['majority_accuracy']):.1f}")
                    break
        return " / ".join(dict.fromkeys(vals)) or "—"

    head = ["model", "task", "variant"] + (["cut"] if with_cut else []) + ["majority"] + [h for _, h in MODES] \
        + [h for *_, h in DIFFS] + [h for _, h in CONTROLS]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * (3 + with_cut) + "---:|" * (len(head) - 3 - with_cut)]
    for group in by_group:
        if all(accuracy(cell(group, m, s)) is None for m in ("hosl", "fo-sl") for s in SEEDS):
            continue
        cols = list(group[:3]) + ([group[3] or "—"] if with_cut else []) + [majority(group)]
        cols += [per_seed(group, m) for m, _ in MODES]
        cols += [diff(group, a, b) for a, b, _ in DIFFS]
        cols += [per_seed(group, m) for m, _ in CONTROLS]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def changes_table(cells: dict[str, dict], before: dict[str, dict], label: str = "before") -> str:
    """Reruns (a recorded commit) of cells that had finished in ``before``, in grid order."""
    lines = [f"| cell | {label} | rerun | commit | verdict |", "|---|---:|---:|---|---|"]
    for cid, r in cells.items():
        old = before.get(cid)
        if r["status"] == "done" and r.get("commit") and old is not None and old["status"] == "done":
            lines.append(f"| `{cid}` | {accuracy(old):.1f} | {accuracy(r):.1f} | {r['commit'][:7]} | "
                         f"{r.get('verdict') or '—'} |")
    return "\n".join(lines)


def still_owed(cells: dict[str, dict]) -> list[str]:
    """Cells whose result a fix superseded or that have not run yet (status superseded or pending)."""
    return [cid for cid, r in cells.items() if r["status"] in ("superseded", "pending")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cells", type=Path, help="a cells.csv written by benchmarks/accuracy.py")
    p.add_argument("--before", type=Path, default=None,
                   help="an earlier cells.csv; needed for --section changes")
    p.add_argument("--before-label", default="before", help="the changes table's header for --before's column")
    p.add_argument("--section", choices=("results", "changes", "owed", "all"), default="all",
                   help="which table to print (default: all that the inputs allow)")
    args = p.parse_args(argv)
    if args.section == "changes" and args.before is None:
        p.error("--section changes needs --before (an earlier cells.csv)")
    cells = read_cells(args.cells)
    parts = []
    if args.section in ("results", "all"):
        parts.append(results_table(cells))
    if args.section in ("changes", "all") and args.before is not None:
        parts.append(changes_table(cells, read_cells(args.before), args.before_label))
    if args.section in ("owed", "all"):
        owed = still_owed(cells)
        parts.append("Still owed: " + (", ".join(f"`{c}`" for c in owed) if owed else "none"))
    sys.stdout.write("\n\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
