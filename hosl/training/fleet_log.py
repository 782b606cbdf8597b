"""A fleet's update log: per step, each client's ZO update (its seeds and projected gradients).

A hosl client's whole update is its step's seeds and Q scalars, so this log (a few hundred bytes
a step) is enough to rebuild any client half from an earlier checkpoint of it: apply the logged
steps in order (``hosl/training/fleet_client.py``). The server appends one line per finished step
before it answers that step's ``end-step`` (flushed and fsync'd), so a step a client applied is
always on disk. Floats are written with ``repr`` (exact round trip), seeds as integers.

File: ``OUT/server/fleet_log.jsonl``, lines ``{"step": t, "updates": [[rank, [seeds], [grads]], ...]}``
in the order the clients apply them (rank order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

Update = tuple[int, list[int], list[float]]  # (rank, seeds, projected gradients)


class UpdateLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.steps: dict[int, list[Update]] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"{self.path} is not an update log: it is not UTF-8 text") from None
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                self.steps[int(record["step"])] = [
                    (int(r), [int(s) for s in seeds], [float(g) for g in grads])
                    for r, seeds, grads in record["updates"]
                ]
            except (ValueError, KeyError, TypeError):
                if n == len(lines):  # a torn last line (killed mid-write): that step never finished
                    break
                raise ValueError(f"{self.path}: line {n} is not an update-log record") from None

    @property
    def last_step(self) -> int:
        return max(self.steps, default=0)

    def append(self, step: int, updates: Sequence[Update]) -> None:
        if step != self.last_step + 1:
            raise ValueError(f"the update log holds steps up to {self.last_step}; cannot append step {step}")
        line = json.dumps({"step": step, "updates": [[r, list(s), list(g)] for r, s, g in updates]})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.steps[step] = list(updates)

    def truncate(self, step: int) -> None:
        """Forget the steps after ``step`` (a server resumed from its checkpoint at ``step``)."""
        if self.last_step <= step:
            return
        self.steps = {s: u for s, u in self.steps.items() if s <= step}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(
            "".join(
                json.dumps({"step": s, "updates": [[r, list(a), list(g)] for r, a, g in u]}) + "\n"
                for s, u in sorted(self.steps.items())
            )
        )
        os.replace(tmp, self.path)

    def between(self, start: int, to: int) -> list[list[Update]]:
        """The updates of steps ``start + 1 .. to``."""
        missing = [s for s in range(start + 1, to + 1) if s not in self.steps]
        if missing:
            raise ValueError(f"the update log lacks steps {missing[:5]}")
        return [self.steps[s] for s in range(start + 1, to + 1)]


def relayed(updates: Sequence[Update], rank: int, client_sync: str) -> list[Update]:
    """What ``rank`` applies of a step's ``updates``: all of them (``shared``) or its own (``local``)."""
    return list(updates) if client_sync == "shared" else [u for u in updates if u[0] == rank]
