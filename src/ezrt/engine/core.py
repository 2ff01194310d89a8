"""The engine: bounded admission, per-core dispatch, worker threads, ordered delivery.

It knows nothing of models or backends. A task is an opaque ``payload`` handed to a
:class:`~ezrt.engine.workers.Runner` (one per worker thread, made in that thread) and a
completion called exactly once with ``(result, None)`` or ``(None, error)``.

Two kinds of completion:

* **delivered** (``run_async`` callbacks): handed to the single callback thread, in
  submission order when ``sequential``.
* **direct** (``run``, pipelines, futures): called on the worker thread that finished the
  task. Nothing waits for the callback thread, so a callback may call ``run`` safely and a
  synchronous ``run`` pays no extra thread hop.

Rooms, in the order a task meets them (each module's docstring says what its primitives do):

* ``admission``: token pools bound what is queued and what awaits delivery;
* ``dispatch``: acceptance under one small lock, per-route queues, routing, pacing;
* ``deadlines``: an expiry thread fails queued tasks at their deadline;
* ``workers``: worker threads run tasks on their runners;
* ``batching``: with ``max_batch_size`` > 1, a worker runs compatible queued tasks as one;
* ``delivery``: the callback thread delivers in order;
* ``task``: the one completion path, :func:`~ezrt.engine.task.finish`;
* ``ledger``: per-thread statistics and their merge;
* ``lifetime``: interpreter exit and fork.

Claims (exactly once). A queued task belongs to whoever removes it from its route's deque
first: a worker (``popleft``), ``cancel`` or expiry (``remove``), ``close(cancel=True)``. A
running task belongs to whoever pops it from ``running``: the worker, or :meth:`abandon`
at interpreter exit. The claimant completes it through ``finish``.

Threads owned by the engine never wait for the engine in a way that could depend on
themselves: a worker thread that submits never blocks (it fails at once with
:class:`ReentrancyError` when there is no room), and the callback thread may wait for a
queue slot (workers free those) but never for a callback-stage token (only it frees those).
All the hot-path primitives are ``SimpleQueue`` and ``deque`` operations, atomic C calls:
no thread sleeps on a lock held by a thread that is itself waiting for the GIL.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import DeadlineExceededError, EzrtError, ReentrancyError, SessionClosedError
from . import lifetime
from .admission import Admission, ThreadRoles
from .batching import Batcher, BatchPolicy
from .deadlines import Deadlines, expired_error
from .delivery import Delivery
from .dispatch import Dispatcher, Pacing
from .ledger import Ledger, SharedLedger, in_flight, snapshot
from .metrics import SessionStats
from .task import Completion, Task, finish
from .workers import Crew, Liveness, Runner, RunnerFactory, WorkerPool

__all__ = ["Engine", "EngineConfig", "Runner", "RunnerFactory", "Task"]

INLINE = object()  # in ``running``: a waiting caller runs its task on its own thread


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
    #: Dynamic batching: the most tasks one run takes (1: off), and how long a worker
    #: holding fewer waits for more (seconds).
    max_batch_size: int = 1
    batch_timeout_s: float = 0.0

    @property
    def routes(self) -> Tuple[Optional[int], ...]:
        """Distinct cores that get workers, sorted; ``(None,)`` when unscheduled."""
        distinct = set(self.schedule)
        if None in distinct:
            return (None,)
        return tuple(sorted(distinct))  # type: ignore[type-var]

    @property
    def workers(self) -> int:
        """How many worker threads."""
        return self.threads_per_core * len(self.routes)


class Engine:
    """Wires the stages together; submit, cancel, close and stats are its whole surface."""

    def __init__(
        self,
        config: EngineConfig,
        make_runner: RunnerFactory,
        on_stopped: Optional[Callable[[], None]] = None,
        batcher: Optional[Batcher] = None,
    ) -> None:
        self.config = config
        self._on_stopped = on_stopped
        routes = list(config.routes)
        n_workers = config.workers
        route_workers = [list(range(r, n_workers, len(routes))) for r in range(len(routes))]
        self._started_at = time.monotonic()
        self.forked = False  # set in a fork child: the threads do not exist there
        self._abandoned = False  # interpreter exit gave up on running tasks
        self._roles = ThreadRoles()
        self._running: Dict[int, Any] = {}  # a worker's task, or its batch
        self._shared = SharedLedger()
        self._ledgers = [Ledger() for _ in range(n_workers)]
        self._dispatch = Dispatcher(
            config.schedule,
            routes,
            route_workers,
            config.dispatch_policy,
            Pacing(len(routes)) if config.pacing else None,
            self._running,
        )
        self._admission = Admission(
            config.max_queue_size,
            config.max_queue_size + n_workers + config.max_undelivered,
            config.submit_timeout_s,
            self._roles,
            self._shared,
            self._depths,
        )
        self._live = Liveness()
        self._workers_count = n_workers
        self._delivery = Delivery(
            config.name,
            config.sequential,
            self._admission.stage.give,
            Ledger(),
            self._all_delivered,
            on_stopped,
        )
        self._deadlines = Deadlines(
            config.name, self._withdraw, self._expire, lambda: self._dispatch.closed
        )
        crew = Crew(
            make_runner=make_runner,
            roles=self._roles,
            reports=queue.SimpleQueue(),
            free_slot=self._admission.slots.give,
            running=self._running,
            idle=self._dispatch.idle,
            deliver=self._delivery.put,
            pacing=self._dispatch.pacing,
            live=self._live,
            on_exit=self._delivery.wake,
            batching=(
                BatchPolicy(batcher, config.max_batch_size, config.batch_timeout_s)
                if batcher is not None and config.max_batch_size > 1
                else None
            ),
        )
        self._workers = WorkerPool(
            crew, config.name, routes, self._dispatch.queues, self._dispatch.bells, self._ledgers
        )
        failure = self._workers.start()
        if failure is not None:
            self._dispatch.stop(cancel=False)
            self._workers.join()
            if on_stopped is not None:
                on_stopped()
            raise failure
        self._delivery.thread.start()
        self._roles.delivery = self._delivery.thread.ident
        lifetime.register(self)

    # ------------------------------------------------------------------ submission

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
        if self.forked:
            self._check_usable()
        if expires_at is not None and delivered:
            raise ValueError("deadlines are for directly completed tasks")
        task = Task(payload, on_done, delivered, on_start, expires_at)
        # Room first: both tokens at once when there are (the hot path), else the wait.
        admitted = self._admission.take_now(delivered) or self._admit(task, what, wait, timeout)
        if not admitted:  # its deadline passed while waiting
            self._dispatch.count_unqueued()
            self._complete(task, None, expired_error(task, time.monotonic()))
            return task
        try:
            queued, dropped = self._dispatch.accept(task, what, time.monotonic())
        except SessionClosedError:  # closed while this task waited for room
            self._admission.slots.give()
            if delivered:
                self._admission.stage.give()
            raise
        if not queued:
            self._admission.slots.give()  # never queued; a delivered task keeps its stage token
            self._complete(task, None, dropped)
        elif expires_at is not None:
            self._deadlines.arm(task)
        return task

    def run_inline(
        self,
        payload: Any,
        run: Callable[[Any], Any],
        run_alone: Optional[Callable[[Any], Any]] = None,
    ) -> Tuple[bool, Any]:
        """Run a waiting caller's task on its own thread when a worker's place is free
        (nothing queued, fewer tasks running than there are workers): (True, result), or
        (False, None) when the task must be submitted. No thread hop for a ``run``; its
        failure is raised. With the engine idle it runs on ``run_alone`` when given.

        An inline run counts as running while it lasts (``stats().running``; a worker
        starting meanwhile does not take the whole machine, and callers beyond the number
        of workers queue for them), and as completed or failed.
        """
        if self.forked:
            self._check_usable()
        dispatch, running = self._dispatch, self._running
        key = -threading.get_ident()  # beside the workers' indices (0, 1, ...)
        with dispatch.lock:
            if dispatch.closed or len(running) >= self._workers_count or any(dispatch.queues):
                return False, None
            if run_alone is not None and dispatch.idle():
                run = run_alone
            running[key] = INLINE
            dispatch.submitted += 1
        started = time.monotonic()
        error: Optional[BaseException] = None
        try:
            return True, run(payload)
        except BaseException as exc:
            error = exc
            raise
        finally:
            running.pop(key, None)
            self._shared.note_inline(time.monotonic() - started, error)

    def has_room(self) -> bool:
        """A hint: a direct task submitted now would likely be queued without waiting."""
        return self._admission.slots.available()

    def _admit(self, task: Task, what: str, wait: bool, timeout: Optional[float]) -> bool:
        """Room first: a place on the callback stage (delivered tasks only), then a queue
        slot. False when the task's deadline passed first (delivered tasks have none)."""
        admission = self._admission
        if task.delivered:
            admission.take(admission.stage, task, what, wait, timeout)
        try:
            return admission.take(admission.slots, task, what, wait, timeout)
        except BaseException:
            if task.delivered:
                admission.stage.give()
            raise

    def _complete(self, task: Task, result: Any, error: Optional[BaseException]) -> None:
        """Complete a task claimed off the engine's threads (counted in the shared ledger)."""
        outcome = finish(task, result, error, self._shared)
        if outcome is not None:
            self._delivery.put(outcome)

    def _withdraw(self, task: Task) -> bool:
        """Claim a queued task for cancel or expiry: False if a worker (or close) took it."""
        if not self._dispatch.withdraw(task):
            return False
        self._admission.slots.give()
        self._shared.add_withdrawn()
        return True

    def _expire(self, task: Task, error: DeadlineExceededError) -> None:
        self._complete(task, None, error)

    def cancel(self, task: Task) -> bool:
        """Withdraw a task that no worker has started. Its completion is not called."""
        if task.delivered or not self._withdraw(task):
            return False
        task.payload = None
        self._shared.add_cancelled()
        return True

    def assert_may_block(self, what: str) -> None:
        """Raise if the calling thread is a worker: waiting there could wait on itself."""
        if self._roles.on_worker():
            raise ReentrancyError(
                f"{what} cannot block on an ezrt worker thread (it may be the worker that "
                "must run the task); call it from another thread"
            )

    def _check_usable(self) -> None:
        if self.forked:
            raise EzrtError(
                "this session was created before os.fork(); its threads do not exist in this "
                "child process. Create a new InferenceSession in the child."
            )

    # ------------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        """True once ``close()`` has begun."""
        return self._dispatch.closed

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
        if self.forked:
            # In a fork child the threads do not exist and a lock may have been copied
            # while held: there is nothing to stop, and touching a lock could hang.
            return True
        first, withdrawn = self._dispatch.stop(cancel)
        if first:
            self._admission.close()
            self._deadlines.wake()
        if withdrawn:
            self._shared.add_withdrawn(len(withdrawn))
            error = SessionClosedError("task cancelled: the session was closed before it ran")
            for task in withdrawn:
                self._complete(task, None, error)
        self._delivery.wake()
        if not wait or self._roles.on_worker():
            return False
        return self._join(timeout)

    def _join(self, timeout: Optional[float]) -> bool:
        if timeout is not None and timeout >= threading.TIMEOUT_MAX:
            timeout = None  # longer than any wait can be: wait until done
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        threads = self.threads()
        for thread in threads:
            if thread is me or not thread.is_alive():
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads if t is not me)

    def _all_delivered(self, delivered: int) -> bool:
        """The callback thread's stop test: closed, all delivered, no worker left to finish."""
        return (
            self._dispatch.closed
            and delivered == self._dispatch.next_seq
            and (self._live.count == 0 or self._abandoned)
        )

    def abandon(self) -> None:
        """Interpreter exit only, after drain and cancel timed out: tasks still running will
        not finish. Fail them now (their late results are ignored) and let the callback
        thread finish without waiting for their workers."""
        error = SessionClosedError("task abandoned: still running when the interpreter exited")
        self._abandoned = True
        for index in list(self._running):
            claimed = self._running.pop(index, None)  # a task, or a batch of tasks
            if claimed is None:
                continue  # it finished meanwhile and its worker reported it
            if claimed is INLINE:
                continue  # a caller's own thread runs it: the caller gets its outcome
            for task in claimed if isinstance(claimed, list) else (claimed,):
                self._complete(task, None, error)
        self._delivery.wake()

    def undelivered(self) -> int:
        """``run_async`` tasks accepted whose callback has not been delivered (yet)."""
        return self._dispatch.next_seq - self._delivery.ledger.delivered

    @property
    def worker_count(self) -> int:
        """How many worker threads."""
        return len(self._workers.threads)

    def threads(self) -> List[threading.Thread]:
        """Every thread this engine started (workers, callback, deadline if started)."""
        extra = [self._deadlines.thread] if self._deadlines.thread is not None else []
        return [*self._workers.threads, self._delivery.thread, *extra]

    # ------------------------------------------------------------------ introspection

    def stats(self) -> SessionStats:
        """A snapshot of counters, depths and latency histograms.

        Every figure is exact once the session is idle; while tasks are moving, figures
        recorded by different threads may be a few tasks apart.
        """
        self._check_usable()
        return snapshot(
            self._shared,
            self._ledgers,
            [thread.name for thread in self._workers.threads],
            self._delivery.ledger,
            counters=self._dispatch.counters,
            running=len(self._running),
            started_at=self._started_at,
        )

    def _depths(self) -> str:
        """The pipeline's depths for an error message: cheap (no statistics merge)."""
        undelivered = in_flight(self._shared, self._ledgers, self._delivery.ledger)
        return f"{self._dispatch.queued()} queued, {undelivered} results awaiting callbacks"
