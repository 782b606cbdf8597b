"""hosl: Hybrid-Order Split Learning.

A model cut in two: the client (embeddings + first blocks) trains with zeroth-order estimates from
seeded directions, the server (the rest) with first-order backprop and any torch optimizer.
"""

from hosl import _source_tree

_source_tree.install()  # hosl.kernels from a source checkout; see hosl/_source_tree.py

from hosl import ops  # noqa: E402
from hosl.optim import HybridOrderOptimizer, ZerothOrderOptimizer, ZOConfig, per_copy_mean  # noqa: E402

__version__ = "0.1.0"


def split(model, cut: int):
    """Cut a Hugging Face model after block ``cut``: returns ``(client, server)``. See hosl.models."""
    from hosl.models import split as _split

    return _split(model, cut=cut)


def merge(client, server, *, fold_lora: bool = True):
    """The two halves of a split back as one Hugging Face model (``save_pretrained``-able). See hosl.export."""
    from hosl.export import merge as _merge

    return _merge(client, server, fold_lora=fold_lora)


def load_run(run, *, merged: bool = False, fold_lora: bool = True):
    """A trained run folder's model at its newest checkpoint: a ``LoadedRun`` with ``client`` and
    ``server`` (and ``merged``, one Hugging Face model, with ``merged=True``). See hosl.run_loading."""
    from hosl.run_loading import load_run as _load_run

    return _load_run(run, merged=merged, fold_lora=fold_lora)


__all__ = [
    "HybridOrderOptimizer",
    "ZOConfig",
    "ZerothOrderOptimizer",
    "ops",
    "per_copy_mean",
    "split",
    "merge",
    "load_run",
    "__version__",
]
