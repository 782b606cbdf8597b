"""Build hosl's compiled parts.

* ``hosl._C``: the C++ CPU kernels. OpenMP over a vectorisable loop; the SIMD width (AVX-512 / AVX2
  / baseline) is the same template compiled under GCC ``target`` attributes and picked once at load
  time from the CPU (csrc/cpu/direction_cpu.cpp), never baked in with ``-march=native``.
* ``hosl._C_cuda``: the CUDA kernels, built only when the installed torch has CUDA and nvcc exists,
  for the archs of ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0+PTX"``); unset: the archs this torch was
  built for, else 8.0 and 9.0, with PTX of the newest (so newer GPUs JIT-compile it).

``HOSL_BUILD_EXT=0`` compiles nothing (no torch or compiler needed to install): hosl then runs the
reference and Triton backends only. ``HOSL_NO_CUDA=1`` builds ``hosl._C`` only.

What was built is written to ``hosl/_build_config.py`` (generated, not in git): whether the
extensions were built and the CUDA arch list, which ``hosl.ops.dispatch`` checks against the GPU's
compute capability before choosing the CUDA backend.

The element math is one header, ``csrc/hosl_direction.h``, shared by both; so is the torch-facing
argument conversion, ``csrc/bindings_common.h`` (both extensions expose the same Python signatures). Every float operation
must be correctly rounded and never contracted into a fused multiply-add: hence
``-ffp-contract=off`` for the host compiler and ``-fmad=false`` for nvcc.

torch must be installed before building the extensions (``pip install --no-build-isolation -e .``):
build isolation would otherwise fetch a multi-GB CUDA torch just to compile against.
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
BUILD_CONFIG = os.path.join(HERE, "hosl", "_build_config.py")

FALLBACK_CUDA_ARCHS = ("8.0", "9.0")  # when torch does not say what it was built for
# "9.0", "9.0a" (arch-specific), "10.0f" (family), each optionally "+PTX"
_ARCH = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


# the architecture names torch's own builder (torch.utils.cpp_extension) accepts, and the archs each
# stands for there
NAMED_ARCHS = {
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX",
}


def parse_arch_list(text: str) -> list[str]:
    """``TORCH_CUDA_ARCH_LIST`` (entries separated by ';', ',' or spaces) -> its entries, in order;
    a named arch (``Hopper``, ``Ampere``, ...) stands for the archs torch's builder gives it."""
    entries = []
    for entry in (e for e in re.split(r"[;,\s]+", text.strip()) if e):
        entries += NAMED_ARCHS[entry].split(";") if entry in NAMED_ARCHS else [entry]
    if not entries:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty: expected archs like '8.0;9.0+PTX'")
    for entry in entries:
        if not _ARCH.match(entry):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: {entry!r} is not an arch like 8.0, 9.0a or 9.0+PTX, nor "
                             f"a name torch's builder accepts ({', '.join(NAMED_ARCHS)})")
    return entries


def _arch_key(entry: str):
    major, minor, suffix, _ = _ARCH.match(entry).groups()
    return int(major), int(minor), suffix


def default_arch_list(torch_archs) -> list[str]:
    """The archs torch was built for (``sm_80``, ``sm_90a``, ... as ``torch.cuda.get_arch_list()``
    names them; ``compute_*`` entries are torch's PTX and add nothing here), else 8.0 and 9.0;
    the newest also as PTX."""
    archs = set()
    for name in torch_archs:
        m = re.match(r"^sm_(\d+)(\d)([af]?)$", name)
        if m:
            archs.add(f"{m.group(1)}.{m.group(2)}{m.group(3)}")
    ordered = sorted(archs or FALLBACK_CUDA_ARCHS, key=_arch_key)
    # PTX of an arch-specific ("a") target runs nowhere else: the newest portable arch gets the PTX
    portable = [a for a in ordered if _arch_key(a)[2] == ""] or ordered
    newest = portable[-1]
    return [a + "+PTX" if a == newest else a for a in ordered]


def cuda_arch_list(env_value: str | None, torch_archs) -> list[str]:
    """``TORCH_CUDA_ARCH_LIST`` when set, else :func:`default_arch_list`."""
    if env_value is not None and env_value.strip():
        return parse_arch_list(env_value)
    return default_arch_list(torch_archs)


