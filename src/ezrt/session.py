"""``InferenceSession``: ONNX Runtime's API plus scheduling, over io + engine + backend.

The session is the ORT surface and the call styles ezrt adds; everything else lives in its
own room: choosing and opening the backend (``backends/select.py``), what is forwarded to
ONNX Runtime (``compat.py``), feeds and outputs (``io/``), the engine (``engine/``), how an
outcome reaches the caller (``completion.py``), streams and the pipeline window
(``streaming.py``) and asyncio admission (``aio.py``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterable,
    AsyncIterator,
    Callable,
    ClassVar,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

if TYPE_CHECKING:
    import asyncio

from . import streaming
from .backends.base import Backend, Request
from .backends.select import open_backend, rknn_family
from .compat import ForwardedMethods
from .completion import (
    Callback,
    Outcome,
    callback_completion,
    describe_error,
    future_completion,
    gather_in_order,
    gather_samples,
)
from .engine.core import Engine, EngineConfig
from .engine.metrics import SessionStats
from .errors import (
    EzrtError,
    InvalidArgumentError,
    InvalidTypeError,
    PipelineFullError,
    SessionClosedError,
)
from .io import OutputSelection, concat_batch
from .options import (
    DISPATCH_BATCH_KEY,
    MAX_UNDELIVERED,
    SessionConfig,
    as_seconds,
    read_run_options,
)

__all__ = ["InferenceSession", "describe_error", "is_rknn_model"]

Future = concurrent.futures.Future
ModelSource = Union[str, bytes, bytearray, memoryview, "os.PathLike[str]"]


def is_rknn_model(head: bytes) -> bool:
    """True when the bytes start like an RKNN model container."""
    return rknn_family(head) is not None


class PreparedTask(NamedTuple):
    """A validated call ready for the engine."""

    request: Request
    selection: OutputSelection
    expires_at: Optional[float]  # time.monotonic() by which it must start


def _expiry(deadline: Any) -> Optional[float]:
    """The monotonic time a task must start by: ``deadline`` seconds from now."""
    seconds = as_seconds("deadline", deadline)
    return None if seconds is None else time.monotonic() + seconds


def _weak_enqueue(session: InferenceSession) -> Callable[[Any, float], Future[Any]]:
    """The admission thread's way in, without keeping the session alive (no cycle: an
    unreferenced session is finalised at once and its threads drain and stop)."""
    ref = weakref.ref(session)

    def enqueue(prepared: Any, timeout: float) -> Future[Any]:
        live = ref()
        if live is None:
            raise SessionClosedError("arun rejected: the session is closed")
        return live._enqueue(prepared, wait=True, what="arun", timeout=timeout)

    return enqueue


class InferenceSession(ForwardedMethods):
    """ONNX Runtime's ``InferenceSession`` that runs tasks on a pool of workers.

    ``path_or_bytes`` is a model path or the model's bytes: ONNX, or RKNN (recognised by
    its bytes). On ONNX models ``sess_options``, ``providers``, ``provider_options`` (ORT's
    list form) and ORT's keyword arguments reach ONNX Runtime exactly as given; ezrt's own
    options come as a dict: ``provider_options=ezrt.make_provider_options(...)`` (see
    :mod:`ezrt.compat` for the rule, and the README). ``use_weight_from`` shares another
    session's weights. Any other keyword argument is a ``TypeError``.

    Threads: ``threads_per_core`` workers per distinct core of ``schedule`` run the tasks
    (named ``ezrt-worker-<i>-core<c>``); ``run_async`` callbacks run on one thread named
    ``ezrt-callback``. ``close()`` (or leaving a ``with`` block) delivers everything
    accepted and joins them all.
    """

    #: ezrt options for calls that give none (set by :func:`ezrt.patch_onnxruntime`).
    default_options: ClassVar[Optional[Mapping[str, Any]]] = None

    def __init__(
        self,
        path_or_bytes: ModelSource,
        sess_options: Any = None,
        providers: Optional[Sequence[Union[str, Tuple[str, Dict[str, Any]]]]] = None,
        provider_options: Optional[Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]] = None,
        *,
        use_weight_from: Optional[InferenceSession] = None,
        **kwargs: Any,
    ) -> None:
        self._engine: Optional[Engine] = None
        if use_weight_from is not None and not isinstance(use_weight_from, InferenceSession):
            raise InvalidTypeError(
                "use_weight_from must be an InferenceSession or None "
                f"(got {type(use_weight_from).__name__})"
            )
        self._master = use_weight_from  # keeps the master alive while this session lives
        self._backend: Backend = open_backend(
            path_or_bytes,
            sess_options,
            providers,
            provider_options,
            kwargs,
            defaults=type(self).default_options,
            share_with=use_weight_from._backend if use_weight_from is not None else None,
        )
        self._config: SessionConfig = self._backend.config
        try:
            self._start()
        except BaseException:
            self._backend.close()
            raise
        self._aio: Optional[Any] = None  # asyncio admission, made on the first asyncio call
        self._aio_lock = threading.Lock()
        self._window = streaming.PipelineWindow()

    def _start(self) -> None:
        """The feed parsers and the engine, for the backend as it now is."""
        backend, config = self._backend, self._config
        self._feed = backend.make_feed()
        self._batch_feed = backend.batch_feed()
        engine_config = EngineConfig(
            schedule=config.schedule if config.schedule is not None else (None,),
            threads_per_core=config.threads_per_core,
            max_queue_size=config.max_queue_size,
            max_undelivered=MAX_UNDELIVERED,
            sequential=config.sequential_callbacks,
            pacing=config.enable_pacing,
            dispatch_policy=config.dispatch_policy,
            submit_timeout_s=config.submit_timeout_ms / 1000.0,
            max_batch_size=config.max_batch_size,
            batch_timeout_s=config.batch_timeout_us / 1e6,
        )
        batcher = backend.make_batcher() if config.max_batch_size > 1 else None
        self._engine = Engine(engine_config, backend.make_worker, backend.close, batcher)
        # A lone run() runs on the caller's thread (pacing must see every task arrive).
        self._lone = None if config.enable_pacing else backend.lone_runner()

    # ------------------------------------------------------------------ introspection

    def get_inputs(self) -> List[Any]:
        """The model's inputs (ONNX Runtime's own ``NodeArg``s on that backend), with the
        shapes the caller feeds (after ``layout``)."""
        return self._backend.input_args(self._feed.user_shapes)

    def get_outputs(self) -> List[Any]:
        """The model's outputs (RKNN: type ``tensor(float)`` unless ``output_dtype="native"``)."""
        return self._backend.output_args()

    def get_native_inputs(self) -> List[Any]:
        """The inputs as the runtime holds them (on ONNX Runtime: as :meth:`get_inputs`)."""
        return self._backend.native_inputs()

    def get_native_outputs(self) -> List[Any]:
        """The outputs as the runtime holds them (on ONNX Runtime: as :meth:`get_outputs`)."""
        return self._backend.native_outputs()

    def get_modelmeta(self) -> Any:
        """The model's metadata (ONNX Runtime's own object on that backend; RKNN:
        ``rknn_custom_string`` in ``custom_metadata_map``)."""
        return self._backend.metadata()

    @property
    def input_names(self) -> List[str]:
        """Input names in model order (a new list each time)."""
        return list(self._feed.input_names)

    @property
    def output_names(self) -> List[str]:
        """Output names in model order (a new list each time)."""
        return list(self._feed.outputs.names)

    def get_providers(self) -> List[str]:
        """The execution providers in use, as ONNX Runtime names them."""
        return self._backend.providers()

    def get_provider_options(self) -> Dict[str, Dict[str, Any]]:
        """The providers' own options (ezrt's are in :attr:`config`)."""
        return self._backend.provider_options()

    @property
    def config(self) -> SessionConfig:
        """The validated ezrt options in effect."""
        return self._config

    def set_providers(self, providers: Any = None, provider_options: Any = None) -> None:
        """ONNX Runtime's ``set_providers``: change the execution providers. The workers
        finish what was accepted, then restart on the new providers."""
        engine = self._live_engine()
        engine.assert_may_block("set_providers")
        engine.close()
        self._backend.set_providers(providers, provider_options)
        self._start()

    def _ort_session(self, what: str) -> Any:
        session = self._backend.ort_session
        if session is None:
            raise self._backend.unavailable(what)
        return session

    def __getattr__(self, name: str) -> Any:
        # What the ORT session has and ezrt does not define (a method of a newer
        # onnxruntime, ORT's private ``_sess`` that some code reaches for) is ORT's own.
        backend = self.__dict__.get("_backend")
        session = None if name.startswith("__") or backend is None else backend.ort_session
        if session is None or not hasattr(session, name):
            raise AttributeError(f"'InferenceSession' object has no attribute {name!r}")
        return getattr(session, name)

    # ------------------------------------------------------------------ running

    def _live_engine(self) -> Engine:
        engine = self._engine
        if engine is None:  # pragma: no cover - only a half-constructed session
            raise EzrtError("the session was not constructed")
        return engine

    def run(
        self, output_names: Optional[Sequence[str]], input_feed: Any, run_options: Any = None
    ) -> List[np.ndarray]:
        """Run one inference and wait for it, like ``onnxruntime`` ``run``.

        On ONNX Runtime, when nothing is queued and fewer tasks run than there are workers,
        the inference runs on the calling thread (a worker's place, with no hand-off; on
        every scheduled core when the session is idle, see ``lone_run``); otherwise it
        queues for a worker.

        With ``run_options={"ztu_modelrt_dispatch_batch": True}`` (or that ``RunOptions``
        config entry) every input's axis 0 is a batch: each sample runs as its own task,
        spread over the workers, and the outputs are joined along axis 0.
        """
        engine = self._live_engine()
        batch, ort_options = read_run_options(run_options)
        if batch:
            return self._run_batch(engine, output_names, input_feed, ort_options)
        inputs = self._feed.parse(input_feed, copy=False)  # run() returns after the task
        selection = self._feed.select(output_names, inputs)
        engine.assert_may_block("run")
        request = Request(inputs, selection.fetch, ort_options)
        lone = self._lone
        if lone is not None:  # a worker's place is free: run here, with no thread hop
            ran, result = engine.run_inline(request, lone.run, lone.run_alone)
            if ran:
                return selection.arrange(result)
        outcome = Outcome()
        engine.submit(request, outcome, delivered=False, what="run")
        return selection.arrange(outcome.value())

    def _run_batch(
        self, engine: Engine, output_names: Any, input_feed: Any, ort_options: Any
    ) -> List[np.ndarray]:
        feed = self._batch_feed
        samples, batch_size = feed.parse_batch(input_feed)
        selection = feed.select(output_names, None)
        engine.assert_may_block("run")
        outcomes = []
        for sample in samples:
            outcome = Outcome()
            inputs = self._backend.request_inputs(sample)
            request = Request(inputs, selection.fetch, ort_options)
            engine.submit(request, outcome, delivered=False, what="run")
            outcomes.append(outcome)
        return selection.arrange(concat_batch(gather_samples(outcomes, batch_size)))

    def run_async(
        self,
        output_names: Optional[Sequence[str]],
        input_feed: Any,
        callback: Callback,
        user_data: Any = None,
        run_options: Any = None,
    ) -> None:
        """Queue one inference and return at once; ``callback(results, user_data, err)`` follows.

        The callback runs on the ``ezrt-callback`` thread, in submission order when
        ``sequential_callbacks`` (the default). On success ``err == ""``; on failure
        ``results is None`` and ``err`` says what failed. Inputs are copied, so the caller
        may reuse its arrays at once. Blocks while the pipeline is full, up to
        ``submit_timeout_ms``; then raises :class:`ezrt.SubmitTimeoutError`.
        An exception raised by the callback is logged (logger ``ezrt``) and delivery goes on.
        """
        if not callable(callback):
            raise InvalidTypeError(f"callback must be callable (got {type(callback).__name__})")
        if run_options is None:  # the common case, in few bytecodes: this is the hot path
            feed = self._feed
            inputs = feed.parse(input_feed, copy=True)
            selection = feed.select(output_names, inputs)
            request = Request(inputs, selection.fetch)
        else:
            prepared = self._prepare(output_names, input_feed, run_options, None, "run_async")
            request, selection = prepared.request, prepared.selection
        deliver = callback_completion(callback, user_data, selection)
        self._live_engine().submit(request, deliver, delivered=True, what="run_async")

    def run_pipeline(
        self, input_feed: Any, depth: int = 3, reset: bool = False
    ) -> Optional[List[np.ndarray]]:
        """Submit a frame and return the result of the frame ``depth`` calls ago.

        Returns None until ``depth`` frames are in flight. ``reset=True`` or a new ``depth``
        starts a new window: results still in the old one are discarded (use
        :meth:`flush_pipeline` first to keep them). All outputs are returned.
        """
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
            raise InvalidTypeError(f"pipeline depth must be an integer (got {depth!r})")
        if depth <= 0:
            raise InvalidArgumentError(f"pipeline depth must be > 0 (got {depth})")
        engine = self._live_engine()
        inputs = self._feed.parse(input_feed, copy=True)
        engine.assert_may_block("run_pipeline")
        window = self._window
        with window.lock:
            window.resize(int(depth), reset)
            outcome = Outcome()
            engine.submit(Request(inputs, None), outcome, delivered=False, what="run_pipeline")
            oldest = window.push(outcome)
        return None if oldest is None else oldest.value()

    def flush_pipeline(self, return_exceptions: bool = False) -> List[Any]:
        """Wait for every frame still in the ``run_pipeline`` window; return their results.

        Results come in submission order and the window is left empty. A failed frame raises
        its error once all are collected, or appears as the exception object when
        ``return_exceptions``.
        """
        pending = self._window.drain()
        if pending:
            self._live_engine().assert_may_block("flush_pipeline")
        return gather_in_order(pending, return_exceptions)

    # ------------------------------------------------------------------ futures, asyncio, streams

    def _prepare(
        self,
        output_names: Any,
        input_feed: Any,
        run_options: Any,
        deadline: Any,
        what: str,
        *,
        copy: bool = True,
    ) -> PreparedTask:
        """Validate (and copy, unless the call borrows its inputs) on the caller's thread;
        the deadline clock starts here."""
        batch, ort_options = read_run_options(run_options)
        if batch:
            raise InvalidArgumentError(
                f"{what} does not support {DISPATCH_BATCH_KEY}=True; use run() for batches"
            )
        expires_at = _expiry(deadline)
        inputs = self._feed.parse(input_feed, copy=copy)
        selection = self._feed.select(output_names, inputs)
        return PreparedTask(Request(inputs, selection.fetch, ort_options), selection, expires_at)

    def _enqueue(
        self, prepared: PreparedTask, *, wait: bool, what: str, timeout: Optional[float] = None
    ) -> Future[List[Any]]:
        engine = self._live_engine()
        future: Future[List[Any]] = Future()
        task = engine.submit(
            prepared.request,
            future_completion(future, prepared.selection),
            delivered=False,
            what=what,
            wait=wait,
            timeout=timeout,
            on_start=future.set_running_or_notify_cancel,
            expires_at=prepared.expires_at,
        )
        future.add_done_callback(lambda done: done.cancelled() and engine.cancel(task))
        return future

    def submit(
        self,
        output_names: Optional[Sequence[str]],
        input_feed: Any,
        run_options: Any = None,
        *,
        deadline: Optional[float] = None,
    ) -> Future[List[np.ndarray]]:
        """Queue one inference; return a ``concurrent.futures.Future`` of its outputs.

        The future holds the output list, or the task's error as its exception. It is
        resolved on the worker thread that ran the task (so are its done-callbacks).
        ``future.cancel()`` succeeds while the task is still queued: it never runs and its
        slot frees at once. ``deadline`` is in seconds from this call (``math.inf``: none):
        a task that has not started by then completes with
        :class:`ezrt.DeadlineExceededError`, promptly, even if no worker frees. Inputs are
        copied. Blocks while the pipeline is full, like ``run_async``.
        """
        prepared = self._prepare(output_names, input_feed, run_options, deadline, "submit")
        return self._enqueue(prepared, wait=True, what="submit")

    async def _asubmit(
        self, output_names: Any, input_feed: Any, run_options: Any, deadline: Any
    ) -> asyncio.Future[List[Any]]:
        """Admit without blocking the event loop: at once when there is room, else through
        the session's admission thread (FIFO). Returns an asyncio future of the outputs.

        The inputs are borrowed, not copied (the call has not returned until its result
        is there): the event loop does O(1) work per call whatever the input size."""
        import asyncio  # only asyncio callers pay for importing it

        loop = asyncio.get_running_loop()
        prepared = self._prepare(
            output_names, input_feed, run_options, deadline, "arun", copy=False
        )
        admission = self._aio or self._start_async_admission()
        future = None
        if not admission.busy and self._live_engine().has_room():
            with contextlib.suppress(PipelineFullError):  # room taken meanwhile: queue up
                future = self._enqueue(prepared, wait=False, what="arun")
        if future is None:  # behind earlier waiters, on the admission thread (FIFO)
            admitted = admission.admit(prepared, self._config.submit_timeout_ms / 1000.0)
            future = await admitted  # cancelling the caller cancels this; the task is withdrawn
        return asyncio.wrap_future(future, loop=loop)

    def _start_async_admission(self) -> Any:
        """The asyncio admission thread's front, made on the first asyncio call."""
        from .aio import AsyncAdmission

        with self._aio_lock:
            if self._aio is None:
                self._aio = AsyncAdmission(_weak_enqueue(self))
            return self._aio

    async def arun(
        self,
        output_names: Optional[Sequence[str]],
        input_feed: Any,
        run_options: Any = None,
        *,
        deadline: Optional[float] = None,
    ) -> List[np.ndarray]:
        """``await`` one inference from asyncio without ever blocking the event loop.

        Like :meth:`run`, it borrows the input arrays until it returns: do not modify them
        while the ``await`` is pending (the loop thread copies nothing, so 1000 gathered
        calls cost it no more than 1000 small ones). Under back-pressure the admission wait
        runs on the session's admission thread. Cancelling the awaiting task cancels the
        inference if it has not started. ``deadline`` as in :meth:`submit`.
        """
        return await (await self._asubmit(output_names, input_feed, run_options, deadline))

    def _default_window(self) -> int:
        return self._live_engine().worker_count + self._config.max_queue_size

    def imap(
        self,
        feeds: Iterable[Any],
        output_names: Optional[Sequence[str]] = None,
        *,
        ordered: bool = True,
        max_in_flight: Optional[int] = None,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """Run every feed of an iterable (a video, a dataset) and yield the outputs.

        At most ``max_in_flight`` tasks are in flight (default: workers + ``max_queue_size``,
        enough to keep every worker busy), so memory stays bounded however long ``feeds``
        is. Results come in input order when ``ordered``, else as they complete. A failed
        item raises its error when reached, or is yielded as the exception object with
        ``return_exceptions``. Leaving the loop early cancels what is still queued. Each
        feed is copied when submitted, so the iterable may reuse its buffers.
        """
        window = streaming.check_window(max_in_flight, self._default_window())
        return streaming.imap(
            lambda feed: self.submit(output_names, feed),
            feeds,
            window,
            ordered,
            return_exceptions,
        )

    def aimap(
        self,
        feeds: Union[Iterable[Any], AsyncIterable[Any]],
        output_names: Optional[Sequence[str]] = None,
        *,
        ordered: bool = True,
        max_in_flight: Optional[int] = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Any]:
        """The asyncio counterpart of :meth:`imap` (``async for out in session.aimap(...)``);
        ``feeds`` may be an async or a plain iterable. The event loop is never blocked.
        As with :meth:`arun`, a feed's arrays are borrowed, not copied, until its result
        has been yielded: an iterable that reuses one buffer must yield copies."""
        from .aio import aimap

        window = streaming.check_window(max_in_flight, self._default_window())
        return aimap(
            lambda feed: self._asubmit(output_names, feed, None, None),
            feeds,
            window,
            ordered,
            return_exceptions,
        )

    # ------------------------------------------------------------------ zero copy

    def io_binding(self) -> Any:
        """A binding of inputs and outputs for :meth:`run_with_iobinding` (ONNX Runtime's
        own ``IOBinding`` on that backend)."""
        return self._backend.io_binding(self)

    def run_with_iobinding(self, iobinding: Any, run_options: Any = None) -> None:
        """Run with bound inputs and outputs (zero copy); returns when the run is done."""
        engine = self._live_engine()
        if engine.closed:
            raise SessionClosedError("run_with_iobinding rejected: the session is closed")
        _, ort_options = read_run_options(run_options)
        payload = self._backend.bound_payload(iobinding, ort_options)
        if payload is None:
            self._backend.run_bound(iobinding, ort_options)
            return
        engine.assert_may_block("run_with_iobinding")
        outcome = Outcome()
        engine.submit(payload, outcome, delivered=False, what="run_with_iobinding")
        outcome.value()

    # ------------------------------------------------------------------ lifetime

    def stats(self) -> SessionStats:
        """Counters, queue depths, latency histograms and worker busy time, as one
        consistent snapshot. Always on: recording costs about a microsecond per task."""
        return self._live_engine().stats()

    def close(self, cancel: bool = False, timeout: Optional[float] = None) -> bool:
        """Stop accepting work, finish it, join every thread. Idempotent.

        By default every accepted task runs and its callback is delivered. With
        ``cancel=True`` tasks not yet started complete at once with
        :class:`ezrt.SessionClosedError` (their callbacks get that as ``err``). Returns
        False if ``timeout`` seconds passed before all threads exited. From a callback,
        close does not wait for the callback thread itself.
        """
        timeout = as_seconds("timeout", timeout)
        engine = self._engine
        if engine is None:
            return True
        finished = engine.close(cancel=cancel, wait=True, timeout=timeout)
        if self._aio is not None:
            self._aio.close(timeout)  # waiting admissions now fail: the session is closed
        return finished

    @property
    def closed(self) -> bool:
        """True once ``close()`` has begun: new tasks are refused."""
        return self._engine is None or self._engine.closed

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Never block in a finaliser (it may run on any thread, even ezrt's own): stop
        # accepting work and let the threads drain and exit by themselves.
        engine = self.__dict__.get("_engine")
        if engine is not None and not engine.closed:
            engine.close(wait=False)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<ezrt.InferenceSession {state} providers={self.get_providers()} "
            f"inputs={self.input_names} outputs={self.output_names}>"
        )
