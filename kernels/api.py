"""The launchers of every Triton op, in one place: what the Triton backend calls.

``kernels/`` installs as ``hosl.kernels``, a namespace package (PEP 420): the folder has no
``__init__.py``, so from the repository root it is never a regular top-level package named
``kernels`` that would shadow Hugging Face's ``kernels`` (which transformers imports; README.md,
"Layout", says more).

One op per module, kernel and launcher side by side:

* :mod:`.direction`    device helpers: Philox4x32-10, uniforms, log, sin/cos, Box-Muller, loads and
                       round-to-nearest-even stores (the spec of ``hosl/directions/spec.py``);
* :mod:`.randn`        ``z(seed)`` for a range of coordinates, and the sphere family's norms;
* :mod:`.perturb`      ``out = w + scale * z(seed)`` for a list of tensors, in place or not;
* :mod:`.zo_update`    ``w = w - decay*w - sum_q coeffs[q] * z(seed_q)``, all directions in one pass;
* :mod:`.perturbed_linear`    ``y[d] = x[d] (W + s_d Z_d)^T + (b + s_d z_b)``, Z generated tile by tile,
                       ``D`` directions per launch (forward only; W never written);
* :mod:`.perturbed_embedding` gathered rows of ``W + s_d Z_d`` (perturbs only the rows looked up);
* :mod:`.multi_tensor` the int64 table that lets one launch cover all tensors of a dtype.

The launchers take the arguments of the backend contract (``hosl/ops/backends/__init__.py``),
already validated. Set ``TRITON_INTERPRET=1`` before importing these modules to run on CPU tensors.
"""

from hosl.kernels._config import COMPILE_OPTIONS, INTERPRET, default_block_counters
from hosl.kernels.perturb import perturb
from hosl.kernels.perturbed_embedding import perturbed_embedding
from hosl.kernels.perturbed_linear import FUSED_FAMILIES, perturbed_linear
from hosl.kernels.randn import randn, sq_norms
from hosl.kernels.zo_update import zo_update


def aot_specs():
    """(kernel, signature, constexprs) for every kernel: what the ahead-of-time PTX check compiles.

    Each kernel module lists its own next to the kernel (``aot()``), so a changed kernel signature
    and its entry are edited together; the multi-tensor kernels build theirs from the registered
    direction families (``hosl.directions.families``), read at each call.
    """
    import importlib

    names = ("randn", "perturb", "zo_update", "perturbed_linear", "perturbed_embedding")
    mods = [importlib.import_module(f"hosl.kernels.{name}") for name in names]
    return [spec for mod in mods for spec in mod.aot()]


__all__ = ["COMPILE_OPTIONS", "FUSED_FAMILIES", "INTERPRET", "aot_specs", "default_block_counters", "perturb", "perturbed_embedding",
           "perturbed_linear", "randn", "sq_norms", "zo_update"]
