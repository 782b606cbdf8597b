"""The CUDA kernels (hosl._C_cuda): PTX checks without a GPU, bit equality with the reference on one.

* ``test_ptx_*`` compile csrc/cuda/*.cu to PTX with nvcc (no GPU needed; skipped without nvcc) and
  check the float math: no fused multiply-add, correctly rounded division and sqrt.
* The other tests need a CUDA GPU and a build of ``hosl._C_cuda``; they compare the CUDA backend
  with the reference backend bit for bit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import requires_gpu

from hosl.directions import spec
from hosl.ops.backends import reference

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()


@pytest.fixture(scope="module", params=[80, 90], ids=lambda a: f"sm_{a}")
def ptx(request, tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out_dir = tmp_path_factory.mktemp(f"ptx{request.param}")
    texts = {}
    for cu in CU_FILES:
        out = out_dir / (cu.stem + ".ptx")
        subprocess.run(
            [NVCC, "-O3", "-std=c++17", "-fmad=false", "--prec-div=true", "--prec-sqrt=true",
             f"-I{ROOT / 'csrc'}", f"-arch=compute_{request.param}", "-ptx", str(cu), "-o", str(out)],
            check=True, capture_output=True, text=True,
        )
        texts[cu.name] = out.read_text()
    return texts


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/cuda/*.cu missing"


def test_ptx_has_no_fma(ptx):
    for name, text in ptx.items():
        assert not re.search(r"\bfma\.[a-z.]*f32\b", text), f"{name}: FMA in the PTX"


def test_ptx_div_and_sqrt_are_correctly_rounded(ptx):
    for name, text in ptx.items():
        assert re.search(r"\bdiv\.rn\.f32\b", text) and re.search(r"\bsqrt\.rn\.f32\b", text), name
        approx = re.findall(r"\b(?:div\.(?:approx|full)|sqrt\.approx|rcp\.approx|rsqrt|lg2|ex2)\S*", text)
        assert not approx, f"{name}: approximate instructions {sorted(set(approx))}"


# ------------------------------------------------------------------------------------------------
# On a GPU: bit equality with the reference
# ------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 3, 5, 1023, 4099, 100003]


def _cuda_backend():
    from hosl.ops.backends import cuda

    if not cuda.is_available():
        pytest.skip(f"CUDA backend unavailable: {cuda.unavailable_reason()}")
    return cuda


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def assert_same_bits(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = _bits(actual.cpu()), _bits(expected.cpu())
    assert torch.equal(a, e), f"{(a != e).sum().item()} of {a.numel()} elements differ"


def _offsets(tensors, base):
    out, pos = [], base
    for t in tensors:
        out.append(pos)
        pos += t.numel()
    return out


def _weights(sizes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g) * 0.05).to(dtype).to(device) for n in sizes]


def _f32(x):
    return float(torch.tensor(x, dtype=torch.float32))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", [0, 2**64 - 1, 12345])
@pytest.mark.parametrize("numel,offset", [(1, 0), (5, 2**32 + 3), (1023, 2**34 - 5), (100003, 2**40 + 1),
                                          (17, 2**64 - 17)])
def test_randn_matches_reference(seed, numel, offset):
    cuda = _cuda_backend()
    lo, hi = spec.split_seed(seed)
    assert_same_bits(cuda.randn(lo, hi, numel, offset, "cuda"), reference.randn(lo, hi, numel, offset, "cpu"))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_matches_reference(dtype):
    cuda = _cuda_backend()
    lo, hi = spec.split_seed(2**64 - 1)
    scale = _f32(-1e-3)
    tensors = _weights(SIZES, dtype, "cuda")
    offsets = _offsets(tensors, 2**33 + 1)
    expected = [torch.empty_like(t, device="cpu") for t in tensors]
    reference.perturb([t.cpu() for t in tensors], expected, offsets, lo, hi, scale)
    outs = [torch.empty_like(t) for t in tensors]
    before = [t.clone() for t in tensors]
    cuda.perturb(tensors, outs, offsets, lo, hi, scale)
    for o, e in zip(outs, expected):
        assert_same_bits(o, e)
    for t, b in zip(tensors, before):
        assert_same_bits(t, b)
    cuda.perturb(tensors, tensors, offsets, lo, hi, scale)
    for t, e in zip(tensors, expected):
        assert_same_bits(t, e)


@requires_gpu
@pytest.mark.gpu
def test_perturb_many_tensors_mixed_dtypes():
    cuda = _cuda_backend()
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 5000, (50,), generator=g).tolist()
    tensors = [(torch.randn(n, generator=g) * 0.1).to(DTYPES[j % 3]) for j, n in enumerate(sizes)]
    offsets = _offsets(tensors, 7)
    expected = [t.clone() for t in tensors]
    reference.perturb(expected, expected, offsets, 5, 6, _f32(0.3))
    on_gpu = [t.cuda() for t in tensors]
    cuda.perturb(on_gpu, on_gpu, offsets, 5, 6, _f32(0.3))
    for t, e in zip(on_gpu, expected):
        assert_same_bits(t, e)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_dirs,decay", [(1, 0.0), (10, 1e-4)])
def test_zo_update_matches_reference(dtype, num_dirs, decay):
    cuda = _cuda_backend()
    seeds = [0, 2**64 - 1, 3, 4, 5, 6, 7, 8, 9, 10][:num_dirs]
    keys = [spec.split_seed(s) for s in seeds]
    coeffs = [_f32(1e-3 * (q + 1) * (-1) ** q) for q in range(num_dirs)]
    tensors = _weights([1, 3, 5, 1023, 4099, 20011], dtype, "cpu", seed=num_dirs)
    offsets = _offsets(tensors, 2**32 + 3)
    expected = [t.clone() for t in tensors]
    reference.zo_update(expected, offsets, [k[0] for k in keys], [k[1] for k in keys], coeffs, _f32(decay))
    on_gpu = [t.cuda() for t in tensors]
    cuda.zo_update(on_gpu, offsets, [k[0] for k in keys], [k[1] for k in keys], coeffs, _f32(decay))
    for t, e in zip(on_gpu, expected):
        assert_same_bits(t, e)
