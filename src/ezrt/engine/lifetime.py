"""Process-wide lifetime: engines still open at interpreter exit, and engines in a fork child.

At exit every unclosed engine drains (queues are short), then cancels what is left, then
gives up on tasks that never finish: every accepted task is delivered either way, run or
failed with :class:`SessionClosedError`. In a fork child the engine threads do not exist,
so engines inherited from the parent are marked unusable.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from typing import Any, Optional, Protocol

__all__ = ["EXIT_DRAIN_SECONDS", "register"]

logger = logging.getLogger("ezrt")

#: At interpreter exit, how long unclosed sessions may drain before the rest is cancelled.
EXIT_DRAIN_SECONDS = 5.0


class _Closable(Protocol):
    forked: bool

    def close(
        self, *, cancel: bool = False, wait: bool = True, timeout: Optional[float] = None
    ) -> bool: ...

    def abandon(self) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()


def register(engine: _Closable) -> None:
    """Track an engine until it is garbage collected."""
    _live.add(engine)


def _close_all_at_exit() -> None:
    engines = [engine for engine in list(_live) if not engine.forked]
    for engine in engines:
        engine.close(wait=False)  # stop admission everywhere first
    deadline = time.monotonic() + EXIT_DRAIN_SECONDS
    for engine in engines:
        if engine.close(wait=True, timeout=max(0.0, deadline - time.monotonic())):
            continue
        logger.warning("ezrt: a session did not drain at exit; cancelling its queued tasks")
        if not engine.close(cancel=True, wait=True, timeout=EXIT_DRAIN_SECONDS):
            logger.warning("ezrt: tasks still running at exit are abandoned (reported as failed)")
            engine.abandon()
            engine.close(wait=True, timeout=EXIT_DRAIN_SECONDS)


def _poison_after_fork() -> None:
    for engine in list(_live):
        engine.forked = True


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_poison_after_fork)
