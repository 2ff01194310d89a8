"""``InferenceSession``: the ONNX Runtime-shaped facade over io + engine + backend."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import warnings
import weakref
from collections import deque
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

from . import streaming
from .aio import AsyncAdmission
from .backends.base import Backend, Request
from .engine.core import Engine, EngineConfig
from .engine.metrics import SessionStats
from .errors import (
    BatchInferenceError,
    EzrtError,
    InvalidArgumentError,
    InvalidTypeError,
    PipelineFullError,
    SessionClosedError,
)
from .io import FeedParser, ModelMetadata, NodeArg, OutputSelection, concat_batch
from .options import (
    DISPATCH_BATCH_KEY,
    MAX_UNDELIVERED,
    SessionConfig,
    as_bool,
    parse_provider_options,
    split_provider_options,
)

__all__ = ["InferenceSession", "is_rknn_model"]

_ORT_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")

Callback = Callable[[Optional[List[np.ndarray]], Any, str], None]
Future = concurrent.futures.Future
# A validated task ready for the engine: payload, output arrangement, monotonic deadline.
_Prepared = Tuple[Request, OutputSelection, Optional[float]]
ModelSource = Union[str, bytes, bytearray, memoryview, "os.PathLike[str]"]


def is_rknn_model(head: bytes) -> bool:
    """True when the bytes start like an RKNN model container (RKNPU2 or RKNPU3)."""
    from .backends import rknn

    return rknn.model_family(head) is not None


def _peek_head(path_or_bytes: Any) -> Optional[bytes]:
    """The model's first bytes, or None when they cannot be read (the caller reports it)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return bytes(path_or_bytes[:16])
    try:
        with open(os.fspath(path_or_bytes), "rb") as handle:
            return handle.read(16)
    except (OSError, TypeError, ValueError):
        return None


def _open_rknn(path_or_bytes: Any, providers: Any, provider_options: Any, master: Any) -> Any:
    """An RKNN backend when ``providers`` names an RKNN provider or the model's bytes are an
    RKNN model (upstream 0.11's rules, in backends.rknn); None for anything else."""
    from .backends import rknn

    if rknn.requests_rknn(providers):
        rknn.parse_request(providers, provider_options)  # 0.11: these errors precede the file
    else:
        head = _peek_head(path_or_bytes)
        if head is None or rknn.model_family(head) is None:
            return None
    model, head = _load_model(path_or_bytes)
    master_backend = master._backend if master is not None else None
    return rknn.open_backend(model, head, providers, provider_options, share_with=master_backend)


