"""The engine: bounded admission, per-core dispatch, worker threads, ordered delivery.

It knows nothing of models or backends. A task is an opaque ``payload`` handed to a
:class:`Runner` (one per worker thread, made in that thread) and a completion function
called exactly once with ``(result, None)`` or ``(None, error)``.

Two kinds of completion:

* **delivered** (``run_async`` callbacks): handed to the single callback thread, in
  submission order when ``sequential``; at most ``max_undelivered`` finished results may
  wait for it before admission blocks.
* **direct** (``run``, pipelines, futures): called on the worker thread that finished the
  task. Nothing waits for the callback thread, so a callback may call ``run`` safely and a
  synchronous ``run`` pays no extra thread hop.

Locking: one lock, ``_lock``, guards every piece of mutable state below (queues, counters,
the ready map, the lifecycle flags). It is held only for short bookkeeping: never while a
runner runs, never while user code (a completion) runs, never across a sleep except
through its own conditions, whose waits release it (and the GIL). Three conditions share it:

* ``_space``: capacity freed (a task left a queue, a result left the ready map, closing).
  Waited on by submitters.
* ``_work[r]``: a task was queued for route ``r``, or closing. Waited on by that route's
  workers.
* ``_ready_cv``: a delivered completion arrived, a worker exited, or closing. Waited on by
  the callback thread.

Admission checks and enqueues under one acquisition, so the bounds are exact and no
wake-up can be lost (a waiter re-checks its predicate under the same lock that the
notifier held when it changed the state).

Threads owned by the engine never wait for the engine in a way that could depend on
themselves: a worker thread that submits never blocks (it fails at once with
:class:`ReentrancyError` when there is no room), and the callback thread may wait for
queue space (workers free it) but never for callback-stage space (only it frees that).
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set, Tuple

from ..errors import (
    DeadlineExceededError,
    EzrtError,
    PacingDropError,
    PipelineFullError,
    ReentrancyError,
    SessionClosedError,
    SubmitTimeoutError,
)
from .metrics import Histogram, SessionStats

__all__ = ["Engine", "EngineConfig", "Runner", "Task"]

logger = logging.getLogger("ezrt")

Completion = Callable[[Any, Optional[BaseException]], None]

_QUEUED, _RUNNING, _DONE = 0, 1, 2


class Runner(Protocol):
    """What a worker thread drives: made in that thread, used by it alone."""

    def run(self, payload: Any) -> Any: ...

    def close(self) -> None: ...


RunnerFactory = Callable[[Optional[int], int], Runner]


@dataclass(frozen=True)
class EngineConfig:
    """How many workers, where, and how much may wait.

    ``schedule`` is the round-robin list of cores (duplicates weight it); ``None`` entries
    mean "no particular core" (tp/default mode). Workers: ``threads_per_core`` for each
    distinct entry.
    """

    schedule: Tuple[Optional[int], ...] = (None,)
    threads_per_core: int = 1
    max_queue_size: int = 3
    max_undelivered: int = 8
    sequential: bool = True
    pacing: bool = False
    dispatch_policy: str = "round_robin"
    submit_timeout_s: float = 10.0
    name: str = "ezrt"

    @property
    def routes(self) -> Tuple[Optional[int], ...]:
        distinct = set(self.schedule)
        if None in distinct:
            return (None,)
        return tuple(sorted(distinct))  # type: ignore[type-var]


class Task:
    """One accepted unit of work. ``state`` moves QUEUED -> RUNNING -> DONE, or QUEUED -> DONE."""

    __slots__ = (
        "delivered",
        "expires_at",
        "finished_at",
        "on_done",
        "on_start",
        "payload",
        "route",
        "seq",
        "state",
        "submitted_at",
    )

    def __init__(
        self,
        payload: Any,
        on_done: Completion,
        delivered: bool,
        on_start: Optional[Callable[[], bool]] = None,
        expires_at: Optional[float] = None,
    ) -> None:
        self.payload = payload
        self.on_done = on_done
        self.delivered = delivered
        #: Called by the worker before running; False means the task was withdrawn (a
        #: cancelled future): it is skipped and its completion is not called.
        self.on_start = on_start
        #: time.monotonic() by which the task must have started, else it fails unrun.
        self.expires_at = expires_at
        self.route = 0
        self.seq = -1
        self.state = _QUEUED
        self.submitted_at = 0.0  # time.monotonic() at admission
        self.finished_at = 0.0  # time.monotonic() when the backend returned


# Engines alive in this process: closed at interpreter exit, poisoned in a fork child.
_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine:
    """Admission, per-route queues, worker threads and the callback thread."""

    def __init__(
        self,
        config: EngineConfig,
        make_runner: RunnerFactory,
        on_stopped: Optional[Callable[[], None]] = None,
    ) -> None:
        if config.dispatch_policy not in ("round_robin", "least_loaded"):
            raise ValueError(f"unknown dispatch policy {config.dispatch_policy!r}")
        self.config = config
        self._on_stopped = on_stopped
        self._routes = config.routes
        route_index = {core: i for i, core in enumerate(self._routes)}
        # Round robin walks the user's schedule (duplicates weight it), as route indices.
        self._rr_routes = [route_index[core] for core in config.schedule]
        self._rr_next = 0
        self._weights = [config.schedule.count(core) for core in self._routes]

        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._space_waiters = 0
        self._work = [threading.Condition(self._lock) for _ in self._routes]
        self._ready_cv = threading.Condition(self._lock)
        # Deadlines: a heap of (expires_at, tiebreak, task) served by a thread started on
        # first use; it fails queued tasks at their deadline even when no worker frees.
        self._expiry_cv = threading.Condition(self._lock)
        self._expiries: List[Tuple[float, int, Task]] = []
        self._expiry_tiebreak = itertools.count()
        self._expiry_thread: Optional[threading.Thread] = None
        self._queues: List[Deque[Task]] = [deque() for _ in self._routes]
        self._busy = [0] * len(self._routes)
        # Sleepers, so that a notify is only paid for when someone is actually waiting.
        self._idle = [0] * len(self._routes)
        self._delivery_waiting = False
        self._queued = 0
        self._undelivered = 0
        self._running_tasks: Set[Task] = set()
        # Set only at interpreter exit when tasks never finish: deliver without waiting.
        self._order_abandoned = False
        self._ready: Dict[int, Tuple[Task, Any, Optional[BaseException]]] = {}
        self._ready_fifo: Deque[Tuple[Task, Any, Optional[BaseException]]] = deque()
        self._next_seq = 0
        self._next_delivery = 0
        self._stopping = False
        self._forked = False
        self._live_workers = 0
        self._started_count = 0
        self._startup_errors: List[BaseException] = []
        # Pacing: exponential moving average of compute time and the last accepted time.
        self._avg_compute = 0.0
        self._last_accepted = 0.0
        # Metrics, all guarded by _lock and recorded where it is held anyway.
        self._started_at = time.monotonic()
        self._queue_wait = Histogram()
        self._compute = Histogram()
        self._delivery = Histogram()
        self._busy_seconds: Dict[str, float] = {}
        # Counters (read by stats()).
        self.counts = {
            "submitted": 0,
            "completed": 0,
            "failed": 0,
            "dropped": 0,
            "cancelled": 0,
            "expired": 0,
            "timed_out": 0,
        }

        self._worker_threads: List[threading.Thread] = []
        self._worker_idents: Set[int] = set()
        n_workers = config.threads_per_core * len(self._routes)
        for i in range(n_workers):
            route = i % len(self._routes)
            core = self._routes[route]
            where = "auto" if core is None else f"core{core}"
            thread = threading.Thread(
                target=self._worker_main,
                args=(route, i, make_runner),
                name=f"{config.name}-worker-{i}-{where}",
                daemon=True,
            )
            self._worker_threads.append(thread)
        self._delivery_thread = threading.Thread(
            target=self._delivery_main, name=f"{config.name}-callback", daemon=True
        )
        self._delivery_ident: Optional[int] = None
        self._start()
        _live_engines.add(self)

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        n = len(self._worker_threads)
        with self._lock:
            self._live_workers = n
        for thread in self._worker_threads:
            thread.start()
        with self._lock:
            # Each worker reports in (runner made, or failed) by counting _started_count.
            while self._pending_starts() and not self._startup_errors:
                self._ready_cv.wait()
            failed = list(self._startup_errors)
        if failed:
            self._abort_start()
            raise failed[0]
        self._delivery_thread.start()
        self._delivery_ident = self._delivery_thread.ident

    def _pending_starts(self) -> bool:
        return self._started_count < len(self._worker_threads)

    def _abort_start(self) -> None:
        with self._lock:
            self._stopping = True
            for cv in self._work:
                cv.notify_all()
        for thread in self._worker_threads:
            thread.join()
        if self._on_stopped is not None:
            self._on_stopped()

    @property
    def closed(self) -> bool:
        return self._stopping

    def close(
        self, *, cancel: bool = False, wait: bool = True, timeout: Optional[float] = None
    ) -> bool:
        """Stop accepting tasks; drain (default) or cancel what is queued; join the threads.

        Cancelled tasks complete with :class:`SessionClosedError`. Running tasks always finish.
        Returns True when every thread has exited (always, with ``wait`` and no ``timeout``).
        Safe to call from any thread, callbacks included (a thread never joins itself), and
        more than once.
        """
        if self._forked:
            # In a fork child the threads do not exist and the lock may have been copied
            # while held: there is nothing to stop, and touching the lock could hang.
            return True
        error = SessionClosedError("task cancelled: the session was closed before it ran")
        direct: List[Task] = []
        with self._lock:
            self._stopping = True
            if cancel:
                for queue in self._queues:
                    for task in queue:
                        if self._record(task, None, error):
                            direct.append(task)
                    queue.clear()
                self._queued = 0
            for cv in self._work:
                cv.notify_all()
            self._space.notify_all()
            self._ready_cv.notify_all()
            self._expiry_cv.notify_all()
        for task in direct:
            self._call(task, None, error)
        if not wait:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        threads = self.threads()
        for thread in threads:
            if thread is me or not thread.is_alive():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads if t is not me)

    @property
    def worker_count(self) -> int:
        return len(self._worker_threads)

    def threads(self) -> List[threading.Thread]:
        extra = [self._expiry_thread] if self._expiry_thread is not None else []
        return [*self._worker_threads, self._delivery_thread, *extra]

    # ------------------------------------------------------------------ admission

    def submit(
        self,
        payload: Any,
        on_done: Completion,
        *,
        delivered: bool,
        what: str = "run",
        timeout: Optional[float] = None,
        wait: bool = True,
        on_start: Optional[Callable[[], bool]] = None,
        expires_at: Optional[float] = None,
    ) -> Task:
        """Accept a task or raise; waits (GIL released) while the pipeline is full.

        ``delivered`` tasks complete on the callback thread and need callback-stage room;
        others complete on the worker thread. ``what`` names the caller in error messages.
        ``timeout`` overrides the configured admission wait; ``wait=False`` raises
        :class:`PipelineFullError` at once instead of waiting. ``expires_at`` (monotonic
        time, direct tasks only) bounds the wait too: a task not started by then completes
        with :class:`DeadlineExceededError`. Raises :class:`SubmitTimeoutError` when the
        admission wait ends, :class:`SessionClosedError` when closed,
        :class:`ReentrancyError` when waiting could depend on the calling thread. A pacing
        drop is not raised: the task completes at once with :class:`PacingDropError`.
        """
        self._check_usable()
        if expires_at is not None and delivered:
            raise ValueError("deadlines are for directly completed tasks")
        task = Task(payload, on_done, delivered, on_start, expires_at)
        ident = threading.get_ident()
        on_worker = ident in self._worker_idents
        on_delivery = ident == self._delivery_ident
        config = self.config
        deadline: Optional[float] = None
        wait_started = 0.0
        failure: Optional[EzrtError] = None
        with self._lock:
            while True:
                if self._stopping:
                    raise SessionClosedError(f"{what} rejected: the session is closed")
                queue_full = self._queued >= config.max_queue_size
                stage_full = delivered and self._undelivered >= config.max_undelivered
                if not queue_full and not stage_full:
                    break
                if not wait:
                    raise PipelineFullError(
                        f"{what} rejected: async queue/callback pipeline is full "
                        f"({self._queued} queued, {self._undelivered} results awaiting callbacks)"
                    )
                if on_worker or (on_delivery and stage_full):
                    raise ReentrancyError(
                        f"{what} called from an ezrt {'worker' if on_worker else 'callback'} "
                        "thread while the pipeline is full: waiting would depend on this "
                        "thread itself. Submit from another thread, or raise max_queue_size."
                    )
                now = time.monotonic()
                if deadline is None:
                    wait_started = now
                    deadline = now + (config.submit_timeout_s if timeout is None else timeout)
                if expires_at is not None and now >= expires_at:
                    failure = self._expired_error(task, now)
                    break
                if now >= deadline:
                    self.counts["timed_out"] += 1
                    raise SubmitTimeoutError(
                        f"{what} submit timed out: async queue/callback pipeline is saturated "
                        f"(waited {1000 * (now - wait_started):.0f} ms; {self._queued} queued, "
                        f"{self._undelivered} results awaiting callbacks)"
                    )
                until = deadline if expires_at is None else min(deadline, expires_at)
                self._space_waiters += 1
                try:
                    self._space.wait(until - now)
                finally:
                    self._space_waiters -= 1
            self.counts["submitted"] += 1
            now = time.monotonic()
            task.submitted_at = now
            if delivered:
                task.seq = self._next_seq
                self._next_seq += 1
            if failure is None and config.pacing and self._avg_compute > 0.0:
                interval = self._avg_compute / len(self._routes)
                gap = now - self._last_accepted
                if gap < interval:
                    failure = PacingDropError(
                        f"{what}: dropped by pacing (arrived {1000 * gap:.2f} ms after the last "
                        f"accepted task; the cores take one every {1000 * interval:.2f} ms)"
                    )
            if failure is None:
                self._last_accepted = now
                route = self._pick_route()
                task.route = route
                self._queues[route].append(task)
                self._queued += 1
                if self._idle[route]:
                    self._work[route].notify()
                if expires_at is not None:
                    self._arm_expiry(task)
                return task
            # Recorded under this same lock, so the callback thread cannot miss it.
            call_directly = self._record(task, None, failure)
        if call_directly:
            self._call(task, None, failure)
        return task

    @staticmethod
    def _expired_error(task: Task, now: float) -> DeadlineExceededError:
        late = 1000 * (now - (task.expires_at or now))
        return DeadlineExceededError(
            f"deadline exceeded: the task did not start in time ({late:.1f} ms past its deadline)"
        )

    def _arm_expiry(self, task: Task) -> None:
        """Register a queued task's deadline with the expiry thread (lock held)."""
        assert task.expires_at is not None
        heap = self._expiries
        heapq.heappush(heap, (task.expires_at, next(self._expiry_tiebreak), task))
        if self._expiry_thread is None:
            self._expiry_thread = threading.Thread(
                target=self._expiry_main, name=f"{self.config.name}-deadline", daemon=True
            )
            self._expiry_thread.start()
        elif heap[0][2] is task:
            self._expiry_cv.notify()

    def _expiry_main(self) -> None:
        """Fail queued tasks whose deadline passed, without waiting for a worker."""
        while True:
            expired: List[Tuple[Task, DeadlineExceededError]] = []
            with self._lock:
                while not self._stopping:
                    now = time.monotonic()
                    heap = self._expiries
                    while heap and (heap[0][0] <= now or heap[0][2].state != _QUEUED):
                        _, _, task = heapq.heappop(heap)
                        if task.state == _QUEUED:
                            self._queues[task.route].remove(task)
                            self._queued -= 1
                            error = self._expired_error(task, now)
                            if self._record(task, None, error):
                                expired.append((task, error))
                    if expired:
                        if self._space_waiters:
                            self._space.notify_all()
                        break
                    self._expiry_cv.wait(heap[0][0] - now if heap else None)
            for task, error in expired:
                self._call(task, None, error)
            if not expired:
                return  # closing: workers fail stale tasks as they reach them

    def _pick_route(self) -> int:
        """Choose the route for a new task (lock held)."""
        if len(self._routes) == 1:
            return 0
        if self.config.dispatch_policy == "round_robin":
            route = self._rr_routes[self._rr_next]
            self._rr_next = (self._rr_next + 1) % len(self._rr_routes)
            return route
        # least_loaded: fewest queued + running tasks per unit of schedule weight.
        loads = [
            (len(self._queues[r]) + self._busy[r]) / self._weights[r]
            for r in range(len(self._routes))
        ]
        return loads.index(min(loads))

    def cancel(self, task: Task) -> bool:
        """Withdraw a task that no worker has started. Its completion is not called."""
        with self._lock:
            if task.state != _QUEUED or task.delivered:
                return False
            try:
                self._queues[task.route].remove(task)
            except ValueError:
                return False
            task.state = _DONE
            self._queued -= 1
            self.counts["cancelled"] += 1
            if self._space_waiters:
                self._space.notify_all()
            return True

    def assert_may_block(self, what: str) -> None:
        """Raise if the calling thread is a worker: waiting there could wait on itself."""
        if threading.get_ident() in self._worker_idents:
            raise ReentrancyError(
                f"{what} cannot block on an ezrt worker thread (it may be the worker that "
                "must run the task); call it from another thread"
            )

    def _check_usable(self) -> None:
        if self._forked:
            raise EzrtError(
                "this session was created before os.fork(); its threads do not exist in this "
                "child process. Create a new InferenceSession in the child."
            )

    # ------------------------------------------------------------------ workers

    def _worker_main(self, route: int, index: int, make_runner: RunnerFactory) -> None:
        core = self._routes[route]
        try:
            runner = make_runner(core, index)
        except BaseException as exc:  # report to the constructor, which re-raises it
            with self._lock:
                self._startup_errors.append(exc)
                self._started_count += 1
                self._live_workers -= 1
                self._ready_cv.notify_all()
            return
        self._worker_idents.add(threading.get_ident())
        queue = self._queues[route]
        work = self._work[route]
        config = self.config
        with self._lock:
            self._started_count += 1
            self._ready_cv.notify_all()
        finished: Optional[Tuple[Task, Any, Optional[BaseException]]] = None
        compute = 0.0
        name = threading.current_thread().name
        with self._lock:
            self._busy_seconds[name] = 0.0
        try:
            while True:
                call_directly = False
                with self._lock:
                    # One acquisition records the last outcome and takes the next task.
                    if finished is not None:
                        self._busy[route] -= 1
                        self._compute.add(compute)
                        self._busy_seconds[name] += compute
                        if config.pacing:
                            avg = self._avg_compute
                            self._avg_compute = (
                                compute if avg == 0.0 else 0.95 * avg + 0.05 * compute
                            )
                        call_directly = self._record(*finished)
                    while not queue and not self._stopping and not call_directly:
                        self._idle[route] += 1
                        work.wait()
                        self._idle[route] -= 1
                    task = queue.popleft() if queue else None
                    if task is not None:
                        task.state = _RUNNING
                        self._queue_wait.add(time.monotonic() - task.submitted_at)
                        self._running_tasks.add(task)
                        self._queued -= 1
                        self._busy[route] += 1
                        if self._space_waiters:
                            self._space.notify_all()
                if call_directly:
                    assert finished is not None
                    self._call(*finished)
                finished = None
                if task is None:
                    if call_directly:
                        continue  # go back and wait for work
                    break
                if (task.expires_at is not None or task.on_start is not None) and not self._begin(
                    task, route
                ):
                    continue
                started = time.monotonic()
                try:
                    result, error = runner.run(task.payload), None
                except BaseException as exc:  # a task's failure is its result, never the worker's
                    result, error = None, exc
                task.finished_at = time.monotonic()
                compute = task.finished_at - started
                finished = (task, result, error)
        finally:
            self._worker_idents.discard(threading.get_ident())
            try:
                runner.close()
            except Exception:
                logger.exception("ezrt: closing a backend worker failed")
            with self._lock:
                self._live_workers -= 1
                self._ready_cv.notify_all()

    def _begin(self, task: Task, route: int) -> bool:
        """Last checks on a popped task: False if it must not run (expired or withdrawn)."""
        if task.expires_at is not None:
            now = time.monotonic()
            if now > task.expires_at:
                error = self._expired_error(task, now)
                with self._lock:
                    self._busy[route] -= 1
                    call_directly = self._record(task, None, error)
                if call_directly:
                    self._call(task, None, error)
                return False
        if task.on_start is not None:
            try:
                proceed = task.on_start()
            except Exception:
                logger.exception("ezrt: a task's start hook raised; the task is skipped")
                proceed = False
            if not proceed:
                with self._lock:
                    self._busy[route] -= 1
                    task.state = _DONE
                    self.counts["cancelled"] += 1
                return False
        return True

    def _abandon(self) -> None:
        """Interpreter exit only, after drain and cancel timed out: tasks still running will
        not finish. Fail them now (their late results are ignored) and let the callback
        thread deliver what is left without waiting for them."""
        error = SessionClosedError("task abandoned: still running when the interpreter exited")
        direct: List[Task] = []
        with self._lock:
            self._order_abandoned = True
            for task in list(self._running_tasks):
                if self._record(task, None, error):
                    direct.append(task)
            self._ready_cv.notify_all()
        for task in direct:
            self._call(task, None, error)

    def _record(self, task: Task, result: Any, error: Optional[BaseException]) -> bool:
        """Count the outcome; queue it for the callback thread if delivered (lock held).

        Returns True when the caller must run the completion itself, after releasing the lock.
        A task already completed (abandoned at exit) is ignored: exactly once.
        """
        if task.state == _DONE:
            return False
        task.state = _DONE
        self._running_tasks.discard(task)
        if error is None:
            self.counts["completed"] += 1
        elif isinstance(error, PacingDropError):
            self.counts["dropped"] += 1
        elif isinstance(error, SessionClosedError):
            self.counts["cancelled"] += 1
        elif isinstance(error, DeadlineExceededError):
            self.counts["expired"] += 1
        else:
            self.counts["failed"] += 1
        if not task.delivered:
            return True
        if self.config.sequential:
            self._ready[task.seq] = (task, result, error)
        else:
            self._ready_fifo.append((task, result, error))
        self._undelivered += 1
        if self._delivery_waiting:
            self._ready_cv.notify()
        return False

    @staticmethod
    def _call(task: Task, result: Any, error: Optional[BaseException]) -> None:
        try:
            task.on_done(result, error)
        except BaseException:
            logger.exception("ezrt: a completion handler raised; the task is still complete")

    # ------------------------------------------------------------------ delivery

    def _take_ready(self) -> List[Tuple[Task, Any, Optional[BaseException]]]:
        """Every completion deliverable now, in order when sequential (lock held)."""
        if self._order_abandoned and self._ready:
            items = [self._ready.pop(seq) for seq in sorted(self._ready)]
            self._next_delivery = items[-1][0].seq + 1
            items.extend(self._ready_fifo)
            self._ready_fifo.clear()
            return items
        if not self.config.sequential:
            items = list(self._ready_fifo)
            self._ready_fifo.clear()
            return items
        items = []
        ready = self._ready
        while self._next_delivery in ready:
            items.append(ready.pop(self._next_delivery))
            self._next_delivery += 1
        return items

    def _delivery_main(self) -> None:
        """The callback thread: deliver in order, one wake-up for everything that is ready."""
        lock = self._lock
        while True:
            with lock:
                items = self._take_ready()
                while not items:
                    if self._stopping and (self._live_workers == 0 or self._order_abandoned):
                        if not self._ready:
                            break
                        # A gap in the sequence cannot happen; never strand results if it did.
                        logger.error("ezrt: delivery order gap at %d", self._next_delivery)
                        self._next_delivery = min(self._ready)
                    else:
                        self._delivery_waiting = True
                        self._ready_cv.wait()
                        self._delivery_waiting = False
                    items = self._take_ready()
            if not items:
                break
            for task, result, error in items:
                try:
                    task.on_done(result, error)
                except BaseException:
                    logger.exception("ezrt: a run_async callback raised; delivery continues")
            delivered_at = time.monotonic()
            with lock:
                for task, _, _ in items:
                    if task.finished_at:  # 0: never ran (cancelled, dropped, expired)
                        self._delivery.add(delivered_at - task.finished_at)
                self._undelivered -= len(items)
                if self._space_waiters:
                    self._space.notify_all()
        if self._on_stopped is not None:
            try:
                self._on_stopped()
            except Exception:
                logger.exception("ezrt: releasing the backend failed")

    # ------------------------------------------------------------------ introspection

    def stats(self) -> SessionStats:
        """A consistent snapshot of counters, depths and latency histograms."""
        self._check_usable()
        with self._lock:
            return SessionStats(
                **self.counts,
                queued=self._queued,
                running=sum(self._busy),
                undelivered=self._undelivered,
                uptime_seconds=time.monotonic() - self._started_at,
                queue_wait=self._queue_wait.snapshot(),
                compute=self._compute.snapshot(),
                delivery=self._delivery.snapshot(),
                worker_busy_seconds=dict(self._busy_seconds),
            )


#: At interpreter exit, how long unclosed sessions may drain before the rest is cancelled.
EXIT_DRAIN_SECONDS = 5.0


def _close_all_at_exit() -> None:
    """At interpreter exit: drain unclosed sessions (queues are short), then cancel the rest.

    Every accepted task is delivered either way: run, or failed with SessionClosedError.
    """
    engines = [engine for engine in list(_live_engines) if not engine._forked]
    for engine in engines:
        engine.close(wait=False)  # stop admission everywhere first
    deadline = time.monotonic() + EXIT_DRAIN_SECONDS
    for engine in engines:
        if engine.close(wait=True, timeout=max(0.0, deadline - time.monotonic())):
            continue
        logger.warning("ezrt: a session did not drain at exit; cancelling its queued tasks")
        if not engine.close(cancel=True, wait=True, timeout=EXIT_DRAIN_SECONDS):
            logger.warning("ezrt: tasks still running at exit are abandoned (reported as failed)")
            engine._abandon()
            engine.close(wait=True, timeout=EXIT_DRAIN_SECONDS)


def _poison_after_fork() -> None:
    for engine in list(_live_engines):
        engine._forked = True


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_poison_after_fork)
