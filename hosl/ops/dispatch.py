"""Which backend runs an op: loading backend modules and picking the fastest for a device."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

# fastest first; "reference" is always last. Triton on CPU (its interpreter) is for tests only and
# so is never picked automatically.
_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

_modules: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}
_warned_once: set[str] = set()


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            module = importlib.import_module(f"hosl.ops.backends.{name}")
            if module.is_available():
                _modules[name] = module
            else:
                _modules[name] = None
                _load_errors[name] = module.unavailable_reason()
        except Exception as exc:  # an unbuilt extension, a missing triton, ...
            _modules[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
    return _modules[name]


def available_backends() -> list[str]:
    """The backends that can run here, in the order of ``BACKENDS``."""
    return [name for name in BACKENDS if _load(name) is not None]


def unavailable_reasons() -> dict[str, str]:
    available_backends()
    return dict(_load_errors)


def backend_for(device: torch.device, name: str | None) -> ModuleType:
    """The backend module to run on ``device``: ``name`` if given, else the fastest available."""
    device_type = torch.device(device).type
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {name!r}")
        module = _load(name)
        if module is None:
            raise RuntimeError(f"backend {name!r} is not available: {_load_errors.get(name, '')}")
        if device_type not in module.DEVICE_TYPES:
            raise ValueError(
                f"backend {name!r} runs on {list(module.DEVICE_TYPES)} tensors, not on {device_type!r}"
            )
        return module
    for candidate in _PREFERENCE.get(device_type, ("reference",)):
        module = _load(candidate)
        if module is not None and device_type in module.DEVICE_TYPES:
            if candidate == "reference" and device_type not in _warned_once:
                _warned_once.add(device_type)
                warnings.warn(
                    f"hosl: no compiled kernels for {device_type} tensors "
                    f"({'; '.join(f'{k}: {v}' for k, v in _load_errors.items())}); "
                    "using the slow pure-PyTorch reference",
                    stacklevel=3,
                )
            return module
    raise RuntimeError(f"no hosl backend runs on {device_type!r} tensors")


def report_missing_cuda_kernels() -> None:
    """Say once, at import, when a GPU is present but hosl's CUDA kernels were not built."""
    if torch.cuda.is_available() and _load("cuda") is None:
        fallback = "Triton kernels" if _load("triton") is not None else "the slow pure-PyTorch reference"
        warnings.warn(
            f"hosl: CUDA kernels are not built ({_load_errors.get('cuda', '')}); CUDA tensors use {fallback}. "
            "Rebuild with a CUDA torch and the CUDA toolkit: pip install --no-build-isolation -e .",
            stacklevel=2,
        )

# Rows per direction up to which the fused Triton perturbed linear is used on CUDA: its row tile
# (kernels/perturbed_linear.py block_sizes, BM=64). The kernel regenerates each weight tile's
# perturbation for every BM rows, so its RNG work is ceil(rows/BM) x out x in per direction; with
# one row tile that is once per weight, like materialising it. A heuristic pending a GPU
# measurement at small row counts: at 2048 rows the fused kernel measured 27-139x F.linear on an
# H200, materialising through the cuda backend 1.1-1.3x (fp32) (scripts/gpu_check.sh, linear stage).
FUSED_LINEAR_MAX_ROWS = 64


def perturbed_linear_backend(rows: int, device, asked: str | None, available=None) -> str | None:
    """The backend for one perturbed linear of ``rows`` input rows per direction, when a caller
    would ask for ``asked``: on CUDA, ``"triton"`` (the fused kernel) only for up to
    :data:`FUSED_LINEAR_MAX_ROWS` rows, else ``"cuda"`` (materialise ``W + s*z``, then cuBLAS) where
    that backend is ``available`` (default: :func:`available_backends`). Anything else: ``asked``."""
    if asked != "triton" or torch.device(device).type != "cuda" or rows <= FUSED_LINEAR_MAX_ROWS:
        return asked
    available = available_backends() if available is None else available
    return "cuda" if "cuda" in available else asked

