"""Dynamic batching: a worker that takes a task also takes compatible queued tasks, runs them
as one, and completes each with its own share of the result.

The engine knows nothing of payloads; a :class:`Batcher` (made by the backend) says which
payloads may share a run (equal :meth:`~Batcher.key`), how to join them and how to split the
result. Batching is opt-in (``max_batch_size`` > 1) and changes nothing else:

* FIFO within a route: a worker takes the tasks at the head of its queue while they are
  compatible, and stops at the first one that is not (it stays first for the next worker);
* exactly once: every extra task is claimed with ``deque.remove``, the same claim cancel and
  expiry use, so each queued task still has exactly one owner; the worker checks each one's
  deadline and start hook as it claims it;
* one bad task fails only itself: a batch whose run (or split) raises runs its members again
  one by one, and each gets its own outcome;
* ``batch_timeout`` (seconds, default 0): how long a worker holding fewer than
  ``max_batch_size`` tasks waits for more to arrive before it runs what it has. 0 never
  waits: a lone task runs at once, as without batching.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable, Deque, Hashable, List, Optional, Protocol, Sequence, Tuple

from .dispatch import STOP
from .task import Task

__all__ = ["BatchPolicy", "Batcher", "gather", "run_batch"]


class Batcher(Protocol):
    """How a backend's payloads share one run."""

    def key(self, payload: Any) -> Optional[Hashable]:
        """Payloads with equal keys may run as one batch; None: this one runs alone."""
        ...

    def size(self, payload: Any) -> int:
        """How many samples the payload holds (its inputs' leading axis)."""
        ...

    def combine(self, payloads: Sequence[Any]) -> Any:
        """One payload holding every sample of ``payloads``, in order."""
        ...

    def split(self, result: Any, sizes: Sequence[int]) -> List[Any]:
        """The result of a combined run, cut back into one result per payload."""
        ...


class BatchPolicy:
    """What a worker needs to form batches."""

    __slots__ = ("batcher", "max_size", "timeout")

    def __init__(self, batcher: Batcher, max_size: int, timeout: float) -> None:
        self.batcher = batcher
        self.max_size = max_size
        self.timeout = timeout


def gather(
    policy: BatchPolicy,
    tasks: Deque[Any],
    bell: queue.SimpleQueue[object],
    batch: List[Task],
    claim: Callable[[Task, float], bool],
) -> None:
    """Add compatible tasks from the head of the queue to ``batch`` (which holds the first),
    waiting up to the policy's timeout for more when the queue runs dry. ``claim(task, now)``
    does for each what a worker does for a task leaving the queue, and says whether it may
    run."""
    key = policy.batcher.key
    wanted = key(batch[0].payload)
    if wanted is None:
        return
    max_size = policy.max_size
    until = time.monotonic() + policy.timeout
    while len(batch) < max_size:
        try:
            candidate = tasks[0]
        except IndexError:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                bell.get(True, remaining)  # a task arrived, or a spare item woke us
            except queue.Empty:
                return
            if tasks:
                bell.put(True)  # the new task's item: the claim below takes one back
            continue
        if candidate is STOP or key(candidate.payload) != wanted:
            return  # keep FIFO order: the next worker starts from here
        try:
            tasks.remove(candidate)  # the same claim as cancel and expiry
        except ValueError:
            continue  # withdrawn (or taken) meanwhile
        try:  # noqa: SIM105 (contextlib.suppress costs more than the get, per task)
            bell.get(False)  # its bell item, unless a worker holds it
        except queue.Empty:
            pass
        if claim(candidate, time.monotonic()):
            batch.append(candidate)


def run_batch(
    batcher: Batcher, run: Callable[[Any], Any], batch: List[Task]
) -> List[Tuple[Any, Optional[BaseException]]]:
    """Run a batch: [(result, error)] per task. A batch that fails reruns its tasks alone."""
    if len(batch) == 1:
        return [_attempt(run, batch[0].payload)]
    payloads = [task.payload for task in batch]
    try:
        sizes = [batcher.size(payload) for payload in payloads]
        results = batcher.split(run(batcher.combine(payloads)), sizes)
        return [(result, None) for result in results]
    except BaseException:  # one bad member must fail only itself: run each alone
        return [_attempt(run, payload) for payload in payloads]


def _attempt(run: Callable[[Any], Any], payload: Any) -> Tuple[Any, Optional[BaseException]]:
    try:
        return run(payload), None
    except BaseException as exc:  # a task's failure is its result, never the worker's
        return None, exc
