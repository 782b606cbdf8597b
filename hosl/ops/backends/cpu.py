"""The C++ CPU backend: ``hosl._C`` (csrc/cpu/), OpenMP over SIMD loops, bit-identical to the spec.

Threads: the kernels use as many OpenMP threads as ``torch.get_num_threads()``. The SIMD variant
(AVX-512 / AVX2 / scalar) is picked when ``hosl._C`` loads; ``isa()`` names it, and the environment
variable ``HOSL_CPU_ISA`` can lower it.
"""

from __future__ import annotations

from hosl.ops.backends._compiled import CompiledBackend, import_extension

DEVICE_TYPES = ("cpu",)

_C, _IMPORT_ERROR = import_extension("hosl._C", "build it with `pip install --no-build-isolation -e .`")


def is_available() -> bool:
    return _C is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR


def isa() -> str:
    """The SIMD variant in use: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    return _C.isa()


_backend = CompiledBackend(_C)
randn = _backend.randn
perturb = _backend.perturb
zo_update = _backend.zo_update
sq_norms = _backend.sq_norms
perturbed_linear = _backend.perturbed_linear
perturbed_embedding = _backend.perturbed_embedding
