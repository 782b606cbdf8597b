"""Directions: the seeded vectors ``z(seed)`` the client perturbs and updates along.

:mod:`hosl.directions.spec` is the executable spec every backend matches bit for bit;
:mod:`hosl.directions.families` registers the direction families built on it.
"""

from hosl.directions.families import FAMILIES, FAMILY_CODES, DirectionFamily, direction_reference
from hosl.directions.spec import SEED_LIMIT, randn_reference, split_seed

__all__ = [
    "FAMILIES",
    "FAMILY_CODES",
    "SEED_LIMIT",
    "DirectionFamily",
    "direction_reference",
    "randn_reference",
    "split_seed",
]
