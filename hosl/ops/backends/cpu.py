"""The C++ CPU backend: ``hosl._C`` (csrc/cpu/), OpenMP over SIMD loops, bit-identical to the spec.

Threads: the kernels use as many OpenMP threads as ``torch.get_num_threads()``. The SIMD variant
(AVX-512 / AVX2 / scalar) is picked when ``hosl._C`` loads; ``isa()`` names it, and the environment
variable ``HOSL_CPU_ISA`` can lower it.
"""

from __future__ import annotations

from typing import Any

from hosl.ops.backends._compiled import CompiledBackend, import_extension

DEVICE_TYPES = ("cpu",)

_C: Any
_C, _IMPORT_ERROR = import_extension("hosl._C", "build it with `pip install --no-build-isolation -e .`")


def is_available() -> bool:
    return _C is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR


ISAS = ("avx512", "avx2", "scalar")  # the SIMD variants of hosl._C, best first


def isa() -> str:
    """The SIMD variant in use: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    return _C.isa()


def supported_isas() -> list[str]:
    """The SIMD variants this CPU can run (best first); the one in use is left in place."""
    current = _C.isa()
    try:
        return [name for name in ISAS if _C.set_isa(name)]
    finally:
        _C.set_isa(current)


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name": /proc/cpuinfo on Linux), else what
    ``platform`` knows; needs no compiled extension."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


randn, perturb, zo_update, sq_norms, perturbed_linear, perturbed_embedding = CompiledBackend(_C).functions()
