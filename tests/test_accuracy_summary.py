"""benchmarks/accuracy_summary.py: the per-seed tables of docs/accuracy.md, generated from cells.csv."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from _scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]




summary = load_benchmark("accuracy_summary")

COLUMNS = ["id", "model", "task", "variant", "cut", "mode", "seed", "status", "eval_accuracy",
           "majority_accuracy", "commit", "verdict"]


def _row(model="m", task="t", variant="full", cut="", mode="hosl", seed=0, status="done", acc=0.5,
         majority=0.5, commit="abcdef0123", verdict="learnt") -> dict:
    cut_part = f"cut{cut}/" if cut else ""
    return {"id": f"{model}/{task}/{variant}/{cut_part}{mode}/s{seed}", "model": model, "task": task,
            "variant": variant, "cut": cut, "mode": mode, "seed": str(seed), "status": status,
            "eval_accuracy": "" if acc is None else str(acc), "majority_accuracy": str(majority),
            "commit": commit, "verdict": verdict}


def _write(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def test_results_table_per_seed_values_marks_and_differences(tmp_path):
    rows = [
        _row(mode="hosl", seed=0, acc=0.75), _row(mode="hosl", seed=1, acc=0.80, commit=""),
        _row(mode="fo-sl", seed=0, acc=0.70), _row(mode="fo-sl", seed=1, acc=0.825),
        _row(mode="zo-sl", seed=0, acc=0.5, status="superseded"), _row(mode="zo-sl", seed=1, acc=None, status="pending"),
        _row(mode="zero-shot", seed=0, acc=0.52, majority=0.514), _row(mode="frozen-client", seed=0, acc=0.74),
        # a group with neither FO-SL nor HOSL is left out
        _row(task="other", mode="zero-shot", seed=0, acc=0.6),
    ]
    cells = summary.read_cells(_write(tmp_path / "cells.csv", rows))
    table = summary.results_table(cells)
    (line,) = _table_rows(table)
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    got = dict(zip(head, line, strict=True))
    assert got["HOSL"] == "75.0 / 80.0†"  # no commit recorded -> †
    assert got["FO-SL"] == "70.0 / 82.5"
    assert got["ZO-SL"] == "50.0‡"  # superseded -> ‡; the pending seed has no value
    assert got["HOSL − FO-SL"] == "+5.0 / -2.5"
    assert got["HOSL − ZO-SL"] == "+25.0"  # only the seed where both have a result
    assert got["frozen client"] == "74.0" and got["FO-SL lr 1e-2"] == "—"
    assert got["majority"] == "50.0"  # from HOSL's row at both seeds, written once
    assert "cut" not in head


def test_results_table_has_a_cut_column_when_cells_have_cuts(tmp_path):
    rows = [_row(cut="3", mode="hosl"), _row(cut="5", mode="hosl", acc=0.6)]
    table = summary.results_table(summary.read_cells(_write(tmp_path / "cells.csv", rows)))
    assert [r[3] for r in _table_rows(table)] == ["3", "5"]


def test_changes_table_lists_reruns_of_finished_cells_only(tmp_path):
    before = [_row(mode="hosl", acc=0.7), _row(mode="fo-sl", acc=0.6), _row(mode="zo-sl", acc=0.5, status="failed")]
    after = [_row(mode="hosl", acc=0.7, commit=""),  # carried over, not rerun
             _row(mode="fo-sl", acc=0.65, verdict="not clearly learnt"),  # rerun
             _row(mode="zo-sl", acc=0.55)]  # had no result before
    old = _write(tmp_path / "before.csv", before, columns=COLUMNS[:-2])  # an older table: no commit/verdict
    table = summary.changes_table(summary.read_cells(_write(tmp_path / "after.csv", after)),
                                  summary.read_cells(old), label="2026-11-25")
    assert table.splitlines()[0] == "| cell | 2026-11-25 | rerun | commit | verdict |"
    assert _table_rows(table) == [["`m/t/full/fo-sl/s0`", "60.0", "65.0", "abcdef0", "not clearly learnt"]]


def test_still_owed_lists_superseded_and_pending_cells(tmp_path):
    rows = [_row(mode="hosl"), _row(mode="fo-sl", status="superseded"), _row(mode="zo-sl", status="pending", acc=None)]
    cells = summary.read_cells(_write(tmp_path / "cells.csv", rows))
    assert summary.still_owed(cells) == ["m/t/full/fo-sl/s0", "m/t/full/zo-sl/s0"]


def test_bad_input_names_the_file_and_what_was_expected(tmp_path, capsys):
    bad = tmp_path / "not_cells.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="not_cells.csv: expected a cells.csv.*missing columns"):
        summary.read_cells(bad)
    good = _write(tmp_path / "cells.csv", [_row()])
    with pytest.raises(SystemExit):
        summary.main([str(good), "--section", "changes"])
    assert "--section changes needs --before" in capsys.readouterr().err


def test_docs_accuracy_results_table_is_the_generated_one():
    """docs/accuracy.md's per-seed table is what this script prints from docs/accuracy-cpu.csv."""
    generated = summary.results_table(summary.read_cells(ROOT / "docs" / "accuracy-cpu.csv"))
    doc = (ROOT / "docs" / "accuracy.md").read_text()
    match = re.search(r"^\| model \| task \| variant \| majority \|.*?(?=\n\n)", doc, flags=re.M | re.S)
    assert match, "docs/accuracy.md has no per-seed results table"
    assert match.group(0) == generated
