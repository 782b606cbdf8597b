"""Bounded waits that leave the main thread free for signals.

A blocking call into ``torch.distributed`` (opening a TCPStore, waiting on a key, joining a
process group) runs in C++ and holds the calling thread until it returns: a Python signal handler
(Ctrl-C) does not run in the meantime, and some of these calls ignore their own timeout (a TCPStore
client talking to a port held by another program waits for an answer forever). :func:`call_bounded`
runs such a call in a daemon helper thread and waits for it in short slices, so the caller gets its
answer, a timeout of its choosing, or a ``KeyboardInterrupt``, whichever comes first. A helper still
stuck in C++ when the process exits is abandoned with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL_S = 0.1


def call_bounded(
    fn: Callable[[], T],
    deadline: float,
    on_timeout: Callable[[], BaseException],
    stop_requested: Callable[[], bool] | None = None,
) -> T:
    """``fn()`` if it finishes before ``deadline`` (a ``time.monotonic()`` value); else raise
    ``on_timeout()``. ``stop_requested()`` turning true (a Ctrl-C noted by a signal handler)
    raises ``KeyboardInterrupt``. Exceptions of ``fn`` are re-raised here."""
    box: dict = {}
    done = threading.Event()

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="hosl-bounded-wait", daemon=True).start()
    while not done.wait(max(0.0, min(POLL_S, deadline - time.monotonic()))):
        if stop_requested is not None and stop_requested():
            raise KeyboardInterrupt
        if time.monotonic() >= deadline:
            raise on_timeout()
    if "error" in box:
        raise box["error"]
    return box["value"]
