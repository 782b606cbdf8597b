"""Codecs for the activations a client uploads (``--wire``): pure tensor functions.

Knows nothing of ZO or of models. A tensor is encoded into a list of tensors (the parts that cross
the wire) and decoded back:

* ``native``: the tensor as it is (one part, nothing lost).
* ``float32`` / ``bfloat16`` / ``float16``: the tensor cast to that format (one part); decode casts
  to the ``dtype`` asked for. Loses the format's relative rounding (2^-8 for bfloat16, 2^-11 for
  float16, 2^-24 for float32) of each value.
* ``delta8``: for copies of a tensor that differ little from a ``reference`` the receiver already
  holds (the perturbed activations ``h(w +- eps z)`` next to the clean ``h(w)``), only the difference
  is sent, as int8 with one float32 scale per row (one vector along the last dim). Casting the
  copies themselves to a 16-bit format rounds each value relative to its own size, which can erase
  a difference of ``eps`` scale entirely; delta8 rounds relative to the size of the difference.

Error bounds (:func:`error_bound`, :func:`max_abs_error`) are stated per element so tests and
callers can check them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CODECS = ("native", "float32", "bfloat16", "float16", "delta8")

_CAST = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# unit roundoff (round to nearest: |fl(x) - x| <= u |x| in the normal range) and half the smallest
# subnormal spacing (the absolute rounding below the normal range) of each float format
_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_TINY = {torch.float64: 2.0**-1075, torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
_FLOAT16_MAX = 65504.0
_Q_MAX = 127


def check_codec(name: str, what: str = "--wire") -> str:
    """``name`` if it is a codec, else a ValueError naming the argument ``what`` and the choices."""
    if name not in CODECS:
        raise ValueError(f"{what} must be one of {', '.join(CODECS)}; got {name!r}")
    return name


def _copies(t: torch.Tensor, reference: torch.Tensor) -> int:
    """How many copies of ``reference`` ``t`` stacks along dim 0 (a ValueError when it is not such a stack)."""
    if (
        reference.dim() != t.dim()
        or tuple(reference.shape[1:]) != tuple(t.shape[1:])
        or (reference.shape[0] == 0 and t.shape[0] != 0)
        or (reference.shape[0] and t.shape[0] % reference.shape[0])
    ):
        raise ValueError(
            f"delta8: the reference must be shaped like one of the copies stacked along dim 0 of the "
            f"tensor (tensor {tuple(t.shape)} = k x reference [rows, ...]); got reference "
            f"{tuple(reference.shape)}"
        )
    return t.shape[0] // reference.shape[0] if reference.shape[0] else 1


def _repeated(reference: torch.Tensor, k: int, device) -> torch.Tensor:
    r = reference.detach().to(device=device, dtype=torch.float32)
    return r.repeat(k, *([1] * (r.dim() - 1))) if k != 1 else r


def _delta(t: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``t - reference`` repeated, in float32; the repeated reference or None)."""
    if t.dim() == 0:
        raise ValueError("delta8 needs a tensor of at least one dimension (a row is a vector along the last dim)")
    t32 = t.detach().float()
    if reference is None:
        return t32, None
    r = _repeated(reference, _copies(t, reference), t.device)
    return t32 - r, r


