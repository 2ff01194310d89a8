"""The engine: bounded admission, per-core dispatch, worker threads, ordered delivery.

It knows nothing of models or backends. A task is an opaque ``payload`` handed to a
:class:`Runner` (one per worker thread, made in that thread) and a completion function
called exactly once with ``(result, None)`` or ``(None, error)``.

Two kinds of completion:

* **delivered** (``run_async`` callbacks): handed to the single callback thread, in
  submission order when ``sequential``.
* **direct** (``run``, pipelines, futures): called on the worker thread that finished the
  task. Nothing waits for the callback thread, so a callback may call ``run`` safely and a
  synchronous ``run`` pays no extra thread hop.

Data flow and its primitives. The hot path uses only ``queue.SimpleQueue`` and
``collections.deque`` operations, which are atomic C calls: a thread cannot lose the GIL
half-way through one, so no thread ever sleeps on a lock held by a thread that is itself
waiting for the GIL, and every wait is a single C-level wait. On a small model the cost
per task is set by thread wake-ups and by the Python that runs between them, so the hot
path keeps both to a minimum (one wake-up per hand-off, issued just before the waker
releases the GIL).

* **Admission tokens.** ``_slots`` holds ``max_queue_size`` tokens: a task takes one to be
  queued and gives it back when a worker starts it (or it is withdrawn). ``_stage`` holds
  ``max_queue_size + workers + max_undelivered`` tokens: a delivered task holds one from
  admission until its callback has returned, so with the queue full and every worker busy
  at most ``max_undelivered`` finished results wait for the callback thread. A blocked
  submitter sleeps in ``SimpleQueue.get`` and wakes as soon as a token is given back, or
  at its deadline. ``close()`` puts ``_CLOSED`` in both pools; each waiter that takes it
  passes it on and raises.
* **Acceptance.** ``_lock`` serialises the moment of acceptance: the closed check, the
  delivery sequence number, pacing, the route choice and the append to the route queue.
  ``close()`` takes it to stop admission and append one ``_STOP`` per worker after every
  accepted task. It is never held while waiting.
* **Dispatch.** Per route: a ``deque`` of tasks and a ``SimpleQueue`` "bell" with at least
  one item per queued task. A worker waits on its bell, then claims a task with
  ``popleft``. Cancelling, expiry and ``close(cancel=True)`` claim with ``remove`` or
  ``popleft`` on the same deque, so exactly one party gets each queued task.
* **Running.** ``_running[worker index]`` holds the task being run; the worker claims its
  outcome back with ``dict.pop``. Only :meth:`_abandon` (interpreter exit with a task that
  never finishes) competes for it; a late result is then ignored.
* **Delivery.** Finished delivered tasks go to ``_done``; the callback thread alone owns
  the reordering buffer and takes everything ready per wake-up.
* **Statistics.** Each worker and the callback thread record into their own
  :class:`_Ledger`; events on other threads (timeouts, drops, cancels, expiry, close)
  record into a shared one under ``_stats_lock``, which also guards the live-worker
  count. :meth:`Engine.stats` merges them.
* **Deadlines.** ``_expiry_cv`` (its own lock) guards the deadline heap; the expiry
  thread withdraws a task through the same deque claim as ``cancel``.

Threads owned by the engine never wait for the engine in a way that could depend on
themselves: a worker thread that submits never blocks (it fails at once with
:class:`ReentrancyError` when there is no room), and the callback thread may wait for a
queue slot (workers free those) but never for a callback-stage token (only it frees those).
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import logging
import os
import queue
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
_Finished = Tuple["Task", Any, Optional[BaseException]]

_STOP = object()  # in a route queue: the worker that takes it exits
_WAKE = object()  # in the done queue: the callback thread re-checks whether it may stop
_CLOSED = object()  # in a token pool: the session closed; a waiter passes it on and raises
_TOKEN = True  # in a token pool: room for one task


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

    @property
    def workers(self) -> int:
        return self.threads_per_core * len(self.routes)


class Task:
    """One accepted unit of work. Who completes it is decided by the claims described in
    the module docstring, never by this object's fields."""

    __slots__ = (
        "delivered",
        "expires_at",
        "finished_at",
        "on_done",
        "on_start",
        "payload",
        "route",
        "seq",
        "started",
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
        self.seq = -1  # delivery order, for delivered tasks
        self.started = False  # left the queue (a hint for pruning the deadline heap only)
        self.submitted_at = 0.0  # time.monotonic() at admission (before: when its wait began)
        self.finished_at = 0.0  # time.monotonic() when the backend returned


_OUTCOMES = ("completed", "failed", "dropped", "cancelled", "expired")


def _outcome_of(error: Optional[BaseException]) -> str:
    if error is None:
        return "completed"
    if isinstance(error, PacingDropError):
        return "dropped"
    if isinstance(error, SessionClosedError):
        return "cancelled"
    if isinstance(error, DeadlineExceededError):
        return "expired"
    return "failed"


class _Ledger:
    """Counts and latencies written by one thread (or under ``_stats_lock``).

    A worker's ``queue_wait`` holds one entry per task it took from its queue, and its
    ``compute`` total is its busy time.
    """

    __slots__ = (
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
        self.counts = dict.fromkeys(_OUTCOMES, 0)
        self.withdrawn = 0  # tasks taken from a queue by cancel, expiry or close
        self.to_deliver = 0  # outcomes handed to the callback thread
        self.delivered = 0  # outcomes the callback thread has delivered
        self.timed_out = 0
        self.queue_wait = Histogram()
        self.compute = Histogram()
        self.delivery = Histogram()

    def note(self, task: Task, error: Optional[BaseException]) -> None:
        self.counts[_outcome_of(error)] += 1
        if task.delivered:
            self.to_deliver += 1


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
        n_routes = len(self._routes)
        route_index = {core: i for i, core in enumerate(self._routes)}
        # Round robin walks the user's schedule (duplicates weight it), as route indices.
        self._rr_routes = [route_index[core] for core in config.schedule]
        self._rr_next = 0
        self._weights = [config.schedule.count(core) for core in self._routes]
        n_workers = config.workers
        self._route_workers = [list(range(r, n_workers, n_routes)) for r in range(n_routes)]

        # Admission (see the module docstring for each primitive's job).
        self._slots: queue.SimpleQueue[object] = queue.SimpleQueue()
        for _ in range(config.max_queue_size):
            self._slots.put(_TOKEN)
        self._stage: queue.SimpleQueue[object] = queue.SimpleQueue()
        for _ in range(config.max_queue_size + n_workers + config.max_undelivered):
            self._stage.put(_TOKEN)
        self._lock = threading.Lock()
        self._stopping = False
        self._pacing = config.pacing
        self._single_route = n_routes == 1
        self._submitted = 0  # these four: written under _lock
        self._enqueued = 0
        self._next_seq = 0
        self._last_accepted = 0.0  # pacing: when the last task was accepted
        self._avg_compute = 0.0  # pacing: moving average of compute time (workers write)
        # Dispatch, running, delivery.
        self._queues: List[Deque[Any]] = [deque() for _ in self._routes]
        self._bells: List[queue.SimpleQueue[object]] = [queue.SimpleQueue() for _ in self._routes]
        self._running: Dict[int, Task] = {}
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._abandoned = False  # interpreter exit gave up on running tasks
        # Deadlines: a heap of (expires_at, tiebreak, task) served by a thread started on
        # first use; it fails queued tasks at their deadline even when no worker frees.
        self._expiry_cv = threading.Condition(threading.Lock())
        self._expiries: List[Tuple[float, int, Task]] = []
        self._expiry_tiebreak = itertools.count()
        self._expiry_thread: Optional[threading.Thread] = None
        # Statistics and the live-worker count.
        self._stats_lock = threading.Lock()
        self._shared = _Ledger()
        self._ledgers = [_Ledger() for _ in range(n_workers)]
        self._delivery_ledger = _Ledger()
        self._live_workers = 0
        self._started_at = time.monotonic()
        self._forked = False

        self._reports: queue.SimpleQueue[Optional[BaseException]] = queue.SimpleQueue()
        self._worker_threads: List[threading.Thread] = []
        self._worker_idents: Set[int] = set()
        for i in range(n_workers):
            route = i % n_routes
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
        for thread in self._worker_threads:
            thread.start()
        # Each worker reports once: None (its runner is made) or the exception.
        reports = [self._reports.get() for _ in self._worker_threads]
        failed = [report for report in reports if report is not None]
        if failed:
            self._abort_start()
            raise failed[0]
        self._delivery_thread.start()
        self._delivery_ident = self._delivery_thread.ident

    def _abort_start(self) -> None:
        with self._lock:
            self._stopping = True
            self._append_stops()
        for thread in self._worker_threads:
            thread.join()
        if self._on_stopped is not None:
            self._on_stopped()

    def _append_stops(self) -> None:
        """One stop marker per worker, after everything queued (``_lock`` held)."""
        for route, workers in enumerate(self._route_workers):
            for _ in workers:
                self._queues[route].append(_STOP)
                self._bells[route].put(_TOKEN)

    @property
    def closed(self) -> bool:
        return self._stopping

    def close(
        self, *, cancel: bool = False, wait: bool = True, timeout: Optional[float] = None
    ) -> bool:
        """Stop accepting tasks; drain (default) or cancel what is queued; join the threads.

        Cancelled tasks complete with :class:`SessionClosedError`. Running tasks always finish.
        Returns True when every thread has exited (always, with ``wait`` and no ``timeout``).
        Safe to call from any thread and more than once. From the callback thread it does
        not wait for that thread itself; from a worker thread it does not wait at all (the
        threads cannot all stop while this one is inside a task).
        """
        if self._forked:
            # In a fork child the threads do not exist and a lock may have been copied
            # while held: there is nothing to stop, and touching a lock could hang.
            return True
        withdrawn: List[Task] = []
        with self._lock:
            first = not self._stopping
            self._stopping = True
            if cancel:
                for tasks in self._queues:
                    while True:
                        try:
                            task = tasks.popleft()
                        except IndexError:
                            break
                        if task is not _STOP:
                            withdrawn.append(task)
            if first or cancel:  # cancelling may have taken an earlier close's markers
                self._append_stops()
        if first:
            self._slots.put(_CLOSED)
            self._stage.put(_CLOSED)
            with self._expiry_cv:
                self._expiry_cv.notify_all()
        if withdrawn:
            error = SessionClosedError("task cancelled: the session was closed before it ran")
            with self._stats_lock:
                self._shared.withdrawn += len(withdrawn)
                for task in withdrawn:
                    self._shared.note(task, error)
            for task in withdrawn:
                self._hand_over(task, None, error)
        self._done.put(_WAKE)
        if not wait or threading.get_ident() in self._worker_idents:
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
        if self._forked:
            self._check_usable()
        if expires_at is not None and delivered:
            raise ValueError("deadlines are for directly completed tasks")
        task = Task(payload, on_done, delivered, on_start, expires_at)
        # Room first: a place on the callback stage (run_async only), then a queue slot.
        # (Delivered tasks have no deadline, so taking the stage place cannot return False.)
        stage, slots = self._stage, self._slots
        if delivered:
            self._take(stage, task, what, wait, timeout)
        try:
            admitted = self._take(slots, task, what, wait, timeout)
        except BaseException:
            if delivered:
                stage.put(_TOKEN)
            raise
        if not admitted:  # its own deadline passed while it waited for room
            self._fail_unqueued(task, self._expired_error(task, time.monotonic()))
            return task
        # Acceptance.
        failure: Optional[PacingDropError] = None
        with self._lock:
            closed = self._stopping
            if not closed:
                self._submitted += 1
                task.submitted_at = now = time.monotonic()
                if delivered:
                    task.seq = self._next_seq
                    self._next_seq += 1
                if self._pacing and self._avg_compute > 0.0:
                    failure = self._pacing_drop(what, now)
                if failure is None:
                    self._last_accepted = now
                    task.route = route = 0 if self._single_route else self._pick_route()
                    self._enqueued += 1
                    self._queues[route].append(task)
                    self._bells[route].put(_TOKEN)
                    if expires_at is None:
                        return task
        if closed:  # while this task waited for room
            slots.put(_TOKEN)
            if delivered:
                stage.put(_TOKEN)
            raise SessionClosedError(f"{what} rejected: the session is closed")
        if failure is not None:
            slots.put(_TOKEN)  # never queued; a delivered task keeps its stage token
            self._fail_unqueued(task, failure, counted=True)
        else:
            self._arm_expiry(task)
        return task

    def _fail_unqueued(self, task: Task, error: EzrtError, *, counted: bool = False) -> None:
        """Complete a task that was accepted but never queued (dropped or expired)."""
        if not counted:
            with self._lock:
                self._submitted += 1
        with self._stats_lock:
            self._shared.note(task, error)
        self._hand_over(task, None, error)

    def _take(
        self,
        pool: queue.SimpleQueue[object],
        task: Task,
        what: str,
        wait: bool,
        timeout: Optional[float],
    ) -> bool:
        """Take a token from ``pool``, at once when there is one, else after a wait (GIL
        released). False when the task's own deadline passed first.

        Raises when closed, when waiting is not allowed or could deadlock, or at the
        timeout. The wait for both pools is one wait: its start is kept in
        ``task.submitted_at`` until the task is accepted.
        """
        try:
            token: object = None if pool.empty() else pool.get(False)
        except queue.Empty:  # another submitter took the last one meanwhile
            token = None
        if token is None:
            if not wait:
                raise PipelineFullError(
                    f"{what} rejected: async queue/callback pipeline is full ({self._depths()})"
                )
            ident = threading.get_ident()
            on_worker = ident in self._worker_idents
            if on_worker or (pool is self._stage and ident == self._delivery_ident):
                raise ReentrancyError(
                    f"{what} called from an ezrt {'worker' if on_worker else 'callback'} "
                    "thread while the pipeline is full: waiting would depend on this "
                    "thread itself. Submit from another thread, or raise max_queue_size."
                )
            if not task.submitted_at:
                task.submitted_at = time.monotonic()
            since = task.submitted_at
            until = since + (self.config.submit_timeout_s if timeout is None else timeout)
            if task.expires_at is not None:
                until = min(until, task.expires_at)
            while token is None:
                try:
                    token = pool.get(True, max(0.0, until - time.monotonic()))
                except queue.Empty:
                    now = time.monotonic()
                    if now < until:  # a timed wait may return a hair early: wait the rest
                        continue
                    if task.expires_at is not None and now >= task.expires_at:
                        return False
                    with self._stats_lock:
                        self._shared.timed_out += 1
                    raise SubmitTimeoutError(
                        f"{what} submit timed out: async queue/callback pipeline is "
                        f"saturated (waited {1000 * (now - since):.0f} ms; {self._depths()})"
                    ) from None
        if token is _CLOSED:
            pool.put(_CLOSED)  # pass it on to the next waiter
            raise SessionClosedError(f"{what} rejected: the session is closed")
        return True

    def _depths(self) -> str:
        stats = self.stats()
        return f"{stats.queued} queued, {stats.undelivered} results awaiting callbacks"

    def _pacing_drop(self, what: str, now: float) -> Optional[PacingDropError]:
        """The pacing verdict for a task arriving now (``_lock`` held)."""
        interval = self._avg_compute / len(self._routes)
        gap = now - self._last_accepted
        if gap >= interval:
            return None
        return PacingDropError(
            f"{what}: dropped by pacing (arrived {1000 * gap:.2f} ms after the last "
            f"accepted task; the cores take one every {1000 * interval:.2f} ms)"
        )

    def _pick_route(self) -> int:
        """Choose the route for a new task among several (``_lock`` held)."""
        if self.config.dispatch_policy == "round_robin":
            route = self._rr_routes[self._rr_next]
            self._rr_next = (self._rr_next + 1) % len(self._rr_routes)
            return route
        # least_loaded: fewest queued + running tasks per unit of schedule weight.
        running = self._running
        loads = [
            (len(self._queues[r]) + sum(1 for i in workers if i in running)) / self._weights[r]
            for r, workers in enumerate(self._route_workers)
        ]
        return loads.index(min(loads))

    @staticmethod
    def _expired_error(task: Task, now: float) -> DeadlineExceededError:
        late = 1000 * (now - (task.expires_at or now))
        return DeadlineExceededError(
            f"deadline exceeded: the task did not start in time ({late:.1f} ms past its deadline)"
        )

    def _arm_expiry(self, task: Task) -> None:
        """Register a queued task's deadline with the expiry thread."""
        assert task.expires_at is not None
        with self._expiry_cv:
            heap = self._expiries
            while heap and heap[0][2].started:  # keep the heap about as long as the queue
                heapq.heappop(heap)
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
            due: List[Task] = []
            with self._expiry_cv:
                while not self._stopping:
                    now = time.monotonic()
                    heap = self._expiries
                    while heap and (heap[0][0] <= now or heap[0][2].started):
                        due.append(heapq.heappop(heap)[2])
                    if due:
                        break
                    self._expiry_cv.wait(heap[0][0] - now if heap else None)
            if not due:
                return  # closing: workers fail stale tasks as they reach them
            now = time.monotonic()
            for task in due:
                if not task.started and self._withdraw(task):
                    error = self._expired_error(task, now)
                    with self._stats_lock:
                        self._shared.note(task, error)
                    self._hand_over(task, None, error)

    def _withdraw(self, task: Task) -> bool:
        """Claim a queued task for cancel or expiry: False if a worker (or close) took it."""
        try:
            self._queues[task.route].remove(task)
        except ValueError:
            return False
        with contextlib.suppress(queue.Empty):
            self._bells[task.route].get(False)  # its bell item, unless a worker holds it
        task.started = True
        self._slots.put(_TOKEN)
        with self._stats_lock:
            self._shared.withdrawn += 1
        return True

    def cancel(self, task: Task) -> bool:
        """Withdraw a task that no worker has started. Its completion is not called."""
        if task.delivered or not self._withdraw(task):
            return False
        task.payload = None
        with self._stats_lock:
            self._shared.counts["cancelled"] += 1
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
        try:
            runner = make_runner(self._routes[route], index)
        except BaseException as exc:  # report to the constructor, which re-raises it
            self._reports.put(exc)
            return
        ident = threading.get_ident()
        self._worker_idents.add(ident)
        with self._stats_lock:
            self._live_workers += 1
        self._reports.put(None)
        tasks, bell, slots, running = (
            self._queues[route],
            self._bells[route],
            self._slots,
            self._running,
        )
        ledger = self._ledgers[index]
        counts = ledger.counts
        record_wait, record_compute = ledger.queue_wait.add, ledger.compute.add
        run = runner.run
        done = self._done
        pacing = self.config.pacing
        monotonic = time.monotonic
        # A delivered outcome not yet handed to the callback thread. Threads this worker
        # wakes (a submitter waiting for a slot, the callback thread) are woken just before
        # it releases the GIL, to run the next task or to wait for one, so that they do not
        # wake into a GIL that it still holds.
        pending: Optional[_Finished] = None
        try:
            while True:
                if pending is None:
                    bell.get()
                else:
                    try:
                        bell.get(False)
                    except queue.Empty:  # about to wait: hand the last outcome over first
                        done.put(pending)
                        pending = None
                        bell.get()
                try:
                    task = tasks.popleft()
                except IndexError:
                    continue  # the task this bell item announced was withdrawn meanwhile
                if task is _STOP:
                    break
                task.started = True
                started = monotonic()
                record_wait(started - task.submitted_at)
                slots.put(_TOKEN)  # a slot frees as the task leaves the queue
                if task.expires_at is not None or task.on_start is not None:
                    if pending is not None:  # _begin may run user code (future callbacks)
                        done.put(pending)
                        pending = None
                    if not self._begin(task, ledger, started):
                        continue
                running[index] = task
                if pending is not None:
                    done.put(pending)
                    pending = None
                try:
                    result, error = run(task.payload), None
                except BaseException as exc:  # a task's failure is its result, never the worker's
                    result, error = None, exc
                task.finished_at = finished = monotonic()
                record_compute(finished - started)
                if pacing:  # racing workers may lose an update: harmless for an average
                    avg, compute = self._avg_compute, finished - started
                    self._avg_compute = compute if avg == 0.0 else 0.95 * avg + 0.05 * compute
                if running.pop(index, None) is None:
                    continue  # abandoned at interpreter exit: it was already reported failed
                # What _hand_over does, inline: this is the hot path.
                counts["completed" if error is None else _outcome_of(error)] += 1
                task.payload = None
                if task.delivered:
                    ledger.to_deliver += 1
                    pending = (task, result, error)
                else:
                    self._call(task, result, error)
        finally:
            if pending is not None:
                done.put(pending)
            self._worker_idents.discard(ident)
            try:
                runner.close()
            except Exception:
                logger.exception("ezrt: closing a backend worker failed")
            with self._stats_lock:
                self._live_workers -= 1
            self._done.put(_WAKE)

    def _begin(self, task: Task, ledger: _Ledger, now: float) -> bool:
        """Last checks on a claimed task: False if it must not run (expired or withdrawn)."""
        if task.expires_at is not None and now > task.expires_at:
            error = self._expired_error(task, now)
            ledger.note(task, error)
            self._hand_over(task, None, error)
            return False
        if task.on_start is not None:
            try:
                proceed = task.on_start()
            except Exception:
                logger.exception("ezrt: a task's start hook raised; the task is skipped")
                proceed = False
            if not proceed:
                task.payload = None
                ledger.counts["cancelled"] += 1
                return False
        return True

    def _hand_over(self, task: Task, result: Any, error: Optional[BaseException]) -> None:
        """Complete a task whose outcome this thread has claimed (and counted)."""
        task.payload = None  # the inputs are no longer needed; do not keep them alive
        if task.delivered:
            self._done.put((task, result, error))
        else:
            self._call(task, result, error)

    def _abandon(self) -> None:
        """Interpreter exit only, after drain and cancel timed out: tasks still running will
        not finish. Fail them now (their late results are ignored) and let the callback
        thread finish without waiting for their workers."""
        error = SessionClosedError("task abandoned: still running when the interpreter exited")
        self._abandoned = True
        for index in list(self._running):
            task = self._running.pop(index, None)
            if task is None:
                continue  # it finished meanwhile and its worker reported it
            with self._stats_lock:
                self._shared.note(task, error)
            self._hand_over(task, None, error)
        self._done.put(_WAKE)

    @staticmethod
    def _call(task: Task, result: Any, error: Optional[BaseException]) -> None:
        try:
            task.on_done(result, error)
        except BaseException:
            logger.exception("ezrt: a completion handler raised; the task is still complete")

    # ------------------------------------------------------------------ delivery

    def _delivery_main(self) -> None:
        """The callback thread: deliver in order, one wake-up for everything that is ready."""
        done, stage = self._done, self._stage
        ledger = self._delivery_ledger
        record = ledger.delivery.add
        sequential = self.config.sequential
        early: Dict[int, _Finished] = {}  # finished before an earlier task (sequential only)
        next_seq = 0
        monotonic = time.monotonic
        while True:
            arrived = [done.get()]
            while not done.empty():  # this thread is the only consumer: get() cannot block
                arrived.append(done.get())
            ready: List[_Finished] = []
            for item in arrived:
                if item is _WAKE:
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
                except BaseException:
                    logger.exception("ezrt: a run_async callback raised; delivery continues")
                if task.finished_at:  # 0: it never ran (cancelled, dropped, expired)
                    record(monotonic() - task.finished_at)
                ledger.delivered += 1
                stage.put(_TOKEN)
            if (
                self._stopping
                and ledger.delivered == self._next_seq
                and (self._live_workers == 0 or self._abandoned)
            ):
                break
        if self._on_stopped is not None:
            try:
                self._on_stopped()
            except Exception:
                logger.exception("ezrt: releasing the backend failed")

    # ------------------------------------------------------------------ introspection

    def stats(self) -> SessionStats:
        """A snapshot of counters, depths and latency histograms.

        Every figure is exact once the session is idle; while tasks are moving, figures
        recorded by different threads may be a few tasks apart.
        """
        self._check_usable()
        ledgers = [*self._ledgers, self._delivery_ledger]
        with self._stats_lock:
            shared = self._shared
            counts = dict(shared.counts)
            withdrawn, to_deliver, timed_out = shared.withdrawn, shared.to_deliver, shared.timed_out
        for ledger in ledgers:
            for key, count in list(ledger.counts.items()):
                counts[key] += count
            to_deliver += ledger.to_deliver
        queue_wait = compute = Histogram().snapshot()
        busy: Dict[str, float] = {}
        for thread, ledger in zip(self._worker_threads, self._ledgers):
            queue_wait = queue_wait.merge(ledger.queue_wait.snapshot())
            mine = ledger.compute.snapshot()
            busy[thread.name] = mine.total
            compute = compute.merge(mine)
        delivered = self._delivery_ledger.delivered
        with self._lock:  # read after the ledgers, so that queued is never negative
            submitted, enqueued = self._submitted, self._enqueued
        return SessionStats(
            submitted=submitted,
            timed_out=timed_out,
            **counts,
            queued=max(0, enqueued - queue_wait.count - withdrawn),
            running=len(self._running),
            undelivered=max(0, to_deliver - delivered),
            uptime_seconds=time.monotonic() - self._started_at,
            queue_wait=queue_wait,
            compute=compute,
            delivery=self._delivery_ledger.delivery.snapshot(),
            worker_busy_seconds=busy,
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
