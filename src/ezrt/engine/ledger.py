"""Statistics: one ledger per engine thread, a locked one for everybody else, one merge.

A worker and the delivery thread each write only their own :class:`Ledger`, so recording
costs no lock. Events on other threads (timeouts, drops, cancels, expiry, close) go to a
:class:`SharedLedger`, which takes its lock itself. :func:`snapshot` merges them all.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .metrics import Histogram, SessionStats
from .task import OUTCOMES, Task, outcome_of

__all__ = ["Ledger", "SharedLedger", "in_flight", "snapshot"]


class Ledger:
    """Counts and latencies written by one thread.

    A worker's ``queue_wait`` holds one entry per task it took from its queue, and its
    ``compute`` total is its busy time.
    """

    __slots__ = (
        "batch_sizes",
        "compute",
        "counts",
        "delivered",
        "delivery",
        "queue_wait",
        "timed_out",
        "to_deliver",
        "withdrawn",
    )

    def __init__(self) -> None:
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.withdrawn = 0  # tasks taken from a queue by cancel, expiry or close
        self.to_deliver = 0  # outcomes handed to the callback thread
        self.delivered = 0  # outcomes the callback thread has delivered
        self.timed_out = 0
        self.queue_wait = Histogram()
        self.compute = Histogram()
        self.delivery = Histogram()
        self.batch_sizes: Dict[int, int] = {}  # tasks per run -> runs (batching workers)

    def note(self, task: Task, error: Optional[BaseException]) -> None:
        """Count one completed task."""
        self.counts[outcome_of(error)] += 1
        if task.delivered:
            self.to_deliver += 1


class SharedLedger(Ledger):
    """The ledger of events on threads that own none; every write takes ``lock``."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def note(self, task: Task, error: Optional[BaseException]) -> None:
        with self.lock:
            Ledger.note(self, task, error)

    def note_inline(self, seconds: float, error: Optional[BaseException]) -> None:
        """Count a task a caller ran on its own thread (it never had a Task)."""
        with self.lock:
            self.counts[outcome_of(error)] += 1
            self.compute.add(seconds)

    def add_withdrawn(self, count: int = 1) -> None:
        with self.lock:
            self.withdrawn += count

    def add_timed_out(self) -> None:
        with self.lock:
            self.timed_out += 1

    def add_cancelled(self) -> None:
        with self.lock:
            self.counts["cancelled"] += 1


def snapshot(
    shared: SharedLedger,
    workers: Sequence[Ledger],
    worker_names: Sequence[str],
    delivery: Ledger,
    *,
    counters: Callable[[], Tuple[int, int]],
    running: int,
    started_at: float,
) -> SessionStats:
    """Merge every ledger into one :class:`SessionStats`.

    ``counters()`` answers (submitted, enqueued); it is read after the ledgers, so that
    ``queued`` is never negative while tasks move.
    """
    with shared.lock:
        counts = dict(shared.counts)
        withdrawn, to_deliver, timed_out = shared.withdrawn, shared.to_deliver, shared.timed_out
        inline = shared.compute.snapshot()  # tasks callers ran on their own threads
    for ledger in (*workers, delivery):
        for key, count in list(ledger.counts.items()):
            counts[key] += count
        to_deliver += ledger.to_deliver
    queue_wait = Histogram().snapshot()
    compute = inline
    busy: Dict[str, float] = {}
    batch_sizes: Dict[int, int] = {}
    for ledger in workers:
        for size, runs in list(ledger.batch_sizes.items()):
            batch_sizes[size] = batch_sizes.get(size, 0) + runs
    for name, ledger in zip(worker_names, workers):
        queue_wait = queue_wait.merge(ledger.queue_wait.snapshot())
        mine = ledger.compute.snapshot()
        busy[name] = mine.total
        compute = compute.merge(mine)
    submitted, enqueued = counters()
    return SessionStats(
        submitted=submitted,
        timed_out=timed_out,
        **counts,
        queued=max(0, enqueued - queue_wait.count - withdrawn),
        running=running,
        undelivered=max(0, to_deliver - delivery.delivered),
        uptime_seconds=time.monotonic() - started_at,
        queue_wait=queue_wait,
        compute=compute,
        delivery=delivery.delivery.snapshot(),
        worker_busy_seconds=busy,
        batch_sizes=dict(sorted(batch_sizes.items())),
    )


def in_flight(shared: SharedLedger, workers: List[Ledger], delivery: Ledger) -> int:
    """Delivered outcomes not yet delivered (cheap: no histogram merge)."""
    to_deliver = shared.to_deliver + sum(ledger.to_deliver for ledger in workers)
    return max(0, to_deliver - delivery.delivered)
