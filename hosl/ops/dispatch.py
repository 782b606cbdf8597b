"""Which backend runs an op: loading backend modules, picking the fastest for a device type, and the
test/benchmark override :func:`use_backend`.

The ops of :mod:`hosl.ops.library` ask :func:`backend_for` from the kernel torch dispatched to for
the tensors' device type; which backend was asked for is never an op argument.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import warnings
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

# fastest first; "reference" is always last, and the only choice for any other device type. Triton
# on CPU (its interpreter) is for tests only and so is never picked automatically.
_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# The backend named by the innermost use_backend(); None: the fastest available. torch's dispatcher
# cannot express this choice: it picks one kernel per dispatch key, and its keys name device types
# (CPU, CUDA), while the backends here are several implementations for ONE device type (C++, Triton
# or the reference on cuda; C++ or the reference on cpu). Registering another kernel would change
# it for the whole process, not for one thread or asyncio task, so the choice is made inside the
# device type's kernel (hosl.ops.library), from this context variable.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("hosl_backend", default=None)

_modules: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}
_warned_once: set[str] = set()


def _build_config():
    """``hosl/_build_config.py``, written by setup.py (None for a tree built before it was written)."""
    try:
        return importlib.import_module("hosl._build_config")
    except ImportError:
        return None


def arch_runs_on(capability: tuple[int, int], archs) -> bool:
    """Whether code built for ``archs`` (``TORCH_CUDA_ARCH_LIST`` entries: ``"8.0"``, ``"9.0a"``,
    ``"9.0+PTX"``) runs on a GPU of compute ``capability``: SASS for X.Y runs on X.Z with Z >= Y
    (arch-specific ``X.Ya`` on X.Y only), PTX for X.Y is JIT-compiled on any X.Y or newer."""
    major, minor = capability
    for entry in archs:
        ptx = entry.endswith("+PTX")
        base = entry[:-4] if ptx else entry
        suffix = base[-1] if base[-1] in "af" else ""
        a_major, a_minor = (int(p) for p in base.rstrip("af").split("."))
        if suffix == "a":
            if (major, minor) == (a_major, a_minor):
                return True
            continue
        if major == a_major and minor >= a_minor:
            return True
        if ptx and (major, minor) >= (a_major, a_minor):
            return True
    return False


def _cuda_arch_mismatch() -> str:
    """Why the built CUDA kernels cannot run on the current GPU ("" when they can, or when the arch
    list was not recorded)."""
    archs = getattr(_build_config(), "CUDA_ARCHS", None)
    if not archs:
        return ""
    capability = tuple(torch.cuda.get_device_capability())
    if arch_runs_on(capability, archs):  # type: ignore[arg-type]  # (major, minor)
        return ""
    cc = f"{capability[0]}.{capability[1]}"
    return (
        f"hosl._C_cuda was built for {';'.join(archs)}, which cannot run on this GPU (compute capability "
        f"{cc}); rebuild with TORCH_CUDA_ARCH_LIST={cc} pip install --no-build-isolation -e ."
    )


def _load(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            module = importlib.import_module(f"hosl.ops.backends.{name}")
            if module.is_available():
                _modules[name] = module
                mismatch = _cuda_arch_mismatch() if name == "cuda" else ""
                if mismatch:
                    _modules[name] = None
                    _load_errors[name] = mismatch
            else:
                _modules[name] = None
                _load_errors[name] = module.unavailable_reason()
        except Exception as exc:  # an unbuilt extension, a missing triton, ...
            _modules[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
        if _modules[name] is None and name in ("cpu", "cuda") and getattr(_build_config(), "BUILD_EXT", True) is False:
            _load_errors[name] = (
                "hosl was installed with HOSL_BUILD_EXT=0, so no compiled kernels: "
                "the reference and Triton backends only"
            )
    return _modules[name]


def available_backends() -> list[str]:
    """The backends that can run here, in the order of ``BACKENDS``."""
    return [name for name in BACKENDS if _load(name) is not None]


def unavailable_reasons() -> dict[str, str]:
    """For each backend that cannot run here, why (what `hosl info` prints)."""
    available_backends()
    return dict(_load_errors)


def _named(name: str) -> ModuleType:
    """Backend ``name``'s module: ValueError for an unknown name, RuntimeError when it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {name!r}")
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not available: {_load_errors.get(name, '')}")
    return module


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the hosl ops called inside on backend ``name`` instead of the fastest available: for tests
    and benchmarks (the public ops' ``backend=`` keyword is this). ``None`` changes nothing.

    Raises at entry for an unknown (ValueError) or unavailable (RuntimeError) backend, and at an
    op's call when the backend does not run on its tensors' device type (ValueError). The choice is
    a context variable: per thread and per asyncio task.
    """
    if name is None:
        yield
        return
    _named(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def backend_for(device_type: str) -> ModuleType:
    """The backend module to run on ``device_type`` tensors: the one :func:`use_backend` named, else
    the fastest available (with a warning, once per device type, when that is the slow reference)."""
    name = _override.get()
    if name is not None:
        module = _named(name)
        if device_type not in module.DEVICE_TYPES:
            raise ValueError(f"backend {name!r} runs on {list(module.DEVICE_TYPES)} tensors, not on {device_type!r}")
        return module
    for candidate in _PREFERENCE.get(device_type, ("reference",)):
        module = _load(candidate)  # type: ignore[assignment]  # None: not built here
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
    """Say once, at import, when a GPU is present but hosl's CUDA kernels cannot run on it (not
    built, or built for other archs)."""
    if torch.cuda.is_available() and _load("cuda") is None:
        fallback = "Triton kernels" if _load("triton") is not None else "the slow pure-PyTorch reference"
        warnings.warn(
            f"hosl: CUDA kernels unavailable ({_load_errors.get('cuda', '')}); CUDA tensors use {fallback}. "
            "Build them with a CUDA torch and the CUDA toolkit: pip install --no-build-isolation -e .",
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


def fused_kernels_reason(device_type: str, asked: str | None = None) -> str:
    """Why the fused Triton kernels would not run natively on ``device_type`` tensors when a caller
    asks for backend ``asked`` ("" when they would): off CUDA, another backend asked for, Triton not
    importable, or Triton running interpreted (``TRITON_INTERPRET=1``, for tests)."""
    if device_type != "cuda":
        return f"parameters on {device_type!r}, fused kernels are for CUDA (the interpreter is for tests)"
    if asked not in (None, "triton"):
        return f"backend={asked!r} was asked for"
    module = _load("triton")
    if module is None:
        return f"Triton unavailable: {_load_errors.get('triton', '')}"
    if "cuda" not in module.DEVICE_TYPES:
        return "Triton runs interpreted (TRITON_INTERPRET=1)"
    return ""