def gencode_flags(archs) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for each arch, and PTX for the ``+PTX`` ones."""
    flags = []
    for entry in archs:
        major, minor, suffix, ptx = _ARCH.match(entry).groups()
        code = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    return flags


def _torch_arch_names(torch) -> list[str]:
    """What this torch was compiled for, without needing a GPU where torch offers that."""
    flags = getattr(torch._C, "_cuda_getArchFlags", None)
    if flags is not None:
        text = flags()
        if text:
            return text.split()
    return list(torch.cuda.get_arch_list())


def _sources(*patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join(CSRC, pattern)))
    return [os.path.relpath(p, HERE) for p in found]


def _import_torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # pragma: no cover - exercised only by a wrong install command
        sys.exit(
            "hosl: torch must be installed before building the extensions. Run\n"
            "    pip install torch==2.13.0            # the CPU build, or another torch in [2.13, 2.15)\n"
            "    pip install --no-build-isolation -e .\n"
            "or install without compiling anything (reference and Triton backends only):\n"
            "    HOSL_BUILD_EXT=0 pip install -e .\n"
        )
    return torch, cpp_extension


def _want_cuda(torch, cuda_home, env) -> tuple[bool, str]:
    if env.get("HOSL_NO_CUDA") == "1":
        return False, "HOSL_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch {torch.__version__}, CUDA_HOME={cuda_home}"


def extensions(env=os.environ) -> tuple[list, list[str] | None]:
    """The extension modules to build and the CUDA arch list (None when ``hosl._C_cuda`` is not built)."""
    if env.get("HOSL_BUILD_EXT", "1") == "0":
        print("hosl: HOSL_BUILD_EXT=0: building no extension (reference and Triton backends only)")
        return [], None
    torch, cpp_extension = _import_torch()
    # torch >= 2.14's headers require C++20 (#error otherwise); older ones build as C++17.
    torch_version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    cxx_std = "-std=c++20" if torch_version >= (2, 14) else "-std=c++17"
    host_flags = ["-O3", cxx_std, "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    exts = [
        cpp_extension.CppExtension(
            "hosl._C",
            _sources("cpu/*.cpp"),
            include_dirs=[CSRC],
            extra_compile_args={"cxx": host_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    want, why = _want_cuda(torch, cpp_extension.CUDA_HOME, env)
    if not want:
        print(f"hosl: not building the CUDA extension: {why}")
        return exts, None
    try:
        archs = cuda_arch_list(env.get("TORCH_CUDA_ARCH_LIST"), _torch_arch_names(torch))
    except ValueError as exc:
        sys.exit(f"hosl: {exc}")
    nvcc_flags = ["-O3", cxx_std, "-fmad=false", "--prec-div=true", "--prec-sqrt=true",
                  "-Xcompiler=-ffp-contract=off"] + gencode_flags(archs)
    include_dirs = [CSRC]
    # pip's CUDA torch ships some CUDA headers (e.g. cccl) under site-packages/nvidia/cu13
    try:
        import nvidia  # noqa: F401

        for root in getattr(nvidia, "__path__", []):
            include_dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
    except ImportError:
        pass
    exts.append(
        cpp_extension.CUDAExtension(
            "hosl._C_cuda",
            _sources("cuda/*.cu", "cuda/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": host_flags, "nvcc": nvcc_flags},
        )
    )
    print(f"hosl: building the CUDA extension for {';'.join(archs)} ({why})")
    return exts, archs


def build_config_source(built_ext: bool, cuda_archs: list[str] | None) -> str:
    return ("# Generated by setup.py when hosl was built: what was compiled. Not in git.\n"
            f"BUILD_EXT = {built_ext!r}  # False: installed with HOSL_BUILD_EXT=0\n"
            f"CUDA_ARCHS = {cuda_archs!r}  # TORCH_CUDA_ARCH_LIST entries of hosl._C_cuda; None: not built\n")


def main():
    exts, archs = extensions()
    with open(BUILD_CONFIG, "w") as f:
        f.write(build_config_source(bool(exts), archs))
    cmdclass = {}
    if exts:
        from torch.utils.cpp_extension import BuildExtension

        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    setup(
        # kernels/ (the Triton kernels) installs as hosl.kernels, never as a top-level `kernels`
        # package (a PyPI package of that name exists).
        packages=find_packages(include=["hosl", "hosl.*"]) + ["hosl.kernels"],
        package_dir={"hosl.kernels": "kernels"},
        ext_modules=exts,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # setuptools' build backend runs setup.py as __main__ too
    main()
