"""Launch settings shared by the kernels."""

import contextlib

import torch
import triton

# Correct rounding of every float op depends on this: without it Triton contracts a*b+c into FMA.
# The ahead-of-time PTX test compiles with the same dict.
COMPILE_OPTIONS = {"enable_fp_fusion": False, "num_warps": 4}

# Read once, as Triton itself does when the kernel modules are imported.
INTERPRET = bool(triton.knobs.runtime.interpret)


def default_block_counters() -> int:
    """Philox counters per program (4 elements each).

    256 on a GPU (1024 elements, 8 per thread at 4 warps). The interpreter pays ~18 ms per
    program whatever its size, so it gets 1024 (4096 elements).
    """
    return 1024 if INTERPRET else 256


def on_device(device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
