"""The ops surface the rest of hosl calls: seeded directions, perturbation, perturbed forwards
(``perturbed_linear``, ``perturbed_embedding``: fused in Triton, materialised elsewhere) and the ZO update.

Each op is declared once with ``torch.library`` and runs on the backend picked for the tensors'
device (``backend=None``: the fastest available) or the one named: ``"reference"`` (pure PyTorch,
the spec), ``"cpu"`` (C++/OpenMP), ``"cuda"`` (CUDA kernels), ``"triton"``.
"""

from hosl.ops.api import perturb_, perturbed_embedding, perturbed_linear, randn, sphere_scales, zo_update_
from hosl.ops.dispatch import (
    BACKENDS,
    available_backends,
    fused_kernels_reason,
    perturbed_linear_backend,
    report_missing_cuda_kernels,
    unavailable_reasons,
)

report_missing_cuda_kernels()

__all__ = ["BACKENDS", "available_backends", "fused_kernels_reason", "perturb_", "perturbed_embedding", "perturbed_linear", "perturbed_linear_backend", "randn",
           "sphere_scales", "unavailable_reasons", "zo_update_"]