def describe_error(error: BaseException) -> str:
    """The ``err`` text a callback receives: ezrt's message, or the type and message."""
    if isinstance(error, EzrtError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class _Outcome:
    """A one-shot slot that a worker fills and one thread waits on (cheapest Python wait)."""

    __slots__ = ("_done", "error", "result")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def __call__(self, result: Any, error: Optional[BaseException]) -> None:
        self.result = result
        self.error = error
        self._done.release()

    def wait(self) -> Tuple[Any, Optional[BaseException]]:
        self._done.acquire()  # interruptible (Ctrl-C); the task itself still completes
        self._done.release()
        return self.result, self.error

    def value(self) -> Any:
        result, error = self.wait()
        if error is not None:
            raise error
        return result


def _load_model(path_or_bytes: Any) -> Tuple[Union[str, bytes], bytes]:
    """The model as ORT takes it (path or bytes) and its first bytes, for the format check."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        if not data:
            raise InvalidArgumentError("the model bytes are empty")
        return data, data[:16]
    try:
        path = os.fspath(path_or_bytes)
    except TypeError:
        raise InvalidTypeError(
            "path_or_bytes must be a path (str or os.PathLike) or the model's bytes "
            f"(got {type(path_or_bytes).__name__})"
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise InvalidArgumentError(f"Failed to open model file: {path} ({exc.strerror})") from exc
    return path, head


def _normalise_providers(providers: Any) -> List[Tuple[str, Dict[str, Any]]]:
    if isinstance(providers, str) or not isinstance(providers, Sequence):
        raise InvalidTypeError(
            "providers must be a list of provider names or (name, options) pairs "
            f"(got {type(providers).__name__})"
        )
    normalised: List[Tuple[str, Dict[str, Any]]] = []
    for entry in providers:
        if isinstance(entry, str):
            normalised.append((entry, {}))
        elif (
            isinstance(entry, tuple)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], Mapping)
        ):
            normalised.append((entry[0], dict(entry[1])))
        else:
            raise InvalidTypeError(
                f"providers entries must be names or (name, dict) pairs (got {entry!r})"
            )
    known = _ORT_PROVIDERS
    for name, _ in normalised:
        if name not in known:
            raise InvalidArgumentError(
                f"Unsupported provider: {name} (ezrt supports {', '.join(known)})"
            )
    return normalised


def _dispatch_batch(run_options: Any) -> bool:
    if run_options is None:
        return False
    if isinstance(run_options, Mapping):
        unknown = [key for key in run_options if key != DISPATCH_BATCH_KEY]
        if unknown:
            raise InvalidArgumentError(
                f"Unknown run_options key: {unknown[0]!r} (supported: {DISPATCH_BATCH_KEY})"
            )
        if DISPATCH_BATCH_KEY not in run_options:
            return False
        return as_bool(DISPATCH_BATCH_KEY, run_options[DISPATCH_BATCH_KEY])
    getter = getattr(run_options, "get_run_config_entry", None)
    if getter is None:
        raise InvalidTypeError(
            "run_options must be a dict, an onnxruntime.RunOptions or None "
            f"(got {type(run_options).__name__})"
        )
    try:
        value = getter(DISPATCH_BATCH_KEY)
    except Exception:  # ORT raises when the entry is absent
        return False
    return as_bool(DISPATCH_BATCH_KEY, value)


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


class InferenceSession:
    """An inference session with ONNX Runtime's API that runs tasks on a pool of workers.

    ``path_or_bytes`` is a model path or the model's bytes: ONNX, or RKNN (recognised by
    its bytes). ``providers`` takes ORT's names (``CPUExecutionProvider``,
    ``CUDAExecutionProvider``) or ``RKNNExecutionProvider``; by default the model decides.
    ``provider_options`` is a dict of ezrt options (see :class:`ezrt.ProviderOptions`) or
    ORT's list of dicts (ezrt's options in the first). ``use_weight_from`` shares another
    session's weights. Unknown keyword arguments are a ``TypeError``.

    Threads: ``threads_per_core`` workers per distinct core of ``schedule`` run the tasks
    (named ``ezrt-worker-<i>-core<c>``); ``run_async`` callbacks run on one thread named
    ``ezrt-callback``. ``close()`` (or leaving a ``with`` block) delivers everything
    accepted and joins them all.
    """

    def __init__(
        self,
        path_or_bytes: ModelSource,
        sess_options: Any = None,
        providers: Optional[Sequence[Union[str, Tuple[str, Dict[str, Any]]]]] = None,
        provider_options: Optional[Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]] = None,
        *,
        use_weight_from: Optional[InferenceSession] = None,
    ) -> None:
        self._engine: Optional[Engine] = None
        if use_weight_from is not None and not isinstance(use_weight_from, InferenceSession):
            raise InvalidTypeError(
                "use_weight_from must be an InferenceSession or None "
                f"(got {type(use_weight_from).__name__})"
            )
        self._master = use_weight_from  # keeps the master alive while this session lives
        rknn_backend = _open_rknn(path_or_bytes, providers, provider_options, use_weight_from)
        config: SessionConfig
        if rknn_backend is not None:
            self._backend: Backend = rknn_backend
            config = rknn_backend.config
        else:
            option_dicts = split_provider_options(provider_options)
            chosen = None if providers is None else _normalise_providers(providers)
            device = self._pick_provider(chosen)
            config, foreign = parse_provider_options(
                option_dicts[0] if option_dicts else None,
                allow_foreign_keys=device == "CUDAExecutionProvider",
            )
            if use_weight_from is not None and config.wants_custom_ops:
                raise InvalidArgumentError(
                    "use_weight_from cannot be combined with custom-op loading"
                )
            model, _ = _load_model(path_or_bytes)
            device = device or "CPUExecutionProvider"
            self._backend = self._open_backend(model, device, config, sess_options, chosen, foreign)
        self._config = config
        try:
            self._parser = FeedParser(
                self._backend.inputs,
                self._backend.outputs,
                getattr(self._backend, "feed_layout", config.layout),
                getattr(self._backend, "check_shapes", None),
            )
            engine_config = EngineConfig(
                schedule=config.schedule if config.schedule is not None else (None,),
                threads_per_core=config.threads_per_core,
                max_queue_size=config.max_queue_size,
                max_undelivered=MAX_UNDELIVERED,
                sequential=config.sequential_callbacks,
                pacing=config.enable_pacing,
                dispatch_policy=config.dispatch_policy,
                submit_timeout_s=config.submit_timeout_ms / 1000.0,
            )
            self._engine = Engine(engine_config, self._backend.make_worker, self._backend.close)
        except BaseException:
            self._backend.close()
            raise
        self._admission = AsyncAdmission(_weak_enqueue(self))
        self._pipeline_lock = threading.Lock()  # serialises run_pipeline's window
        self._pipeline: Deque[_Outcome] = deque()
        self._pipeline_depth: Optional[int] = None

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _pick_provider(chosen: Optional[List[Tuple[str, Dict[str, Any]]]]) -> Optional[str]:
        """The provider this session will use (None: decided by the model's bytes)."""
        if chosen is None or not chosen:
            return None
        names = [name for name, _ in chosen]
        if "CUDAExecutionProvider" in names:
            from .backends.onnxruntime import available_providers

            if "CUDAExecutionProvider" in available_providers():
                return "CUDAExecutionProvider"
            warnings.warn(
                "CUDAExecutionProvider is not available in this onnxruntime build "
                f"(available: {', '.join(available_providers())}); using CPUExecutionProvider",
                RuntimeWarning,
                stacklevel=3,
            )
        return "CPUExecutionProvider"

    def _open_backend(
        self,
        model: Union[str, bytes],
        device: str,
        config: SessionConfig,
        sess_options: Any,
        chosen: Optional[List[Tuple[str, Dict[str, Any]]]],
        foreign: Dict[str, Any],
    ) -> Backend:
        master_backend = self._master._backend if self._master is not None else None
        from .backends.onnxruntime import OrtBackend

        ep_options = dict(foreign)
        for name, options in chosen or ():
            if name == device:
                ep_options.update(options)
        share_with = None
        if master_backend is not None:
            if not isinstance(master_backend, OrtBackend):
                raise InvalidArgumentError(
                    "use_weight_from must be a session on the same backend as this one"
                )
            share_with = master_backend
        return OrtBackend(
            model,
            config,
            device=device,
            sess_options=sess_options,
            ep_options=ep_options,
            share_with=share_with,
        )

    # ------------------------------------------------------------------ introspection

    def get_inputs(self) -> List[NodeArg]:
        """The model's inputs, with the shapes the caller feeds (after ``layout``)."""
        return self._parser.input_args()

    def get_outputs(self) -> List[NodeArg]:
        """The model's outputs (RKNN: type ``tensor(float)`` unless ``output_dtype="native"``)."""
        return self._parser.output_args()

    def get_modelmeta(self) -> ModelMetadata:
        """The model's metadata (RKNN: ``rknn_custom_string`` in ``custom_metadata_map``)."""
        return self._backend.metadata()

    @property
    def input_names(self) -> List[str]:
        """Input names in model order (a new list each time)."""
        return list(self._parser.input_names)

    @property
    def output_names(self) -> List[str]:
        """Output names in model order (a new list each time)."""
        return list(self._parser.output_names)

    def get_providers(self) -> List[str]:
        """The execution provider in use, as ONNX Runtime names it."""
        return self._backend.providers()

    def get_provider_options(self) -> Dict[str, Dict[str, Any]]:
        """The provider's own options (ezrt's are in :attr:`config`)."""
        return self._backend.provider_options()

    @property
    def config(self) -> SessionConfig:
        """The validated provider options in effect."""
        return self._config

    # ------------------------------------------------------------------ running

    def _live_engine(self) -> Engine:
        engine = self._engine
        if engine is None:  # pragma: no cover - only a half-constructed session
            raise EzrtError("the session was not constructed")
        return engine

    def run(
        self, output_names: Optional[Sequence[str]], input_feed: Any, run_options: Any = None
    ) -> List[np.ndarray]:
        """Run one inference on a worker and wait for it, like ``onnxruntime`` ``run``.

        With ``run_options={"ztu_modelrt_dispatch_batch": True}`` (or that ``RunOptions``
        config entry) every input's axis 0 is a batch: each sample runs as its own task,
        spread over the workers, and the outputs are joined along axis 0.
        """
        engine = self._live_engine()
        batch = _dispatch_batch(run_options)
        selection = self._parser.select_outputs(output_names)
        if batch:
            return self._run_batch(engine, selection, input_feed)
        arrays = self._parser.parse(input_feed, copy=False)  # run() returns after the task
        engine.assert_may_block("run")
        outcome = _Outcome()
        engine.submit(Request(arrays, selection.fetch), outcome, delivered=False, what="run")
        return selection.arrange(outcome.value())

    def _run_batch(
        self, engine: Engine, selection: OutputSelection, input_feed: Any
    ) -> List[np.ndarray]:
        samples, batch_size = self._parser.parse_batch(input_feed)
        engine.assert_may_block("run")
        outcomes = []
        for sample in samples:
            outcome = _Outcome()
            engine.submit(Request(sample, selection.fetch), outcome, delivered=False, what="run")
            outcomes.append(outcome)
        results = []
        errors: Dict[int, str] = {}
        for index, outcome in enumerate(outcomes):
            result, error = outcome.wait()
            if error is None:
                results.append(result)
            else:
                errors[index] = describe_error(error)
        if errors:
            raise BatchInferenceError(errors, batch_size)
        return selection.arrange(concat_batch(results))

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
        request, selection, _ = self._prepare(
            output_names, input_feed, run_options, None, "run_async"
        )

        arrange = None if selection.picks is None else selection.arrange

        def deliver(result: Any, error: Optional[BaseException]) -> None:
            if error is None:
                callback(result if arrange is None else arrange(result), user_data, "")
            else:
                callback(None, user_data, describe_error(error))

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
        arrays = self._parser.parse(input_feed, copy=True)
        engine.assert_may_block("run_pipeline")
        with self._pipeline_lock:
            if reset or depth != self._pipeline_depth:
                self._pipeline.clear()
                self._pipeline_depth = int(depth)
            outcome = _Outcome()
            engine.submit(Request(arrays, None), outcome, delivered=False, what="run_pipeline")
            self._pipeline.append(outcome)
            if len(self._pipeline) <= depth:
                return None
            oldest = self._pipeline.popleft()
        return oldest.value()  # type: ignore[no-any-return]

    def flush_pipeline(self, return_exceptions: bool = False) -> List[Any]:
        """Wait for every frame still in the ``run_pipeline`` window; return their results.

        Results come in submission order and the window is left empty. A failed frame raises
        its error once all are collected, or appears as the exception object when
        ``return_exceptions``.
        """
        with self._pipeline_lock:
            pending = list(self._pipeline)
            self._pipeline.clear()
        if pending:
            self._live_engine().assert_may_block("flush_pipeline")
        results: List[Any] = []
        first_error: Optional[BaseException] = None
        for outcome in pending:
            result, error = outcome.wait()
            if error is None:
                results.append(result)
            else:
                results.append(error)
                first_error = first_error or error
        if first_error is not None and not return_exceptions:
            raise first_error
        return results

    # ------------------------------------------------------------------ futures, asyncio, streams

    def _prepare(
        self, output_names: Any, input_feed: Any, run_options: Any, deadline: Any, what: str
    ) -> _Prepared:
        """Validate and copy on the caller's thread; the deadline clock starts here."""
        if run_options is not None and _dispatch_batch(run_options):
            raise InvalidArgumentError(
                f"{what} does not support {DISPATCH_BATCH_KEY}=True; use run() for batches"
            )
        expires_at = None
        if deadline is not None:
            if isinstance(deadline, bool) or not isinstance(deadline, (int, float)):
                raise InvalidTypeError(
                    f"deadline must be a number of seconds or None (got {deadline!r})"
                )
            expires_at = time.monotonic() + float(deadline)
        selection = self._parser.select_outputs(output_names)
        arrays = self._parser.parse(input_feed, copy=True)
        return Request(arrays, selection.fetch), selection, expires_at

    def _enqueue(
        self, prepared: _Prepared, *, wait: bool, what: str, timeout: Optional[float] = None
    ) -> Future[List[Any]]:
        request, selection, expires_at = prepared
        engine = self._live_engine()
        future: Future[List[Any]] = Future()

        def settle(result: Any, error: Optional[BaseException]) -> None:
            try:
                if error is None:
                    future.set_result(selection.arrange(result))
                else:
                    future.set_exception(error)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled by its owner meanwhile: nobody wants the outcome

        task = engine.submit(
            request,
            settle,
            delivered=False,
            what=what,
            wait=wait,
            timeout=timeout,
            on_start=future.set_running_or_notify_cancel,
            expires_at=expires_at,
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
        slot frees at once. ``deadline`` is in seconds from this call: a task that has not
        started by then completes with :class:`ezrt.DeadlineExceededError`, promptly, even if
        no worker frees. Blocks while the pipeline is full, like ``run_async``.
        """
        prepared = self._prepare(output_names, input_feed, run_options, deadline, "submit")
        return self._enqueue(prepared, wait=True, what="submit")

    async def _asubmit(
        self, output_names: Any, input_feed: Any, run_options: Any, deadline: Any
    ) -> asyncio.Future[List[Any]]:
        """Admit without blocking the event loop: at once when there is room, else through
        the session's admission thread (FIFO). Returns an asyncio future of the outputs."""
        loop = asyncio.get_running_loop()
        prepared = self._prepare(output_names, input_feed, run_options, deadline, "arun")
        try:
            future = self._enqueue(prepared, wait=False, what="arun")
        except PipelineFullError:
            admitted = self._admission.admit(prepared, self._config.submit_timeout_ms / 1000.0)
            future = await admitted  # cancelling the caller cancels this; the task is withdrawn
        return asyncio.wrap_future(future, loop=loop)

    async def arun(
        self,
        output_names: Optional[Sequence[str]],
        input_feed: Any,
        run_options: Any = None,
        *,
        deadline: Optional[float] = None,
    ) -> List[np.ndarray]:
        """``await`` one inference from asyncio without ever blocking the event loop.

        Under back-pressure the admission wait runs on an executor thread. Cancelling the
        awaiting task cancels the inference if it has not started. ``deadline`` as in
        :meth:`submit`.
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
        ``return_exceptions``. Leaving the loop early cancels what is still queued.
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
        ``feeds`` may be an async or a plain iterable. The event loop is never blocked."""
        window = streaming.check_window(max_in_flight, self._default_window())
        return streaming.aimap(
            lambda feed: self._asubmit(output_names, feed, None, None),
            feeds,
            window,
            ordered,
            return_exceptions,
        )

    # ------------------------------------------------------------------ zero copy

    def io_binding(self) -> Any:
        """A new IOBinding on this session (ONNX Runtime's own on that backend; on RKNN, the
        zero-copy binding of upstream 0.11)."""
        backend = self._backend
        if hasattr(backend, "bound_payload"):  # RKNN
            return backend.io_binding(self)  # type: ignore[attr-defined]
        if not hasattr(backend, "io_binding"):
            raise EzrtError("io_binding is not available on this backend")
        return backend.io_binding()

    def get_native_inputs(self) -> List[NodeArg]:
        """RKNN: the inputs as zero copy binds them (native dims, type, layout, strides);
        elsewhere the same as :meth:`get_inputs`."""
        native = getattr(self._backend, "native_inputs", None)
        return native() if native is not None else self.get_inputs()

    def get_native_outputs(self) -> List[NodeArg]:
        """RKNN: the outputs as zero copy binds them; elsewhere :meth:`get_outputs`."""
        native = getattr(self._backend, "native_outputs", None)
        return native() if native is not None else self.get_outputs()

    def run_with_iobinding(self, iobinding: Any, run_options: Any = None) -> None:
        """Run with bound inputs and outputs and wait for it. On RKNN the run is a task on
        the session's workers (any worker, its own context), like ``run``."""
        backend = self._backend
        if hasattr(backend, "bound_payload"):  # RKNN
            engine = self._live_engine()
            _dispatch_batch(run_options)  # checked as upstream, then not used
            payload = backend.bound_payload(iobinding, run_options)
            engine.assert_may_block("run_with_iobinding")
            outcome = _Outcome()
            engine.submit(payload, outcome, delivered=False, what="run_with_iobinding")
            outcome.value()
            return
        if not hasattr(backend, "run_with_iobinding"):
            raise EzrtError("run_with_iobinding is not available on this backend")
        if self._live_engine().closed:
            raise EzrtError("run_with_iobinding rejected: the session is closed")
        backend.run_with_iobinding(iobinding, run_options)

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
        engine = self._engine
        if engine is None:
            return True
        finished = engine.close(cancel=cancel, wait=True, timeout=timeout)
        self._admission.close(timeout)  # waiting admissions now fail: the session is closed
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
        engine = getattr(self, "_engine", None)
        if engine is not None and not engine.closed:
            engine.close(wait=False)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<ezrt.InferenceSession {state} providers={self.get_providers()} "
            f"inputs={self.input_names} outputs={self.output_names}>"
        )
