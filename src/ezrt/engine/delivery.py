"""The delivery ("callback") thread: completes delivered tasks, in submission order.

Finished delivered tasks arrive on ``put`` (a ``SimpleQueue``), one by one or as a
worker's list; the thread takes every ready outcome per wake-up, restores submission order
when ``sequential`` (it alone owns the reordering buffer), calls each task's completion and
gives its stage token back once the callback has returned.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from .ledger import Ledger
from .task import Finished, report

__all__ = ["WAKE", "Delivery"]

WAKE = object()  # in the queue: the thread re-checks whether it may stop


def _outcomes(arrived: List[Any]) -> List[Any]:
    """The queue items with each worker's list of outcomes spread out, in order."""
    if len(arrived) == 1 and type(arrived[0]) is list:
        return arrived[0]  # the usual case: one worker's outcomes
    if not any(type(item) is list for item in arrived):
        return arrived
    return [one for item in arrived for one in (item if type(item) is list else (item,))]


class Delivery:
    """One thread that runs ``run_async`` callbacks."""

    def __init__(
        self,
        name: str,
        sequential: bool,
        free_stage: Callable[[], None],
        ledger: Ledger,
        finished: Callable[[int], bool],
        on_stopped: Optional[Callable[[], None]],
    ) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: Hand a finished delivered task over (a C call: safe on the hot path).
        self.put: Callable[[Any], None] = self._queue.put
        self._sequential = sequential
        self._free_stage = free_stage
        #: The delivery thread's own statistics.
        self.ledger = ledger
        #: finished(delivered so far) -> True when nothing more can arrive: stop.
        self._finished = finished
        self._on_stopped = on_stopped
        self.thread = threading.Thread(target=self._main, name=f"{name}-callback", daemon=True)

    def wake(self) -> None:
        """Make the thread re-check whether it may stop."""
        self._queue.put(WAKE)

    def _main(self) -> None:
        done, free_stage = self._queue, self._free_stage
        ledger = self.ledger
        record = ledger.delivery.add
        sequential = self._sequential
        early: Dict[int, Finished] = {}  # finished before an earlier task (sequential only)
        next_seq = 0
        monotonic = time.monotonic
        while True:
            arrived = [done.get()]
            while not done.empty():  # this thread is the only consumer: get() cannot block
                arrived.append(done.get())
            ready: List[Finished] = []
            for item in _outcomes(arrived):
                if item is WAKE:
                    continue
                if not sequential or (item[0].seq == next_seq and not early):
                    ready.append(item)  # in order already: the usual case
                    next_seq += 1
                else:
                    early[item[0].seq] = item
            while next_seq in early:
                ready.append(early.pop(next_seq))
                next_seq += 1
            for task, result, error in ready:
                try:
                    task.on_done(result, error)
                except BaseException as exc:
                    report("ezrt: a run_async callback raised; delivery continues", exc)
                if task.finished_at:  # 0: it never ran (cancelled, dropped, expired)
                    record(monotonic() - task.finished_at)
                ledger.delivered += 1
                free_stage()
            if self._finished(ledger.delivered):
                break
        if self._on_stopped is not None:
            try:
                self._on_stopped()
            except Exception as exc:
                report("ezrt: releasing the backend failed", exc)
