"""Process-wide lifetime: engines still open at interpreter exit, and engines in a fork child.

At exit every unclosed engine drains (queues are short), for at most
``EXIT_DRAIN_SECONDS`` in all. An engine that has not drained by then has its queued tasks
cancelled (their callbacks get "session closed") and gets ``EXIT_GRACE_SECONDS`` more; tasks
still running after that are abandoned (their callbacks get "task abandoned"), and the
callback thread gets ``EXIT_GRACE_SECONDS`` more to deliver. Exit is therefore held for at
most ``EXIT_DRAIN_SECONDS + 2 * EXIT_GRACE_SECONDS`` per stuck session. Whatever happens is
said out loud with an :class:`~ezrt.errors.EzrtWarning`, including how many ``run_async``
callbacks were not delivered because a callback never returned.

Everything is delivered before the interpreter flushes ``sys.stdout`` (atexit handlers run
first), so output printed by the last callbacks is not lost either.

In a fork child the engine threads do not exist, so engines inherited from the parent are
marked unusable.
"""

from __future__ import annotations

import atexit
import os
import time
import warnings
import weakref
from typing import Any, Optional, Protocol

from ..errors import EzrtWarning

__all__ = ["EXIT_DRAIN_SECONDS", "EXIT_GRACE_SECONDS", "register"]

#: At interpreter exit, how long unclosed sessions may drain (all together).
EXIT_DRAIN_SECONDS = 5.0
#: After that, how long a stuck session gets after its queued tasks are cancelled, and again
#: after its running tasks are abandoned.
EXIT_GRACE_SECONDS = 1.0


class _Closable(Protocol):
    forked: bool

    def close(
        self, *, cancel: bool = False, wait: bool = True, timeout: Optional[float] = None
    ) -> bool: ...

    def abandon(self) -> None: ...

    def undelivered(self) -> int: ...


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
        if not engine.close(wait=True, timeout=max(0.0, deadline - time.monotonic())):
            _finish_stuck(engine)


def _finish_stuck(engine: _Closable) -> None:
    if engine.close(cancel=True, wait=True, timeout=EXIT_GRACE_SECONDS):
        _say(
            f"a session did not drain at exit within {EXIT_DRAIN_SECONDS:g} s; its queued "
            "tasks were cancelled (their callbacks got 'session closed')"
        )
        return
    engine.abandon()
    engine.close(wait=True, timeout=EXIT_GRACE_SECONDS)
    lost = engine.undelivered()
    message = (
        "a session did not drain at exit; its queued tasks were cancelled and the tasks still "
        "running were abandoned (reported as failed)"
    )
    if lost:
        message += (
            f"; {lost} run_async callback{'s' if lost != 1 else ''} did not complete: a "
            "callback never returned, and those queued behind it were never delivered"
        )
    _say(message)


def _say(message: str) -> None:
    warnings.warn(f"ezrt: {message}", EzrtWarning, stacklevel=1)


def _poison_after_fork() -> None:
    for engine in list(_live):
        engine.forked = True


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_poison_after_fork)
