"""Directions: the seeded Gaussian vectors ``z(seed)`` the client perturbs and updates along.

:mod:`hosl.directions.spec` is the executable spec every backend matches bit for bit.
"""

from hosl.directions.spec import SEED_LIMIT, randn_reference, split_seed

__all__ = ["SEED_LIMIT", "randn_reference", "split_seed"]
