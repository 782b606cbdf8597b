"""The lint script, pyproject.toml and the pre-commit hooks agree; the version has one home.

``.ci/lint.sh`` names what it checks in three bash arrays (LINTED, FORMATTED, TYPED) and pins the
tool versions; these tests read them from the script as written, so a renamed package or a bumped
pin that was not carried over fails here rather than as a silently empty lint run.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hosl

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
LINT_SH = (ROOT / ".ci" / "lint.sh").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PRE_COMMIT = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())


def lint_array(name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", LINT_SH, re.MULTILINE)
    assert match, f".ci/lint.sh has no {name}=(...) line"
    return match.group(1).split()


def lint_pin(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", LINT_SH, re.MULTILINE)
    assert match, f".ci/lint.sh has no {name}= line"
    return match.group(1)


def ruff_hooks() -> dict[str, dict]:
    (repo,) = [r for r in PRE_COMMIT["repos"] if r["repo"].endswith("/ruff-pre-commit")]
    return {"rev": repo["rev"], **{h["id"]: h for h in repo["hooks"]}}


@pytest.mark.parametrize("array", ["LINTED", "FORMATTED", "TYPED"])
def test_every_path_the_lint_script_names_exists_under_hosl(array):
    paths = lint_array(array)
    assert paths, f"{array} is empty"
    for path in paths:
        assert (ROOT / path).exists(), f"{array} in .ci/lint.sh names {path}, which does not exist"
        assert path == "hosl" or path.startswith("hosl/"), path


def test_the_formatted_and_typed_paths_are_inside_the_linted_ones():
    linted = lint_array("LINTED")
    for path in lint_array("FORMATTED") + lint_array("TYPED"):
        assert any(path == p or path.startswith(p + "/") for p in linted), path


def test_pyproject_configures_ruff_and_mypy():
    ruff = PYPROJECT["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert {"E", "F", "W", "I", "B", "UP"} <= set(ruff["lint"]["select"])
    assert ruff["lint"]["pycodestyle"]["max-line-length"] >= ruff["line-length"]
    assert "hosl" in ruff["lint"]["isort"]["known-first-party"]
    assert PYPROJECT["tool"]["mypy"]["python_version"] == PYPROJECT["project"]["requires-python"].lstrip(">=")


def test_pre_commit_pins_the_lint_scripts_ruff_and_formats_the_same_paths():
    hooks = ruff_hooks()
    assert hooks["rev"] == "v" + lint_pin("RUFF_VERSION")
    assert re.fullmatch(r"\d+\.\d+\.\d+", lint_pin("MYPY_VERSION"))
    formatted = lint_array("FORMATTED")
    pattern = re.compile(hooks["ruff-format"]["files"])
    for path in formatted:
        assert pattern.search(path + "/__init__.py"), f"ruff-format's files: misses {path}"
    # and nothing else: a package of hosl/ is formatted by the hook exactly when FORMATTED covers it
    for package in sorted(p for p in (ROOT / "hosl").iterdir() if (p / "__init__.py").is_file()):
        rel = package.relative_to(ROOT).as_posix()
        covered = any(rel == p or rel.startswith(p + "/") for p in formatted)
        assert bool(pattern.search(rel + "/__init__.py")) == covered, rel
    assert re.compile(hooks["ruff-check"]["files"]).search("hosl/cli.py")


def test_the_version_has_one_home():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hosl.__version__"}
    # a literal setuptools reads without importing hosl (so building needs no torch)
    tree = ast.parse((ROOT / "hosl" / "__init__.py").read_text())
    (value,) = [node.value for node in tree.body if isinstance(node, ast.Assign)
                and [getattr(t, "id", None) for t in node.targets] == ["__version__"]]
    assert isinstance(value, ast.Constant) and value.value == hosl.__version__
    assert importlib.metadata.version("hosl") == hosl.__version__  # the installed metadata agrees


def test_a_build_takes_its_version_from_hosl_and_ships_py_typed(tmp_path):
    """A HOSL_BUILD_EXT=0 build of a copy whose hosl/__init__.py says 9.8.7: the metadata says 9.8.7
    and the built package has py.typed (package-data)."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_config.py")
    for folder in ("hosl", "kernels"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    init = tree / "hosl" / "__init__.py"
    text = init.read_text()
    assert f'__version__ = "{hosl.__version__}"' in text
    init.write_text(text.replace(f'__version__ = "{hosl.__version__}"', '__version__ = "9.8.7"'))
    env = {**os.environ, "HOSL_BUILD_EXT": "0"}
    out = tmp_path / "lib"
    version = subprocess.run([sys.executable, "setup.py", "-q", "--version"], cwd=tree, env=env, capture_output=True,
                             text=True, check=True)
    assert "9.8.7" in version.stdout.split()
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=tree, env=env,
                   capture_output=True, check=True)
    assert (out / "hosl" / "py.typed").is_file()
