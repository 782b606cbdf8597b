"""setup.py's build decisions and the CUDA backend's compute-capability check, without building.

setup.py is loaded as a module (its ``setup()`` call runs only as ``__main__``), so these call its
functions directly: the arch list (``TORCH_CUDA_ARCH_LIST`` or torch's own), the nvcc flags, and the
extension list (``HOSL_BUILD_EXT=0``: none).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hosl.ops import dispatch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("hosl_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arch_list_is_parsed_as_torch_writes_it(setup_py):
    assert setup_py.parse_arch_list("8.0;9.0+PTX") == ["8.0", "9.0+PTX"]
    assert setup_py.parse_arch_list(" 7.5 8.6, 9.0a;10.0f+PTX ") == ["7.5", "8.6", "9.0a", "10.0f+PTX"]


def test_named_archs_are_expanded_as_torchs_builder_does(setup_py):
    assert setup_py.parse_arch_list("Hopper") == ["9.0+PTX"]
    assert setup_py.parse_arch_list("Ampere;9.0a") == ["8.0", "8.6+PTX", "9.0a"]
    from torch.utils import cpp_extension

    source = Path(cpp_extension.__file__).read_text()
    for name, archs in setup_py.NAMED_ARCHS.items():  # the same names and archs as the installed torch's
        assert f"('{name}', '{archs}')" in source, name


def test_the_no_torch_message_quotes_pyprojects_torch_range(setup_py):
    import inspect
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if d.startswith("torch"))
    bounds = {s.operator: s.version for s in torch_req.specifier}
    assert f"another torch in [{bounds['>=']}, {bounds['<']})" in inspect.getsource(setup_py._import_torch)


@pytest.mark.parametrize("bad", ["Hoper", "9", "sm_90", "9.0+ptx", "9.0;;x"])
def test_a_bad_arch_is_named(setup_py, bad):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST: '.*' is not an arch like 8.0"):
        setup_py.parse_arch_list(bad)


def test_an_empty_arch_list_is_refused(setup_py):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST is empty"):
        setup_py.parse_arch_list(" ; ")


def test_default_is_the_archs_torch_was_built_for_with_ptx_of_the_newest(setup_py):
    # numeric order (10.0 after 9.0), torch's compute_* entries ignored, arch-specific kept
    torch_archs = ["sm_75", "sm_120", "sm_90a", "sm_100", "sm_80", "sm_90", "compute_120"]
    assert setup_py.default_arch_list(torch_archs) == ["7.5", "8.0", "9.0", "9.0a", "10.0", "12.0+PTX"]
    # the PTX goes on the newest portable arch, not on an arch-specific one
    assert setup_py.default_arch_list(["sm_80", "sm_90a"]) == ["8.0+PTX", "9.0a"]
    # a torch that says nothing (a CPU build, or no GPU to ask): 8.0 and 9.0
    assert setup_py.default_arch_list([]) == ["8.0", "9.0+PTX"]


def test_the_environment_wins_over_the_default(setup_py):
    assert setup_py.cuda_arch_list("8.9", ["sm_80", "sm_90"]) == ["8.9"]
    assert setup_py.cuda_arch_list("", ["sm_80", "sm_90"]) == ["8.0", "9.0+PTX"]
    assert setup_py.cuda_arch_list(None, ["sm_86"]) == ["8.6+PTX"]


def test_gencode_flags(setup_py):
    assert setup_py.gencode_flags(["8.0", "9.0a", "12.0+PTX"]) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120",
    ]


def test_hosl_build_ext_0_builds_nothing(setup_py):
    assert setup_py.extensions({"HOSL_BUILD_EXT": "0"}) == ([], None)
    exts, archs = setup_py.extensions({"HOSL_NO_CUDA": "1"})
    assert [e.name for e in exts] == ["hosl._C"] and archs is None


@pytest.mark.parametrize("built,archs", [(False, None), (True, ["8.0", "9.0+PTX"])])
def test_build_config_round_trips(setup_py, built, archs):
    scope = {}
    exec(setup_py.build_config_source(built, archs), scope)
    assert scope["BUILD_EXT"] is built and scope["CUDA_ARCHS"] == archs


def test_info_says_when_the_extensions_were_not_built(monkeypatch):
    """After a HOSL_BUILD_EXT=0 install the missing compiled backends give that as their reason."""
    from hosl.ops.backends import cpu

    class Config:
        BUILD_EXT = False
        CUDA_ARCHS = None

    monkeypatch.setattr(dispatch, "_modules", {})
    monkeypatch.setattr(dispatch, "_load_errors", {})
    monkeypatch.setattr(dispatch, "_build_config", lambda: Config)
    monkeypatch.setattr(cpu, "is_available", lambda: False)
    assert "cpu" not in dispatch.available_backends() and "reference" in dispatch.available_backends()
    assert "HOSL_BUILD_EXT=0" in dispatch.unavailable_reasons()["cpu"]


# ---- compute capability vs the built arch list ---------------------------------------------------

@pytest.mark.parametrize("cc,archs,runs", [
    ((9, 0), ["8.0", "9.0"], True),
    ((8, 6), ["8.0", "9.0"], True),           # sm_80 SASS runs on 8.6
    ((8, 9), ["9.0"], False),                 # no SASS for 8.x, no PTX
    ((7, 5), ["8.0", "9.0+PTX"], False),      # older than every arch
    ((10, 0), ["8.0", "9.0"], False),         # Blackwell: no SASS, no PTX
    ((10, 0), ["8.0", "9.0+PTX"], True),      # ... PTX of 9.0 JIT-compiles
    ((12, 0), ["8.0", "9.0+PTX"], True),
    ((9, 0), ["9.0a"], True),
    ((10, 0), ["9.0a+PTX"], False),           # arch-specific code runs on its own arch only
    ((10, 3), ["10.0f"], True),               # family code: same major, minor at least
])
def test_arch_runs_on(cc, archs, runs):
    assert dispatch.arch_runs_on(cc, archs) is runs


def test_cuda_backend_is_refused_on_a_gpu_it_was_not_built_for(monkeypatch):
    class Config:
        CUDA_ARCHS = ["8.0", "9.0"]
        BUILD_EXT = True

    monkeypatch.setattr(dispatch, "_build_config", lambda: Config)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    why = dispatch._cuda_arch_mismatch()
    assert "8.0;9.0" in why and "compute capability 7.5" in why and "TORCH_CUDA_ARCH_LIST=7.5" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert dispatch._cuda_arch_mismatch() == ""
    Config.CUDA_ARCHS = None  # not recorded (a tree built before setup.py wrote it): not checked
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert dispatch._cuda_arch_mismatch() == ""


# ---- hosl.kernels: the top-level kernels/ folder, installed inside hosl --------------------------

def test_a_build_puts_kernels_inside_hosl(tmp_path):
    """What a regular install (a wheel) gets: setup.py's package_dir maps kernels/ to hosl/kernels,
    and no top-level ``kernels`` package is installed (PyPI has another project of that name)."""
    import os
    import shutil
    import subprocess
    import sys

    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build_config.py")
    for folder in ("hosl", "kernels"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    out = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)], cwd=tree, check=True,
                   capture_output=True, env={**os.environ, "HOSL_BUILD_EXT": "0"})
    assert sorted(p.name for p in (out / "hosl" / "kernels").glob("*.py")) == sorted(
        p.name for p in (ROOT / "kernels").glob("*.py"))
    assert not (out / "kernels").exists()


def test_hosl_kernels_is_this_checkouts_kernels_folder():
    """Here (an editable install, or a bare checkout through hosl/_source_tree.py) hosl.kernels is
    the namespace package ./kernels, and the fallback finder maps that one name only."""
    import importlib
    import importlib.util

    from hosl import _source_tree

    assert [Path(p) for p in importlib.util.find_spec("hosl.kernels").submodule_search_locations] == [ROOT / "kernels"]
    assert Path(importlib.import_module("hosl.kernels.api").__file__) == ROOT / "kernels" / "api.py"
    spec = _source_tree._SourceTreeKernels().find_spec("hosl.kernels")
    assert spec.loader is None and spec.submodule_search_locations == [str(ROOT / "kernels")]
    assert _source_tree._SourceTreeKernels().find_spec("kernels") is None
