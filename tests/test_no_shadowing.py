"""No module the repository makes importable hides an installed package's module.

A Python started in the repository root has the root first on ``sys.path`` (``python -c``, a REPL,
``python -m hosl``, ``python -m pytest``); a script in ``benchmarks/`` has ``benchmarks/`` first;
pytest puts ``tests/`` there. A regular module or package in one of those folders then wins over
any installed module of the same name: on 2026-12-07 the root's ``kernels/`` package hid Hugging
Face's ``kernels``, which transformers 5.25 imports, and nothing ran. A folder without
``__init__.py`` (a namespace portion, like ``kernels/`` now) never wins over a regular package, so
only regular modules and packages are checked against the installed distributions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"root": ROOT, "benchmarks": ROOT / "benchmarks", "tests": ROOT / "tests"}
# the scripts (a module with a __main__ block), not the helpers they import (real_batches.py)
BENCHMARK_SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                           if not p.name.startswith("test_") and '__name__ == "__main__"' in p.read_text())


def regular_names(folder: Path) -> set[str]:
    """Names a ``sys.path`` entry of ``folder`` makes importable as regular modules or packages."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_file() and entry.suffix in (".so", ".pyd"):
            names.add(entry.name.split(".")[0])
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
    return names


def installed_top_level_modules() -> dict[str, list[str]]:
    """Top-level module name -> the installed distributions that provide it (hosl's own left out)."""
    found = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        others = [d for d in dists if d.lower() != "hosl"]
        if others:
            found[module] = others
    return found


def test_regular_names_helper_sees_modules_and_packages(tmp_path):
    (tmp_path / "a.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "portion").mkdir()
    (tmp_path / "notes.md").write_text("")
    assert regular_names(tmp_path) == {"a", "pkg"}


@pytest.mark.parametrize("where", sorted(FOLDERS))
def test_no_importable_name_is_an_installed_module(where):
    installed = installed_top_level_modules()
    assert installed, "importlib.metadata found no installed distribution: the check would prove nothing"
    clashes = {name: installed[name] for name in regular_names(FOLDERS[where]) if name in installed}
    assert not clashes, (f"{where}: these names hide installed modules when {FOLDERS[where]} is on sys.path "
                         f"(rename them): {clashes}")


def test_top_level_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels").is_dir() and (ROOT / "kernels" / "api.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the root's kernels/ a regular package that hides Hugging Face's kernels")
    assert not (ROOT / "benchmarks" / "kernels.py").exists()


def _run(args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("where", ["root", "benchmarks"])
def test_transformers_imports_from_inside_the_checkout(where):
    """What failed on the fresh machine: transformers' model import from the repository root."""
    code = ("import hosl, transformers; from transformers import AutoModel; import importlib.util as u; "
            "s = u.find_spec('kernels'); print('KERNELS', s and (s.origin or list(s.submodule_search_locations)))")
    done = _run(["-c", code], cwd=FOLDERS[where])
    assert done.returncode == 0, done.stderr[-3000:]
    if importlib.util.find_spec("kernels") is not None and "kernels" in installed_top_level_modules():
        # the installed package is the one found, not anything of this checkout
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("KERNELS"))
        assert str(ROOT / "kernels") not in line and str(ROOT / "benchmarks") not in line, line
        assert line.endswith("__init__.py"), line  # a regular package: the installed one


def test_python_m_hosl_from_the_root():
    done = _run(["-m", "hosl", "train", "--help"], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--mode" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARK_SCRIPTS)
def test_every_benchmark_script_answers_help(script):
    done = _run([f"benchmarks/{script}", "--help"], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage" in done.stdout.lower(), done.stdout[:500]
