"""The lint script, pyproject.toml and the pre-commit hooks agree.

``.ci/lint.sh`` names what it checks in three bash arrays (LINTED, FORMATTED, TYPED) and pins the
tool versions; these tests read them from the script as written, so a renamed package or a bumped
pin that was not carried over fails here rather than as a silently empty lint run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

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
    # and nothing else: every package of hosl/ not in FORMATTED is left to the lint script's widening
    for package in sorted(p for p in (ROOT / "hosl").iterdir() if (p / "__init__.py").is_file()):
        rel = package.relative_to(ROOT).as_posix()
        assert bool(pattern.search(rel + "/__init__.py")) == (rel in formatted), rel
    assert re.compile(hooks["ruff-check"]["files"]).search("hosl/cli.py")
