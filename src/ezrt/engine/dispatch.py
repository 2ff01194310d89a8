"""Acceptance and dispatch: the per-route queues, the routing policy and pacing.

``lock`` serialises the moment of acceptance: the closed check, the delivery sequence
number, pacing, the route choice and the append to the route queue. ``stop()`` takes it
to end acceptance and append one ``STOP`` per worker after every accepted task. It is
never held while waiting.

Per route: a ``deque`` of tasks and a ``SimpleQueue`` "bell" with at least one item per
queued task. A worker waits on its bell, then claims a task with ``popleft``. Cancelling,
expiry and ``stop(cancel=True)`` claim with ``remove`` or ``popleft`` on the same deque,
so exactly one party gets each queued task.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from ..errors import PacingDropError, SessionClosedError
from .admission import TOKEN
from .task import Task

__all__ = ["STOP", "Dispatcher", "Pacing"]

STOP = object()  # in a route queue: the worker that takes it exits


class Pacing:
    """Upstream's pacing: a task that arrives sooner than the cores take one is dropped.

    Workers feed it their compute times (racing workers may lose an update: harmless for
    a moving average); the verdict is given at acceptance, under the dispatcher's lock.
    """

    __slots__ = ("_routes", "average", "last_accepted")

    def __init__(self, routes: int) -> None:
        self._routes = routes
        self.average = 0.0  # moving average of compute time
        self.last_accepted = 0.0  # when the last task was accepted

    def record(self, compute: float) -> None:
        average = self.average
        self.average = compute if average == 0.0 else 0.95 * average + 0.05 * compute

    def verdict(self, what: str, now: float) -> Optional[PacingDropError]:
        """None when a task arriving now may run; else the error that drops it."""
        if self.average <= 0.0:
            return None
        interval = self.average / self._routes
        gap = now - self.last_accepted
        if gap >= interval:
            return None
        return PacingDropError(
            f"{what}: dropped by pacing (arrived {1000 * gap:.2f} ms after the last "
            f"accepted task; the cores take one every {1000 * interval:.2f} ms)"
        )


class Dispatcher:
    """Accepts tasks onto per-route queues and lets workers, cancel and expiry claim them."""

    def __init__(
        self,
        schedule: Sequence[Optional[int]],
        routes: Sequence[Optional[int]],
        route_workers: Sequence[Sequence[int]],
        policy: str,
        pacing: Optional[Pacing],
        running: Dict[int, Any],
    ) -> None:
        if policy not in ("round_robin", "least_loaded"):
            raise ValueError(f"unknown dispatch policy {policy!r}")
        self.lock = threading.Lock()
        self.closed = False
        # Written under ``lock``.
        self.submitted = 0
        self.enqueued = 0
        self.next_seq = 0  # delivered tasks accepted so far: the next one's place in order
        self.queues: List[Deque[Any]] = [deque() for _ in routes]
        self.bells: List[queue.SimpleQueue[object]] = [queue.SimpleQueue() for _ in routes]
        self._route_workers = route_workers
        self._single = len(routes) == 1
        self._least_loaded = policy == "least_loaded"
        route_index = {core: i for i, core in enumerate(routes)}
        # Round robin walks the user's schedule (duplicates weight it), as route indices.
        self._rr_routes = [route_index[core] for core in schedule]
        self._rr_next = 0
        self._weights = [list(schedule).count(core) for core in routes]
        self._running = running
        self.pacing = pacing

    def accept(self, task: Task, what: str, now: float) -> Tuple[bool, Optional[PacingDropError]]:
        """Accept a task that has its admission tokens: (queued, pacing drop or None).

        Raises :class:`SessionClosedError` when acceptance has stopped.
        """
        with self.lock:
            if self.closed:
                raise SessionClosedError(f"{what} rejected: the session is closed")
            self.submitted += 1
            task.submitted_at = now
            if task.delivered:
                task.seq = self.next_seq
                self.next_seq += 1
            pacing = self.pacing
            if pacing is not None:
                dropped = pacing.verdict(what, now)
                if dropped is not None:
                    return False, dropped
                pacing.last_accepted = now
            task.route = route = 0 if self._single else self._pick_route()
            self.enqueued += 1
            self.queues[route].append(task)
            self.bells[route].put(TOKEN)
        return True, None

    def idle(self) -> bool:
        """Nothing running and nothing queued on any route (a moment's figure)."""
        return not self._running and not any(self.queues)

    def count_unqueued(self) -> None:
        """A task accepted without a queue (its deadline passed while it waited for room)."""
        with self.lock:
            self.submitted += 1

    def _pick_route(self) -> int:
        """Choose the route for a new task among several (``lock`` held).

        Round robin starts again from the schedule's first entry whenever the engine is
        idle (nothing running, nothing queued), as ``least_loaded`` does by nature: a lone
        caller's tasks then always run on the same worker. On ONNX Runtime such a task
        runs on every scheduled core (``lone_run``); alternating workers would wake each
        one on a core where the previous task's intra-op thread is still winding down,
        which measured twice as slow as stock ONNX Runtime on a submit-and-wait loop. A
        burst after an idle spell still spreads over every route from the first.
        """
        if not self._least_loaded:
            if self.idle():
                self._rr_next = 0
            route = self._rr_routes[self._rr_next]
            self._rr_next = (self._rr_next + 1) % len(self._rr_routes)
            return route
        # least_loaded: fewest queued + running tasks per unit of schedule weight.
        running = self._running
        loads = [
            (len(self.queues[r]) + sum(1 for i in workers if i in running)) / self._weights[r]
            for r, workers in enumerate(self._route_workers)
        ]
        return loads.index(min(loads))

    def withdraw(self, task: Task) -> bool:
        """Claim a queued task (cancel, expiry): False if a worker (or stop) took it."""
        try:
            self.queues[task.route].remove(task)
        except ValueError:
            return False
        with contextlib.suppress(queue.Empty):
            self.bells[task.route].get(False)  # its bell item, unless a worker holds it
        task.started = True
        return True

    def stop(self, cancel: bool) -> Tuple[bool, List[Task]]:
        """End acceptance: (first call, tasks withdrawn). Every worker gets a ``STOP``
        after every task still queued (``cancel`` empties the queues first)."""
        withdrawn: List[Task] = []
        with self.lock:
            first = not self.closed
            self.closed = True
            if cancel:
                for tasks in self.queues:
                    while True:
                        try:
                            task = tasks.popleft()
                        except IndexError:
                            break
                        if task is not STOP:
                            withdrawn.append(task)
            if first or cancel:  # cancelling may have taken an earlier stop's markers
                for route, workers in enumerate(self._route_workers):
                    for _ in workers:
                        self.queues[route].append(STOP)
                        self.bells[route].put(TOKEN)
        return first, withdrawn

    def counters(self) -> Tuple[int, int]:
        """(submitted, enqueued), consistent with each other."""
        with self.lock:
            return self.submitted, self.enqueued

    def queued(self) -> int:
        """Tasks waiting in the route queues (a moment's figure)."""
        return sum(len(tasks) for tasks in self.queues)
