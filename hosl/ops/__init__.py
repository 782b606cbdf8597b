"""The ops surface the rest of hosl calls: seeded directions, perturbation and the ZO update.

Each op is declared once with ``torch.library`` and runs on the backend picked for the tensors'
device (``backend=None``: the fastest available) or the one named: ``"reference"`` (pure PyTorch,
the spec), ``"cpu"`` (C++/OpenMP), ``"cuda"`` (CUDA kernels), ``"triton"``.
"""

from hosl.ops.api import perturb_, randn, zo_update_
from hosl.ops.dispatch import BACKENDS, available_backends, unavailable_reasons

__all__ = ["BACKENDS", "available_backends", "perturb_", "randn", "unavailable_reasons", "zo_update_"]
