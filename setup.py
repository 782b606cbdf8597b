"""Build hosl's compiled parts.

* ``hosl._C``: the C++ CPU kernels (always built). OpenMP over a vectorisable loop; the SIMD width
  (AVX-512 / AVX2 / baseline) is chosen at run time with GCC ``target_clones``, never baked in with
  ``-march=native``.
* ``hosl._C_cuda``: the CUDA kernels, built only when the installed torch has CUDA and nvcc exists.

The element math is one header, ``csrc/hosl_direction.h``, shared by both. Every float operation
must be correctly rounded and never contracted into a fused multiply-add: hence
``-ffp-contract=off`` for the host compiler and ``-fmad=false`` for nvcc.

torch must be installed before building (``pip install --no-build-isolation -e .``): build
isolation would otherwise fetch a multi-GB CUDA torch just to compile against.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only by a wrong install command
    sys.exit(
        "hosl: torch must be installed before building. Run\n"
        "    pip install torch==2.13.0            # the CPU build, or another torch in [2.5, 2.15)\n"
        "    pip install --no-build-isolation -e .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")

# torch >= 2.14's headers require C++20 (#error otherwise); older ones build as C++17.
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
CXX_STD = "-std=c++20" if _TORCH_VERSION >= (2, 14) else "-std=c++17"

HOST_FLAGS = ["-O3", CXX_STD, "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
NVCC_FLAGS = [
    "-O3",
    CXX_STD,
    "-fmad=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "-Xcompiler=-ffp-contract=off",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
]


def _sources(*patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(CSRC, pattern)))
    return [os.path.relpath(p, HERE) for p in found]


def _want_cuda() -> tuple[bool, str]:
    if os.environ.get("HOSL_NO_CUDA") == "1":
        return False, "HOSL_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch {torch.__version__}, CUDA_HOME={CUDA_HOME}"


def extensions():
    exts = [
        CppExtension(
            "hosl._C",
            _sources("cpu/*.cpp"),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": HOST_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    want, why = _want_cuda()
    if want:
        include_dirs = [CSRC]
        # pip's CUDA torch ships some CUDA headers (e.g. cccl) under site-packages/nvidia/cu13
        try:
            import nvidia  # noqa: F401

            for root in getattr(nvidia, "__path__", []):
                include_dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
        except ImportError:
            pass
        exts.append(
            CUDAExtension(
                "hosl._C_cuda",
                _sources("cuda/*.cu", "cuda/*.cpp"),
                include_dirs=include_dirs,
                extra_compile_args={"cxx": HOST_FLAGS, "nvcc": NVCC_FLAGS},
            )
        )
        print(f"hosl: building the CUDA extension ({why})")
    else:
        print(f"hosl: not building the CUDA extension: {why}")
    return exts


setup(
    # kernels/ (the Triton kernels) installs as hosl.kernels, never as a top-level `kernels`
    # package (a PyPI package of that name exists).
    packages=find_packages(include=["hosl", "hosl.*"]) + ["hosl.kernels"],
    package_dir={"hosl.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
