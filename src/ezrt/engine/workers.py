"""The worker threads: each takes tasks from its route's queue and runs them on its runner.

:func:`work` is the thread's whole life, a module-level function handed exactly what it
needs (as CPython's ``concurrent.futures`` worker is handed its queue). The loop is the
engine's hot path: local bindings, no exceptions raised per task, and few wake-ups:
finished outcomes are handed to the callback thread just before this thread releases the
GIL (to run the next task, or to wait), and a tiny model's outcomes several at a time (see
``HOLD_SECONDS``).

A running task belongs to whoever pops it from ``running``: the worker when its runner
returns, or the engine's exit path when it gives up on a task that never finishes.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol

from .admission import ThreadRoles
from .batching import BatchPolicy, gather, run_batch
from .deadlines import expired_error
from .dispatch import STOP, Pacing
from .ledger import Ledger
from .task import Finished, Task, finish, report

__all__ = ["Crew", "Runner", "RunnerFactory", "WorkerPool", "work"]

#: A worker hands its finished outcomes to the callback thread before it waits, and before
#: each run unless that run would likely end within ``HOLD_SECONDS`` of the oldest outcome it
#: holds (judged by the last run's length), holding at most ``HOLD_MAX``. So a lone task's
#: result is handed over at once, a model whose runs take longer never holds one back, and a
#: tiny model's stream of results wakes the callback thread once per few tasks rather than
#: for every one (each wake-up costs a few microseconds of GIL hand-over between cores).
#: The bound: a held result waits at most ``HOLD_SECONDS`` plus one run, so a run far
#: longer than the one before it (a much larger dynamic shape) delays the few results held.
HOLD_SECONDS = 50e-6
HOLD_MAX = 8


class Runner(Protocol):
    """What a worker thread drives: made in that thread, used by it alone.

    A runner may also have ``run_alone(payload)``: how to run a task that finds nothing
    else running or queued (the ONNX Runtime backend spreads it over every scheduled core).
    Without it (or when it is None) every task goes through ``run``.
    """

    def run(self, payload: Any) -> Any: ...

    def close(self) -> None: ...


#: Makes a worker's runner, in that worker's thread: (core or None, worker index) -> Runner.
RunnerFactory = Callable[[Optional[int], int], Runner]


class Liveness:
    """How many workers are running (guarded by its lock; read freely)."""

    __slots__ = ("count", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def add(self, delta: int) -> None:
        with self.lock:
            self.count += delta


@dataclass(frozen=True)
class Crew:
    """What every worker shares: where tasks come from and where outcomes go."""

    make_runner: RunnerFactory
    roles: ThreadRoles
    #: Start-up reports: None (the runner is made) or the exception that stopped it.
    reports: queue.SimpleQueue[Optional[BaseException]]
    free_slot: Callable[[], None]  # give an admission slot back
    running: Dict[int, Any]  # a worker's task, or its batch
    idle: Callable[[], bool]  # nothing running or queued anywhere (Dispatcher.idle)
    deliver: Callable[[Any], None]  # hand an outcome, or a list of them, to the delivery thread
    pacing: Optional[Pacing]
    live: Liveness
    on_exit: Callable[[], None]  # tell the delivery thread a worker stopped
    batching: Optional[BatchPolicy] = None  # dynamic batching (None: off)


def work(
    crew: Crew,
    index: int,
    core: Optional[int],
    tasks: Deque[Any],
    bell: queue.SimpleQueue[object],
    ledger: Ledger,
) -> None:
    """A worker thread: make the runner, report, then run tasks until a ``STOP``."""
    try:
        runner = crew.make_runner(core, index)
    except BaseException as exc:  # report to the constructor, which re-raises it
        crew.reports.put(exc)
        return
    ident = threading.get_ident()
    crew.roles.workers.add(ident)
    crew.live.add(1)
    crew.reports.put(None)
    try:
        loop = _loop if crew.batching is None else _batch_loop
        loop(crew, index, runner, tasks, bell, ledger)
    finally:
        crew.roles.workers.discard(ident)
        try:
            runner.close()
        except Exception as exc:
            report("ezrt: closing a backend worker failed", exc)
        crew.live.add(-1)
        crew.on_exit()


def _loop(
    crew: Crew,
    index: int,
    runner: Runner,
    tasks: Deque[Any],
    bell: queue.SimpleQueue[object],
    ledger: Ledger,
) -> None:
    free_slot, running, deliver, pacing = crew.free_slot, crew.running, crew.deliver, crew.pacing
    record_wait, record_compute = ledger.queue_wait.add, ledger.compute.add
    run = runner.run
    run_alone = getattr(runner, "run_alone", None)
    idle = crew.idle
    monotonic = time.monotonic
    # Delivered outcomes not yet handed to the callback thread (see the module docstring),
    # the oldest finished at ``held_since``; ``last_run``: how long the last run took.
    held: List[Finished] = []
    held_since = last_run = 0.0
    try:
        while True:
            if not held:
                bell.get()
            else:
                try:
                    bell.get(False)
                except queue.Empty:  # about to wait: hand the outcomes over first
                    deliver(held)
                    held = []
                    bell.get()
            try:
                task = tasks.popleft()
            except IndexError:
                continue  # the task this bell item announced was withdrawn meanwhile
            if task is STOP:
                break
            task.started = True
            started = monotonic()
            record_wait(started - task.submitted_at)
            free_slot()  # a slot frees as the task leaves the queue
            if task.expires_at is not None or task.on_start is not None:
                if held:  # the checks may run user code (future callbacks)
                    deliver(held)
                    held = []
                if not _may_start(task, ledger, started, deliver):
                    continue
            # Alone (nothing else running or queued anywhere): the whole machine is this
            # task's. A task waiting on another route means that route's worker is waking.
            alone = run_alone is not None and idle()
            running[index] = task
            if held and (len(held) >= HOLD_MAX or started - held_since + last_run >= HOLD_SECONDS):
                deliver(held)
                held = []
            try:
                result, error = (run_alone if alone else run)(task.payload), None  # type: ignore[misc]
            except BaseException as exc:  # a task's failure is its result, never the worker's
                result, error = None, exc
            task.finished_at = finished = monotonic()
            last_run = finished - started
            record_compute(last_run)
            if pacing is not None:
                pacing.record(last_run)
            if running.pop(index, None) is None:
                continue  # abandoned at interpreter exit: it was already reported failed
            outcome = finish(task, result, error, ledger)
            if outcome is not None:
                if not held:
                    held_since = finished
                held.append(outcome)
    finally:
        if held:
            deliver(held)


def _batch_loop(
    crew: Crew,
    index: int,
    runner: Runner,
    tasks: Deque[Any],
    bell: queue.SimpleQueue[object],
    ledger: Ledger,
) -> None:
    """The loop with dynamic batching (see ``batching.py``): each run takes the task at the
    head of the queue and the compatible ones behind it."""
    policy = crew.batching
    assert policy is not None
    free_slot, running, deliver, pacing = crew.free_slot, crew.running, crew.deliver, crew.pacing
    record_wait, record_compute = ledger.queue_wait.add, ledger.compute.add
    sizes = ledger.batch_sizes
    monotonic = time.monotonic

    def claim(task: Task, now: float) -> bool:
        task.started = True
        record_wait(now - task.submitted_at)
        free_slot()  # a slot frees as the task leaves the queue
        if task.expires_at is None and task.on_start is None:
            return True
        return _may_start(task, ledger, now, deliver)

    while True:
        bell.get()
        try:
            first = tasks.popleft()
        except IndexError:
            continue  # the task this bell item announced was withdrawn meanwhile
        if first is STOP:
            return
        if not claim(first, monotonic()):
            continue
        batch = [first]
        gather(policy, tasks, bell, batch, claim)
        running[index] = batch
        started = monotonic()
        outcomes = run_batch(policy.batcher, runner.run, batch)
        finished = monotonic()
        record_compute(finished - started)
        sizes[len(batch)] = sizes.get(len(batch), 0) + 1
        if pacing is not None:
            pacing.record((finished - started) / len(batch))
        if running.pop(index, None) is None:
            continue  # abandoned at interpreter exit: already reported failed
        handed = []
        for task, (result, error) in zip(batch, outcomes):
            task.finished_at = finished
            outcome = finish(task, result, error, ledger)
            if outcome is not None:
                handed.append(outcome)
        if handed:
            deliver(handed)  # the batch's outcomes in one hand-over


def _may_start(task: Task, ledger: Ledger, now: float, deliver: Callable[[Finished], None]) -> bool:
    """Last checks on a claimed task: False if it must not run (expired or withdrawn)."""
    if task.expires_at is not None and now > task.expires_at:
        outcome = finish(task, None, expired_error(task, now), ledger)
        if outcome is not None:
            deliver(outcome)
        return False
    if task.on_start is not None:
        try:
            proceed = task.on_start()
        except Exception as exc:
            report("ezrt: a task's start hook raised; the task is skipped", exc)
            proceed = False
        if not proceed:
            task.payload = None
            ledger.counts["cancelled"] += 1
            return False
    return True


class WorkerPool:
    """The worker threads of one engine: started together, each reporting once."""

    def __init__(
        self,
        crew: Crew,
        name: str,
        routes: List[Optional[int]],
        queues: List[Deque[Any]],
        bells: List[queue.SimpleQueue[object]],
        ledgers: List[Ledger],
    ) -> None:
        self._crew = crew
        self.threads: List[threading.Thread] = []
        for index, ledger in enumerate(ledgers):
            route = index % len(routes)
            core = routes[route]
            where = "auto" if core is None else f"core{core}"
            self.threads.append(
                threading.Thread(
                    target=work,
                    args=(crew, index, core, queues[route], bells[route], ledger),
                    name=f"{name}-worker-{index}-{where}",
                    daemon=True,
                )
            )

    def start(self) -> Optional[BaseException]:
        """Start every worker; the first start-up failure, or None when all are ready."""
        for thread in self.threads:
            thread.start()
        reports = [self._crew.reports.get() for _ in self.threads]
        failed = [report for report in reports if report is not None]
        return failed[0] if failed else None

    def join(self) -> None:
        for thread in self.threads:
            thread.join()
