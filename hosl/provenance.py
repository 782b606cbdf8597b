"""Which code produced a result: the checkout's commit and whether its tracked files differed from it.

Every result JSON the benchmarks write carries :func:`checkout_state` under ``"provenance"``
(:func:`stamped`: in the JSON's ``meta``, or at its top level where it has none). With ``git`` and
the repository at hand the answer comes from ``git``; where either is missing (a copy of the tree
on another machine, an archive) it comes from a ``GIT_COMMIT`` file at the root of the tree,
written from the checkout before it was copied::

    python -m hosl.provenance --write      # GIT_COMMIT: the commit, then "clean" or "dirty"

Neither: ``commit`` and ``dirty`` are None (unknown), never a guess.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMIT_FILE = "GIT_COMMIT"


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # no git here
        return None
    return proc.stdout if proc.returncode == 0 else None


def _from_git(root: Path) -> dict | None:
    head = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    if head is None or status is None:
        return None
    files = [line[3:] for line in status.splitlines() if line.strip() and line[3:] != COMMIT_FILE]
    return {"commit": head.strip(), "dirty": bool(files), "dirty_files": files[:50], "commit_source": "git"}


def _from_file(root: Path) -> dict | None:
    try:
        lines = (root / COMMIT_FILE).read_text().split()
    except OSError:
        return None
    if not lines or len(lines[0]) != 40 or any(c not in "0123456789abcdef" for c in lines[0]):
        return None
    state = lines[1] if len(lines) > 1 else None
    return {
        "commit": lines[0],
        "dirty": None if state is None else {"clean": False, "dirty": True}.get(state),
        "dirty_files": [],
        "commit_source": COMMIT_FILE,
    }


def checkout_state(root: Path | str = ROOT) -> dict:
    """``commit``, ``dirty`` (tracked files differ from it; None: unknown), ``dirty_files`` (up to
    50), ``commit_source`` (``git``, ``GIT_COMMIT`` or None) and ``recorded`` (UTC time)."""
    root = Path(root)
    found = (
        _from_git(root) or _from_file(root) or {"commit": None, "dirty": None, "dirty_files": [], "commit_source": None}
    )
    return {**found, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def stamped(result: dict, root: Path | str = ROOT) -> dict:
    """``result`` with ``"provenance"`` (:func:`checkout_state` of the tree the code ran from) in its
    ``"meta"`` dict where it has one (readers skip ``meta`` among the rows), else at the top level."""
    if isinstance(result.get("meta"), dict):
        return {**result, "meta": {**result["meta"], "provenance": checkout_state(root)}}
    return {**result, "provenance": checkout_state(root)}


def write_commit_file(root: Path | str = ROOT) -> Path:
    """Write ``GIT_COMMIT`` (commit, then clean/dirty) from git, for a copy of the tree without git."""
    root = Path(root)
    state = _from_git(root)
    if state is None:
        raise RuntimeError(f"--write needs git and the repository at {root}")
    path = root / COMMIT_FILE
    path.write_text(f"{state['commit']}\n{'dirty' if state['dirty'] else 'clean'}\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hosl.provenance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--write", action="store_true", help=f"write {COMMIT_FILE} at the tree's root from git")
    p.add_argument("--root", default=str(ROOT), help="the tree (default: this checkout)")
    a = p.parse_args(argv)
    if a.write:
        print(write_commit_file(a.root))
    else:
        import json

        print(json.dumps(checkout_state(a.root), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
