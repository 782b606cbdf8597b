"""Which training examples each client of a fleet sees (``--shard``).

* ``iid``: a seeded permutation of the examples dealt out round-robin: client ``r`` of ``N`` gets
  positions ``r-1, r-1+N, ...`` (sizes differ by at most one; every example goes to one client);
* ``dirichlet:ALPHA``: label skew, as federated-learning benchmarks draw it: for each class, the
  shares of the N clients are drawn from Dirichlet(ALPHA, ..., ALPHA) and that class's examples
  (in a seeded order) are cut in those proportions. Small ALPHA (0.1): most clients see mostly
  one class; large ALPHA (100): close to iid. A client that would get no example gets one from the
  largest shard (a client cannot train on nothing);
* ``by-file``: no split: each client is started with its own ``--train-file``.

Every client computes the same partition from the same seed and examples, so the shards are
disjoint without any coordination.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet:ALPHA", "by-file")


def parse_shard(text: str) -> tuple[str, float | None]:
    """``(scheme, alpha)``; a clear ValueError naming ``--shard`` otherwise."""
    if text in ("iid", "by-file"):
        return text, None
    if isinstance(text, str) and text.startswith("dirichlet:"):
        try:
            alpha = float(text.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not (alpha > 0 and np.isfinite(alpha)):
            raise ValueError(f"--shard dirichlet:ALPHA needs a positive finite ALPHA, got {text!r}")
        return "dirichlet", alpha
    raise ValueError(f"--shard must be one of {', '.join(SCHEMES)}, got {text!r}")


def shard_indices(labels: list[int] | None, rank: int, clients: int, scheme: str, seed: int) -> list[int]:
    """The indices (into the examples, ``len(labels)`` of them) client ``rank`` (1..clients) trains on."""
    if not 1 <= rank <= clients:
        raise ValueError(f"--rank must be in 1..{clients} (--clients {clients}), got {rank}")
    kind, alpha = parse_shard(scheme)
    n = len(labels or [])
    if kind == "by-file" or clients == 1:
        return list(range(n))
    rng = np.random.default_rng([seed, 7919])
    if kind == "iid":
        return sorted(rng.permutation(n)[rank - 1 :: clients].tolist())
    if labels is None:
        raise ValueError("--shard dirichlet splits by label; this task has no labels (use iid or by-file)")
    assert alpha is not None  # parse_shard gives dirichlet its alpha
    shards: list[list[int]] = [[] for _ in range(clients)]
    labels_arr = np.asarray(labels)
    for c in np.unique(labels_arr):
        members = rng.permutation(np.flatnonzero(labels_arr == c))
        shares = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for i, part in enumerate(np.split(members, cuts)):
            shards[i].extend(part.tolist())
    for i in range(clients):  # nobody trains on nothing: take one example from the largest shard
        if not shards[i]:
            biggest = max(range(clients), key=lambda j: len(shards[j]))
            shards[i].append(shards[biggest].pop())
    return sorted(shards[rank - 1])
