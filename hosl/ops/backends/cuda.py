"""The CUDA backend: ``hosl._C_cuda`` (csrc/cuda/), one kernel launch per dtype, bit-identical to the spec."""

from __future__ import annotations

import torch

from hosl.ops.backends._compiled import CompiledBackend, import_extension

DEVICE_TYPES = ("cuda",)

_C_cuda, _IMPORT_ERROR = import_extension(
    "hosl._C_cuda",
    "it is built by `pip install --no-build-isolation -e .` when torch has CUDA and a CUDA toolkit is found "
    "(CUDA_HOME)",
)


def is_available() -> bool:
    return _C_cuda is not None and torch.cuda.is_available()


def unavailable_reason() -> str:
    if _C_cuda is None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return ""


randn, perturb, zo_update, sq_norms, perturbed_linear, perturbed_embedding = CompiledBackend(_C_cuda).functions()