def encode(t: torch.Tensor, codec: str, reference: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The parts that carry ``t`` with ``codec``.

    ``delta8``: ``t`` holds ``k`` copies stacked along dim 0 of a tensor shaped like ``reference``;
    sent are ``q`` (int8, ``t``'s shape) and ``scale`` (float32, ``t.shape[:-1]``) with
    ``t - reference.repeat(k, ...) ~= q * scale`` row by row (``scale = max|d| / 127`` of the row,
    0 for a row equal to the reference, which then decodes to the reference exactly). Without a
    reference ``t`` itself is quantised (for tensors that already are differences). A row holding
    inf or nan gets a nan scale and decodes to all-nan: the receiver still sees a non-finite value.
    ``float16`` refuses finite values beyond its range (65504) rather than sending inf.
    """
    check_codec(codec)
    if codec != "native" and not t.is_floating_point():
        raise ValueError(f"codec {codec!r} carries floating-point tensors; got {t.dtype}")
    if codec == "native":
        return [t]
    if codec in _CAST:
        if codec == "float16" and t.numel() and bool(((t.abs() > _FLOAT16_MAX) & torch.isfinite(t)).any()):
            raise ValueError(
                f"float16 cannot carry this tensor: it holds finite values beyond +-{_FLOAT16_MAX:g} "
                f"(largest |x| = {float(t.abs().nan_to_num(0.0, 0.0, 0.0).max()):g}); "
                "use bfloat16 or delta8"
            )
        return [t.to(_CAST[codec])]
    d, _ = _delta(t, reference)
    if d.shape[-1] == 0:
        return [
            torch.zeros(d.shape, dtype=torch.int8, device=d.device),
            torch.zeros(d.shape[:-1], dtype=torch.float32, device=d.device),
        ]
    scale = d.abs().amax(dim=-1) / _Q_MAX
    finite = torch.isfinite(scale)
    scale = torch.where(finite, scale, torch.full_like(scale, math.nan))
    usable = finite & (scale > 0)
    divisor = torch.where(usable, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.round(d / divisor).clamp_(-_Q_MAX, _Q_MAX)
    q = torch.where(usable.unsqueeze(-1), q, torch.zeros_like(q))
    return [q.to(torch.int8), scale]


def decode(
    parts: Sequence[torch.Tensor], codec: str, reference: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The tensor ``parts`` carry, in ``dtype`` (default: the parts' own dtype; for ``delta8`` the
    reference's dtype, float32 without a reference). ``delta8``'s ``reference`` must be the tensor
    the encoder used; the result is computed on its device (the receiver already holds it there)."""
    check_codec(codec)
    parts = list(parts)
    want = 2 if codec == "delta8" else 1
    if len(parts) != want:
        raise ValueError(f"codec {codec!r} decodes {want} part(s); got {len(parts)}")
    if codec != "delta8":
        (p,) = parts
        if codec in _CAST and p.dtype != _CAST[codec]:
            raise ValueError(f"codec {codec!r}: expected a {_CAST[codec]} part, got {p.dtype}")
        return p if dtype is None or p.dtype == dtype else p.to(dtype)
    q, scale = parts
    if q.dtype != torch.int8 or scale.dtype != torch.float32 or tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(
            f"delta8 parts must be int8 q and float32 scale shaped q.shape[:-1]; got {q.dtype} "
            f"{tuple(q.shape)} and {scale.dtype} {tuple(scale.shape)}"
        )
    device = reference.device if reference is not None else q.device
    d = q.to(device=device, dtype=torch.float32) * scale.to(device).unsqueeze(-1)
    if reference is not None:
        d = _repeated(reference, _copies(q, reference), device) + d
    out_dtype = dtype or (reference.dtype if reference is not None else torch.float32)
    if out_dtype in (torch.float16, torch.bfloat16):  # a reconstruction past the format's largest finite
        big = torch.finfo(out_dtype).max  # value would round to inf; the value sent was within it
        d = torch.where(torch.isfinite(d), d.clamp(-big, big), d)
    return d.to(out_dtype)


def encoded_nbytes(parts: Sequence[torch.Tensor]) -> int:
    """Bytes of the parts' data (what the wire carries besides its fixed per-tensor header)."""
    return sum(p.numel() * p.element_size() for p in parts)


def _exact_in(out: torch.dtype, src: torch.dtype) -> bool:
    """Whether every ``src`` value is a ``out`` value (a cast from ``src`` to ``out`` loses nothing)."""
    return out == src or out == torch.float64 or (out == torch.float32 and src in _UNIT_ROUNDOFF)


def _rounding(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """Bound on ``|fl(x) - x|`` when ``x`` is rounded to nearest in ``dtype`` (finite, in range)."""
    return _UNIT_ROUNDOFF[dtype] * x.abs() + _TINY[dtype]


def error_bound(
    codec: str, t: torch.Tensor, reference: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per element of ``t``, a bound on ``|decode(encode(t, codec, reference), codec, reference, dtype) - t|``
    (float32, ``t``'s shape; ``t`` a floating-point tensor; ``dtype`` defaults as :func:`decode`'s).

    * native: 0 (plus ``dtype``'s rounding when decoding to a narrower one).
    * float32 / bfloat16 / float16: 0 when the format holds every value of ``t``'s dtype (float32
      of a float32, bfloat16 or float16 tensor), else ``u |t|`` (u = 2^-24, 2^-8, 2^-11: round to
      nearest) plus half the format's smallest subnormal step; plus ``dtype``'s own rounding when
      decoding to a format that does not hold every wire value.
    * delta8: ``scale / 2`` of the element's row (``scale = max|t - reference|`` over the row
      ``/ 127``), plus float32 rounding of the subtraction and the reconstruction
      (``2^-22 (|t| + |reference| + 128 scale)``), plus ``dtype``'s rounding when narrower than float32.
    """
    check_codec(codec)
    t32 = t.detach().float()
    if codec == "native":
        out = dtype or t.dtype
        return torch.zeros_like(t32) if _exact_in(out, t.dtype) else _rounding(out, t32)
    if codec in _CAST:
        wire = _CAST[codec]
        bound = torch.zeros_like(t32) if _exact_in(wire, t.dtype) else _rounding(wire, t32)
        out = dtype or wire
        return bound if _exact_in(out, wire) else bound + _rounding(out, t32.abs() + bound)
    _, r = _delta(t, reference)
    scale = encode(t, "delta8", reference)[1].unsqueeze(-1)
    bound = scale / 2 + 2.0**-22 * (t32.abs() + (r.abs() if r is not None else 0.0) + 128 * scale)
    out = dtype or (reference.dtype if reference is not None else torch.float32)
    return bound if _exact_in(out, torch.float32) else bound + _rounding(out, t32.abs() + bound)


def max_abs_error(
    codec: str, t: torch.Tensor, reference: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> float:
    """The largest of :func:`error_bound` over ``t`` (0 for an empty tensor)."""
    b = error_bound(codec, t, reference, dtype)
    return float(b.max()) if b.numel() else 0.0
