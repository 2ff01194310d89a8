"""Deadlines: fail queued tasks at their deadline, even when no worker frees.

A heap of ``(expires_at, tiebreak, task)`` under its own condition variable, served by a
thread started on first use. It claims a task through the same withdrawal as ``cancel``,
so a task that a worker took first is left to the worker (which checks the deadline
itself before running it).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable, List, Optional, Tuple

from ..errors import DeadlineExceededError
from .task import Task

__all__ = ["Deadlines", "expired_error"]

_MAX_WAIT = 3600.0  # seconds; the thread re-checks at least this often


def expired_error(task: Task, now: float) -> DeadlineExceededError:
    """The error of a task whose deadline passed before it started."""
    late = 1000 * (now - (task.expires_at or now))
    return DeadlineExceededError(
        f"deadline exceeded: the task did not start in time ({late:.1f} ms past its deadline)"
    )


class Deadlines:
    """The expiry thread and its heap."""

    def __init__(
        self,
        name: str,
        withdraw: Callable[[Task], bool],
        expire: Callable[[Task, DeadlineExceededError], None],
        closing: Callable[[], bool],
    ) -> None:
        self._name = name
        self._withdraw = withdraw  # claim a queued task (False: somebody else has it)
        self._expire = expire  # complete a claimed task with its deadline error
        self._closing = closing
        self._cv = threading.Condition(threading.Lock())
        self._heap: List[Tuple[float, int, Task]] = []
        self._tiebreak = itertools.count()
        self.thread: Optional[threading.Thread] = None

    def arm(self, task: Task) -> None:
        """Register a queued task's deadline."""
        assert task.expires_at is not None
        with self._cv:
            heap = self._heap
            while heap and heap[0][2].started:  # keep the heap about as long as the queue
                heapq.heappop(heap)
            heapq.heappush(heap, (task.expires_at, next(self._tiebreak), task))
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._main, name=f"{self._name}-deadline", daemon=True
                )
                self.thread.start()
            elif heap[0][2] is task:
                self._cv.notify()

    def wake(self) -> None:
        """Let the thread see that the engine is closing."""
        with self._cv:
            self._cv.notify_all()

    def _main(self) -> None:
        while True:
            due: List[Task] = []
            with self._cv:
                while not self._closing():
                    now = time.monotonic()
                    heap = self._heap
                    while heap and (heap[0][0] <= now or heap[0][2].started):
                        due.append(heapq.heappop(heap)[2])
                    if due:
                        break
                    # A far deadline must not overflow the wait (threading.TIMEOUT_MAX).
                    self._cv.wait(min(heap[0][0] - now, _MAX_WAIT) if heap else None)
            if not due:
                return  # closing: workers fail stale tasks as they reach them
            now = time.monotonic()
            for task in due:
                if not task.started and self._withdraw(task):
                    self._expire(task, expired_error(task, now))
