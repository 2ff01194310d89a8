"""Bounded admission: token pools that a submitter takes from and the pipeline gives back to.

Two pools bound what may be in flight. ``slots`` holds ``max_queue_size`` tokens: a task
takes one to be queued and gives it back when a worker starts it (or it is withdrawn).
``stage`` holds ``max_queue_size + workers + max_undelivered`` tokens: a delivered task
holds one from admission until its callback has returned, so with the queue full and every
worker busy at most ``max_undelivered`` finished results wait for the callback thread.

A blocked submitter sleeps in one C-level ``SimpleQueue.get`` and wakes as soon as a token
is given back, or at its deadline (DESIGN invariant 2: no polling, no spinning, the GIL
released while waiting). ``close()`` puts ``CLOSED`` in both pools; each waiter that takes
it passes it on and raises, so every waiter wakes at once.

Tokens are issued lazily: a pool of a million slots costs no more to build than one of
three, and only as many tokens ever exist as were once in use at the same time.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from typing import Callable, Optional, Set

from ..errors import PipelineFullError, ReentrancyError, SessionClosedError, SubmitTimeoutError
from .ledger import SharedLedger
from .task import Task

__all__ = ["CLOSED", "TOKEN", "Admission", "ThreadRoles", "TokenPool"]

TOKEN = True  # room for one task
CLOSED = object()  # the session closed; a waiter passes it on and raises


class ThreadRoles:
    """Which threads belong to the engine, for the waits that could depend on themselves.

    A worker thread must never wait for admission (it may be the worker that would free
    the room), and the callback thread must never wait for a stage token (only it frees
    those). Workers add and remove their own idents; the engine sets ``delivery``.
    """

    __slots__ = ("delivery", "workers")

    def __init__(self) -> None:
        self.workers: Set[int] = set()
        self.delivery: Optional[int] = None

    def on_worker(self) -> bool:
        """True when the calling thread is one of the engine's workers."""
        return threading.get_ident() in self.workers


class TokenPool:
    """A counting semaphore made of a ``SimpleQueue``: one wake-up per token given back."""

    __slots__ = ("_lock", "_queue", "_unissued", "give")

    def __init__(self, size: int) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._unissued = size  # tokens never handed out yet (guarded by _lock)
        self._lock = threading.Lock()
        #: Give one token back (a C call: safe on the hot path, wakes one waiter).
        self.give: Callable[[], None] = functools.partial(self._queue.put, TOKEN)

    def take_nowait(self) -> object:
        """A token, ``CLOSED``, or None when the pool is empty (never raises, never waits)."""
        tokens = self._queue
        if not tokens.empty():
            try:
                return tokens.get(False)
            except queue.Empty:  # another taker got the last one meanwhile
                pass
        if self._unissued:
            with self._lock:
                if self._unissued:
                    self._unissued -= 1
                    return TOKEN
        return None

    def available(self) -> bool:
        """A hint: a token could be taken now (another taker may still get it first)."""
        return not self._queue.empty() or self._unissued > 0

    def wait(self, timeout: float) -> object:
        """Wait up to ``timeout`` seconds for a token (or ``CLOSED``); None at the timeout.

        Only called once :meth:`take_nowait` found the pool empty: every token then lives
        in the queue or with a task, so a token given back always reaches a waiter.
        """
        try:
            return self._queue.get(True, timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Wake every waiter: each one that takes ``CLOSED`` passes it on."""
        with self._lock:
            self._unissued = 0
        self._queue.put(CLOSED)

    def pass_on_closed(self) -> None:
        self._queue.put(CLOSED)


class Admission:
    """Takes room for a task from the pools, or says why not."""

    def __init__(
        self,
        queue_size: int,
        stage_size: int,
        submit_timeout_s: float,
        roles: ThreadRoles,
        shared: SharedLedger,
        depths: Callable[[], str],
    ) -> None:
        self.slots = TokenPool(queue_size)
        self.stage = TokenPool(stage_size)
        self._submit_timeout_s = submit_timeout_s
        self._roles = roles
        self._shared = shared
        #: A description of the pipeline's depths, for error messages only.
        self._depths = depths

    def close(self) -> None:
        self.slots.close()
        self.stage.close()

    def take_now(self, delivered: bool) -> bool:
        """Both tokens a task needs (a stage token only when ``delivered``), if both can be
        had without waiting; else none is kept (``CLOSED`` is passed on) and False."""
        slot = self.slots.take_nowait()
        if slot is not TOKEN:
            if slot is CLOSED:
                self.slots.pass_on_closed()
            return False
        if not delivered:
            return True
        stage = self.stage.take_nowait()
        if stage is TOKEN:
            return True
        if stage is CLOSED:
            self.stage.pass_on_closed()
        self.slots.give()
        return False

    def take(
        self,
        pool: TokenPool,
        task: Task,
        what: str,
        wait: bool,
        timeout: Optional[float],
    ) -> bool:
        """Take a token from ``pool``: at once when there is one, else after a wait (GIL
        released). False when the task's own deadline passed first.

        Raises when closed, when waiting is not allowed or could deadlock, or at the
        timeout. The wait for both pools is one wait: its start is kept in
        ``task.submitted_at`` until the task is accepted.
        """
        token = pool.take_nowait()
        if token is None:
            token = self._wait(pool, task, what, wait, timeout)
            if token is None:
                return False
        if token is CLOSED:
            pool.pass_on_closed()
            raise SessionClosedError(f"{what} rejected: the session is closed")
        return True

    def _wait(
        self,
        pool: TokenPool,
        task: Task,
        what: str,
        wait: bool,
        timeout: Optional[float],
    ) -> object:
        if not wait:
            raise PipelineFullError(
                f"{what} rejected: async queue/callback pipeline is full ({self._depths()})"
            )
        ident = threading.get_ident()
        on_worker = ident in self._roles.workers
        if on_worker or (pool is self.stage and ident == self._roles.delivery):
            raise ReentrancyError(
                f"{what} called from an ezrt {'worker' if on_worker else 'callback'} "
                "thread while the pipeline is full: waiting would depend on this "
                "thread itself. Submit from another thread, or raise max_queue_size."
            )
        if not task.submitted_at:
            task.submitted_at = time.monotonic()
        since = task.submitted_at
        until = since + (self._submit_timeout_s if timeout is None else timeout)
        if task.expires_at is not None:
            until = min(until, task.expires_at)
        while True:
            token = pool.wait(max(0.0, until - time.monotonic()))
            if token is not None:
                return token
            now = time.monotonic()
            if now < until:  # a timed wait may return a hair early: wait the rest
                continue
            if task.expires_at is not None and now >= task.expires_at:
                return None
            self._shared.add_timed_out()
            raise SubmitTimeoutError(
                f"{what} submit timed out: async queue/callback pipeline is "
                f"saturated (waited {1000 * (now - since):.0f} ms; {self._depths()})"
            )
