"""Argument checks for the direction ops.

Everything is checked before anything is written, so a call that raises leaves every tensor as it
was. Messages name the argument and say what was expected. Two callers: the registered ops of
:mod:`hosl.ops.library` check what the op itself needs to be safe (tensors, list lengths, offsets,
key words, family, float32 scalars), whoever calls them; the Python API of :mod:`hosl.ops.api`
checks and converts the user's arguments (seeds, ``offset``/``offsets``, ``lr * coeffs``...) into
the op's. Every check here is O(number of tensors), never O(elements).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

from hosl.directions.spec import SEED_LIMIT

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COORDINATE_LIMIT = 1 << 63  # coordinates are int64 in every backend
KEY_WORD_LIMIT = 1 << 32  # a seed reaches the ops as the two 32-bit words of its Philox key


def as_tensor_list(tensors, name: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(tensors).__name__}")
    for j, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{j}] must be a torch.Tensor, got {type(t).__name__}")
    return list(tensors)


def check_weights(tensors: Sequence[torch.Tensor], name: str, *, memory: bool = True) -> None:
    """Float dtype, contiguous, one device, no two tensors sharing memory (``memory=False``: not
    that last, for fake tensors, which have no memory)."""
    for j, t in enumerate(tensors):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{j}] has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if not t.is_contiguous():
            raise ValueError(
                f"{name}[{j}] is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                "the direction ops number coordinates in memory order and need contiguous tensors"
            )
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{name} must all be on one device, got {sorted(map(str, devices))}")
    if memory:
        _check_no_overlap(tensors, name)


def _memory_span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check_no_overlap(tensors: Sequence[torch.Tensor], name: str) -> None:
    spans = sorted((*_memory_span(t), j) for j, t in enumerate(tensors) if t.numel())
    for (_s0, e0, j0), (s1, _e1, j1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{name}[{j0}] and {name}[{j1}] share memory; each coordinate must be written once")


def check_outputs(tensors: Sequence[torch.Tensor], out: Sequence[torch.Tensor], *, memory: bool = True) -> None:
    """``out[j]`` like ``tensors[j]``, and aliasing no tensor but its own input (``memory`` as in
    :func:`check_weights`)."""
    if len(out) != len(tensors):
        raise ValueError(f"out has {len(out)} tensors but tensors has {len(tensors)}; they must match")
    for j, (t, o) in enumerate(zip(tensors, out)):
        if o.shape != t.shape or o.dtype != t.dtype:
            raise ValueError(
                f"out[{j}] is {o.dtype}{list(o.shape)}; expected {t.dtype}{list(t.shape)} like tensors[{j}]"
            )
        if o.device != t.device:
            raise ValueError(f"out[{j}] is on {o.device} but tensors[{j}] is on {t.device}")
    check_weights(out, "out", memory=memory)
    if not memory:
        return
    in_spans = [_memory_span(t) for t in tensors]
    for j, o in enumerate(out):
        if not o.numel():
            continue
        s, e = _memory_span(o)
        for i, (ts, te) in enumerate(in_spans):
            if i != j and s < te and ts < e:
                raise ValueError(f"out[{j}] overlaps tensors[{i}]; out may alias only its own input")


def check_seed(seed, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def check_index(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be a non-negative integer, got {type(value).__name__}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_coordinates(offset: int, total: int, name: str = "offset") -> None:
    if offset + total > COORDINATE_LIMIT:
        raise ValueError(f"coordinates {name}={offset} .. {name}+{total} exceed 2**63; coordinate indices are int64")


def check_offsets(offsets: Sequence[int], numels: Sequence[int], name: str = "offsets") -> None:
    """One first coordinate per tensor, each ``>= 0`` and with the tensor's coordinates below 2**63."""
    if len(offsets) != len(numels):
        raise ValueError(f"{name} has {len(offsets)} entries but tensors has {len(numels)}; one per tensor")
    for j, (offset, numel) in enumerate(zip(offsets, numels)):
        check_offset(offset, numel, f"{name}[{j}]")


def check_offset(offset: int, numel: int, name: str) -> None:
    """The first coordinate of a tensor of ``numel`` elements: ``>= 0``, the last one below 2**63."""
    check_index(offset, name)
    check_coordinates(offset, numel, name)


