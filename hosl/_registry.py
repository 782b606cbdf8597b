"""``Registry``: the one list of an extension point's entries (direction families, ZO update rules,
model architectures), by name, in registration order.

Everything that enumerates an extension point reads its registry when it runs (argparse choices,
help texts, config checks, dispatch, test parametrisation), never a copy taken at import time, so
an entry registered later (a plug-in, a test's dummy) is seen everywhere. Iterating a registry
gives the names, ``in`` tests a name, so a registry serves directly as argparse ``choices``.

The entries themselves are frozen dataclasses defined next to their concept
(:mod:`hosl.directions.families`, :mod:`hosl.optim.rules`, :mod:`hosl.models.architectures`);
this module knows nothing of them beyond their ``name``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class _Named(Protocol):
    """What a registry needs of an entry (for the type checker)."""

    @property
    def name(self) -> str: ...


class _Helped(_Named, Protocol):
    @property
    def help(self) -> str: ...


T = TypeVar("T", bound=_Named)
H = TypeVar("H", bound=_Helped)


class Registry(Generic[T]):
    """Entries of one kind (``kind`` names it in errors), keyed by their ``name`` attribute.

    ``unique``: further attributes no two entries may share (a direction family's ``code``).
    """

    def __init__(self, kind: str, *, unique: tuple[str, ...] = ()):
        self.kind = kind
        self._unique = unique
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        name = entry.name
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        for attr in self._unique:
            if getattr(entry, attr) is None:  # None: the entry has no such value (a shaped family's code)
                continue
            clash = [e.name for e in self._entries.values() if getattr(e, attr) == getattr(entry, attr)]
            if clash:
                raise ValueError(f"{self.kind} {name!r}: {attr}={getattr(entry, attr)!r} is {clash[0]!r}'s")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        return self._entries.pop(name)

    @contextlib.contextmanager
    def registered(self, entry: T) -> Iterator[T]:
        """``entry`` registered for the length of a ``with`` block (tests, experiments)."""
        self.register(entry)
        try:
            yield entry
        finally:
            self.unregister(entry.name)

    def __getitem__(self, name: str) -> T:
        """The entry ``name``; ``ValueError`` naming the registered ones if there is none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"{self.kind} must be one of {tuple(self)}, got {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return repr(tuple(self._entries))

    def entries(self) -> tuple[T, ...]:
        return tuple(self._entries.values())

    def find(self, predicate: Callable[[T], bool]) -> T | None:
        """The first entry (registration order) for which ``predicate`` holds, or None."""
        return next((e for e in self._entries.values() if predicate(e)), None)

    def help(self: Registry[H]) -> str:
        """``name (help), name (help), ...``: the entries' ``help`` texts, for a flag's help."""
        return ", ".join(f"{e.name} ({e.help})" if e.help else e.name for e in self._entries.values())
