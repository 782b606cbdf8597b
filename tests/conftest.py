"""Test-wide setup.

Without a GPU the Triton kernels run under the Triton interpreter. ``TRITON_INTERPRET`` is read
when a kernel module is imported, so it has to be set here, before any test imports hosl.
"""

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU; none is present")
