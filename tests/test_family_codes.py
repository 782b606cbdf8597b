"""The direction families' integer codes: defined once in hosl.directions.families, spelled again only
where another language needs them (the C++ list ``HOSL_FAMILIES`` in csrc/hosl_direction.h, which
generates the enum ``hosl::Family``; the Triton kernels import the registry's). Any drift fails here before
it can pick the wrong family in a kernel.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from hosl.directions import families

ROOT = Path(__file__).resolve().parents[1]


def _header() -> str:
    return (ROOT / "csrc" / "hosl_direction.h").read_text()


def _cxx_family_list() -> dict[str, int]:
    """The X-macro ``#define HOSL_FAMILIES(X) X(kGaussian, 0) ...`` of the header, as {"Gaussian": 0, ...}.

    It is the one list of the compiled kernels' families: it generates the enum ``hosl::Family`` and
    the per-family dispatch of the CPU and CUDA backends.
    """
    body = re.search(r"#define\s+HOSL_FAMILIES\(X\)((?:[^\n]*\\\n)*[^\n]*)", _header())
    assert body, "csrc/hosl_direction.h has no `#define HOSL_FAMILIES(X)` list"
    text = body.group(1).replace("\\\n", " ")
    entries = re.findall(r"X\(\s*k(\w+)\s*,\s*(\d+)\s*\)", text)
    assert entries, "HOSL_FAMILIES lists no X(kName, code) entry"
    assert re.sub(r"X\(\s*k\w+\s*,\s*\d+\s*\)", "", text).strip() == "", f"unparsed text in HOSL_FAMILIES: {text!r}"
    names = [name for name, _ in entries]
    assert len(set(names)) == len(names), f"a family is listed twice in HOSL_FAMILIES: {names}"
    return {name: int(code) for name, code in entries}


def _snake(camel: str) -> str:
    """The spec name of enumerator ``k<camel>``: ``Gaussian`` -> ``gaussian``, ``FooBar`` -> ``foo_bar``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _cxx_family_codes() -> dict[str, int]:
    """HOSL_FAMILIES as spec names: {"gaussian": 0, ...}."""
    return {_snake(name): code for name, code in _cxx_family_list().items()}


def test_spec_lists_each_family_once_with_distinct_codes():
    """Every family with kernels of its own has a code, 0 .. N-1; a shaped family (no code) has none."""
    kernel = tuple(f.name for f in families.FAMILIES.entries() if f.code is not None)
    assert kernel == tuple(families.FAMILY_CODES)
    assert sorted(families.FAMILY_CODES.values()) == list(range(len(kernel)))
    for f in families.FAMILIES.entries():
        assert (f.code is None) == f.shaped, f"{f.name}: a code exactly when it is not shaped"


def test_cxx_family_list_matches_spec():
    assert _cxx_family_codes() == dict(families.FAMILY_CODES)


def test_cxx_enum_is_generated_from_the_list():
    """``enum class Family`` spells no family itself: its body is the expansion of HOSL_FAMILIES."""
    body = re.search(r"enum class Family\s*:\s*\w+\s*\{([^}]*)\}", _header())
    assert body, "csrc/hosl_direction.h has no `enum class Family`"
    assert "HOSL_FAMILIES(" in body.group(1)
    assert not re.search(r"\bk[A-Z]\w*\s*=", body.group(1)), "enum class Family lists families by hand"


def test_every_listed_family_has_a_compiled_definition():
    """Each family of HOSL_FAMILIES has its ``direction4<Family::kName>`` specialisation in the header
    (without one, the CPU and CUDA builds fail on the primary template's static_assert)."""
    header = _header()
    for camel in _cxx_family_list():
        assert re.search(rf"direction4<Family::k{camel}>\s*\(", header), f"no direction4<Family::k{camel}> in the header"


def test_compiled_backends_dispatch_through_the_list():
    """The CUDA launch and the CPU's generic path expand HOSL_FAMILIES: no hand-written case per family."""
    for path in ("csrc/cuda/direction_cuda.cu", "csrc/cpu/direction_cpu.cpp"):
        source = (ROOT / path).read_text()
        assert "HOSL_FAMILIES(" in source, f"{path} does not expand HOSL_FAMILIES"
    cuda = (ROOT / "csrc/cuda/direction_cuda.cu").read_text()
    assert not re.search(r"case\s+Family::k", cuda), "csrc/cuda/direction_cuda.cu has a per-family case"


def test_triton_constants_match_spec():
    pytest.importorskip("triton")
    direction = importlib.import_module("hosl.kernels.direction")
    multi_tensor = importlib.import_module("hosl.kernels.multi_tensor")
    constants = {name[len("FAMILY_"):].lower(): getattr(direction, name).value
                 for name in dir(direction) if name.startswith("FAMILY_") and name != "FAMILY_CODES"}
    assert constants == dict(families.FAMILY_CODES)
    assert multi_tensor.FAMILY_CODES is families.FAMILY_CODES


def test_compiled_shims_take_the_codes_from_spec():
    from hosl.ops.backends import _compiled

    assert _compiled.FAMILY_CODES is families.FAMILY_CODES