def check_key_word(value: int, name: str) -> None:
    """One 32-bit word of a Philox key (:func:`hosl.directions.spec.split_seed`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < KEY_WORD_LIMIT:
        raise ValueError(f"{name} must be a 32-bit key word, an integer in [0, 2**32), got {value!r}")


def check_keys(keys_lo: Sequence[int], keys_hi: Sequence[int], other: str, count: int) -> None:
    """The Philox keys of ``count`` directions (as many as list ``other`` has) as two lists of key words."""
    for name, words in (("keys_lo", keys_lo), ("keys_hi", keys_hi)):
        if len(words) != count:
            raise ValueError(f"{name} has {len(words)} entries but {other} has {count}; one key per direction")
        for q, word in enumerate(words):
            check_key_word(word, f"{name}[{q}]")


def finite_real(value, name: str) -> float:
    """``value`` as a Python float, which must be finite."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def to_float32(value, name: str) -> float:
    """The float32 value of a finite real number (the exact scalar every backend computes with)."""
    value = finite_real(value, name)
    with np.errstate(over="ignore"):
        rounded = float(np.float32(value))
    if not math.isfinite(rounded):
        raise ValueError(f"{name}={value} overflows float32")
    return rounded


def check_float32s(values: Sequence[float], name: str) -> None:
    """Every entry finite and within float32's range (what :func:`to_float32` accepts)."""
    for j, value in enumerate(values):
        to_float32(value, f"{name}[{j}]")


def check_family(family) -> str:
    """One of the direction families of :data:`hosl.directions.families.FAMILIES`."""
    from hosl.directions.families import FAMILIES

    if not isinstance(family, str):
        raise TypeError(f"family must be a string, one of {list(FAMILIES)}; got {type(family).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"unknown direction family {family!r}; expected one of {list(FAMILIES)}")
    return family


def check_sphere_numels(numels, name: str) -> None:
    """Sphere norms are exact int64 sums: at most spec.SPHERE_MAX_NUMEL elements per tensor."""
    from hosl.directions.spec import SPHERE_MAX_NUMEL

    for j, n in enumerate(numels):
        if n > SPHERE_MAX_NUMEL:
            raise ValueError(f"{name}[{j}] has {n} elements; family='sphere' supports at most 2**33 per tensor")


def check_factors(family: str, factors: Sequence[float] | None, count: int, name: str) -> None:
    """An op's sphere factors: ``count`` float32 values for a family with a per-tensor factor,
    None for the others."""
    from hosl.directions.families import FAMILIES

    if not FAMILIES[family].per_tensor_factor:
        if factors is not None:
            raise ValueError(f"{name} is only for a family with a per-tensor factor, not family={family!r}")
        return
    if factors is None or len(factors) != count:
        got = "None" if factors is None else f"{len(factors)} entries"
        raise ValueError(f"{name} is {got}; family={family!r} needs {count} factors")
    check_float32s(factors, name)


def check_step_fits(
    tensors: Sequence[torch.Tensor], coeffs: Sequence[float], family: str, rank: int | None = None
) -> None:
    """Refuse ``zo_update_`` coefficients whose step alone, ``sum_q |coeffs[q]| * max|z|`` (``max|z|``
    the family's bound, ``FAMILIES[family].max_abs``), reaches a tensor dtype's largest finite value:
    such an update would write inf (fp16 tops out at 65504). Only the step is bounded, not
    ``w - decay*w`` plus the step, which needs a pass over the weights: the optimizers' finite guard
    (:func:`hosl.optim.rules.update_is_safe`) bounds that, with the same ``max|z|``, and so skips an
    update before it would be refused here."""
    from hosl.directions.families import family_max_abs

    total = math.fsum(abs(c) for c in coeffs)
    for j, t in enumerate(tensors):
        step = total * family_max_abs(family, t.numel(), rank)
        limit = torch.finfo(t.dtype).max
        if step >= limit:
            raise ValueError(
                f"coeffs: sum |coeffs| = {total:g} times the {family!r} |z| bound gives a step of {step:g}, beyond "
                f"{t.dtype}'s largest value {limit:g} for tensors[{j}]; the update would write inf"
            )


def check_scale_list(values, length: int, name: str) -> list[float]:
    """``length`` finite float32 factors (sphere scales), as exact float32 Python floats."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of {length} floats, got {type(values).__name__}")
    if len(values) != length:
        raise ValueError(f"{name} has {len(values)} entries; expected {length}, one per tensor")
    return [to_float32(v, f"{name}[{j}]") for j, v in enumerate(values)]
