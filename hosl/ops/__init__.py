"""The ops surface the rest of hosl calls: seeded directions, perturbation, perturbed forwards
(``perturbed_linear``, ``perturbed_embedding``: fused in Triton, materialised elsewhere) and the ZO update.

Each op is declared once with ``torch.library`` (:mod:`hosl.ops.library`), with a kernel per device
type that runs the fastest backend available for it (:mod:`hosl.ops.dispatch`): ``"cpu"``
(C++/OpenMP) on CPU tensors, ``"cuda"`` (CUDA kernels) or ``"triton"`` on CUDA tensors, else
``"reference"`` (pure PyTorch, the spec). Tests and benchmarks name one with ``backend=`` or
``with use_backend(name):``.
"""

from hosl.ops.api import perturb_, perturbed_embedding, perturbed_linear, randn, sphere_scales, zo_update_
from hosl.ops.dispatch import (
    BACKENDS,
    available_backends,
    fused_kernels_reason,
    perturbed_linear_backend,
    report_missing_cuda_kernels,
    unavailable_reasons,
    use_backend,
)

report_missing_cuda_kernels()

__all__ = [
    "BACKENDS",
    "available_backends",
    "fused_kernels_reason",
    "perturb_",
    "perturbed_embedding",
    "perturbed_linear",
    "perturbed_linear_backend",
    "randn",
    "sphere_scales",
    "unavailable_reasons",
    "use_backend",
    "zo_update_",
]
