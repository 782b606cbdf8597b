"""Make ``hosl.kernels`` importable from a source checkout that was not pip-installed.

setup.py installs the top-level ``kernels/`` folder as ``hosl.kernels`` (``package_dir``), and
setuptools' own mapping serves both kinds of install: a regular one copies ``kernels/`` into
``hosl/kernels`` (tests/test_build.py builds that layout), an editable one maps ``hosl.kernels`` to
``./kernels``. This finder is for the one way hosl runs without an install: a checkout built in
place (``python setup.py build_ext --inplace``) and put on ``sys.path``, as scripts/gpu_check.sh
does (``PYTHONPATH=<checkout>``). There only ``hosl/`` is a package, so this finder, placed *last*
on ``sys.meta_path``, maps the one name ``hosl.kernels`` to ``<checkout>/kernels`` when nothing
else found it.

``kernels/`` has no ``__init__.py``: ``hosl.kernels`` is a namespace package (PEP 420), so the
folder is never a regular top-level ``kernels`` package that would shadow Hugging Face's
``kernels`` for a Python started in the checkout's root. The spec returned here is therefore a
namespace spec (no loader, one search location).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KERNELS_DIR = os.path.join(_ROOT, "kernels")


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "hosl.kernels":
            return None
        # a checkout has setup.py beside kernels/; an installed hosl never needs this finder, and a
        # top-level `kernels` package of another project in site-packages must not be picked up
        if not (
            os.path.isfile(os.path.join(_ROOT, "setup.py")) and os.path.isfile(os.path.join(_KERNELS_DIR, "api.py"))
        ):
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [_KERNELS_DIR]
        return spec


def install() -> None:
    if not any(isinstance(f, _SourceTreeKernels) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeKernels())
