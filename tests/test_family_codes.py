"""The direction families' integer codes: defined once in hosl.directions.spec, spelled again only
where another language needs them (the C++ enum ``hosl::Family`` in csrc/hosl_direction.h; the
Triton kernels import spec's). Any drift fails here before it can pick the wrong family in a kernel.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from hosl.directions import spec

ROOT = Path(__file__).resolve().parents[1]


def _cxx_family_enum() -> dict[str, int]:
    """``enum class Family : int { kGaussian = 0, ... }`` of the header, as {"gaussian": 0, ...}."""
    header = (ROOT / "csrc" / "hosl_direction.h").read_text()
    body = re.search(r"enum class Family\s*:\s*\w+\s*\{([^}]*)\}", header)
    assert body, "csrc/hosl_direction.h has no `enum class Family`"
    entries = re.findall(r"k(\w+)\s*=\s*(\d+)", body.group(1))
    assert entries, "every hosl::Family entry must give its value explicitly (kName = code)"
    return {name.lower(): int(code) for name, code in entries}


def test_spec_lists_each_family_once_with_distinct_codes():
    assert spec.FAMILIES == tuple(spec.FAMILY_CODES)
    assert sorted(spec.FAMILY_CODES.values()) == list(range(len(spec.FAMILIES)))


def test_cxx_enum_matches_spec():
    assert _cxx_family_enum() == spec.FAMILY_CODES


def test_triton_constants_match_spec():
    pytest.importorskip("triton")
    direction = importlib.import_module("hosl.kernels.direction")
    multi_tensor = importlib.import_module("hosl.kernels.multi_tensor")
    constants = {name[len("FAMILY_"):].lower(): getattr(direction, name).value
                 for name in dir(direction) if name.startswith("FAMILY_") and name != "FAMILY_CODES"}
    assert constants == spec.FAMILY_CODES
    assert multi_tensor.FAMILY_CODES == spec.FAMILY_CODES


def test_compiled_shims_take_the_codes_from_spec():
    from hosl.ops.backends import _compiled

    assert _compiled.FAMILY_CODES is spec.FAMILY_CODES
