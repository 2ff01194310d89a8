"""The ONNX Runtime backend: CPU everywhere, CUDA where the installed onnxruntime has it.

The session that holds the weights (``master``) is a real ``onnxruntime.InferenceSession``
built from the caller's own arguments (``sess_options``, ``providers``,
``provider_options``, ORT's keyword arguments), so ORT decides everything it decides for
a plain session: provider names, warnings, options, errors. ezrt changes only the threading
its topology needs:

* ``schedule`` (data parallel). CPU: an entry is a CPU id; each worker pins its thread to
  its CPU (Linux ``sched_setaffinity``; elsewhere workers are not pinned) and the session
  runs with one intra-op thread, so N workers use N CPUs. CUDA: an entry is a GPU device
  id, with a session per device.
* ``tp_mode`` (CPU only): one route whose workers use the mask's CPUs as ORT intra-op
  threads (``all`` = every CPU this process may use, ``auto`` = ORT's default).
* neither: ORT's own threading, exactly as a plain ``onnxruntime.InferenceSession``.

The workers of a device share one ORT session (weights loaded once; ORT's ``run`` is
thread-safe). ``disable_dup_context`` gives each worker a session of its own.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from typing import Any, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

from ..compat import OrtArguments, ort, ort_error, ort_session_class
from ..errors import BackendUnavailableError, InvalidArgumentError, InvalidTypeError
from ..io import ONNX_TO_NUMPY, FeedBatcher, OrtFeed, TensorSpec, check_batchable
from ..options import TP_MODE_MASKS, SessionConfig
from .base import Backend, Request
from .weights import LOCATION as WEIGHTS_LOCATION
from .weights import SplitModel, split_weights

__all__ = ["CPU", "CUDA", "OrtBackend", "OrtWorker", "allowed_cpus", "available_providers"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_CAN_PIN = hasattr(os, "sched_setaffinity")
#: Config entries of sessions that borrow the shared weights (see ``weights.py``).
_SHARING_ENTRIES = (
    ("session.use_external_initializer_file_buffers_directly", "1"),
    ("session.disable_prepacking", "1"),
    ("session.use_env_allocators", "1"),
)
#: The lone-run session's pool threads spin for at most 1 ms after their work, then sleep:
#: long enough to bridge the gaps between a run's parallel sections and between the runs of
#: a caller's loop, short enough to hand the cores back to the workers soon after a lone run.
_WIDE_SPIN = ("session.intra_op.spin_duration_us", "1000")
_env_arena_lock = threading.Lock()
_env_arena = False  # registered in this process


def allowed_cpus() -> List[int]:
    """CPU ids this process may run on (all CPUs where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def available_providers() -> List[str]:
    """The execution providers this onnxruntime build has."""
    return list(ort().get_available_providers())


def _spec(arg: Any) -> TensorSpec:
    shape = arg.shape
    dims: Optional[Tuple[Union[int, str, None], ...]]
    if shape is None:
        dims = None
    else:
        dims = tuple(d if isinstance(d, (int, str)) or d is None else None for d in shape)
    return TensorSpec(arg.name, dims, arg.type, ONNX_TO_NUMPY.get(arg.type))


class OrtWorker:
    """Runs requests on one ORT session (shared or its own), on one thread.

    On CPU it calls the session's C++ binding directly: ORT's Python ``run`` adds a check
    that every input is fed (ezrt's feed parser has already made it) and a retry on CPU
    after a GPU provider failure (meaningless on CPU), about 1.5 us of Python per call on
    the worker, which is the pipeline's critical path for small models. ``alone`` is the
    wide session a task finding nothing else to do runs on (see ``Runner`` in the engine).
    """

    __slots__ = ("_outputs", "_run", "_run_alone", "_session", "run_alone")

    def __init__(self, session: Any, *, direct: bool, alone: Any = None) -> None:
        self._session = session
        self._outputs = [output.name for output in session.get_outputs()]
        self._run = _entry(session, direct)
        self._run_alone = _entry(alone, direct) if alone is not None else None
        self.run_alone = self._alone if alone is not None else None

    def run(self, request: Request) -> List[Any]:
        try:
            return self._run(  # type: ignore[no-any-return]
                request.fetch or self._outputs, request.inputs, request.run_options
            )
        except Exception as exc:
            _reraise(exc)

    def _alone(self, request: Request) -> List[Any]:
        try:
            return self._run_alone(  # type: ignore[no-any-return,misc]
                request.fetch or self._outputs, request.inputs, request.run_options
            )
        except Exception as exc:
            _reraise(exc)

    def close(self) -> None:
        self._session = None
        self._run = self._run_alone = self.run_alone = None


def _entry(session: Any, direct: bool) -> Any:
    """The call that runs ``session``: its C++ binding (``direct``) or its Python ``run``."""
    binding = getattr(session, "_sess", None) if direct else None
    return getattr(binding, "run", None) or session.run


class OrtBackend(Backend):
    """One model on ONNX Runtime, with the sessions its workers need."""

    def __init__(
        self,
        model: Union[str, bytes],
        arguments: OrtArguments,
        config: SessionConfig,
        *,
        share_with: Optional[OrtBackend] = None,
    ) -> None:
        self.model = model
        self.config = config
        self._arguments = arguments
        options = arguments.sess_options
        if options is not None and not isinstance(options, ort().SessionOptions):
            raise InvalidTypeError(
                "sess_options must be an onnxruntime.SessionOptions or None "
                f"(got {type(options).__name__})"
            )
        self._lock = threading.Lock()  # guards the borrowed SessionOptions while building
        self._check_config()
        self._pins: Dict[Optional[int], Optional[List[int]]] = {}
        self._intra, self._affinities = self._plan_threads()
        self._spare: List[Any] = []
        self.master: Any  # the ORT session that holds the weights
        #: With ``schedule`` on CPU: the session that runs a task finding the workers idle,
        #: with an intra-op thread per scheduled CPU (None: lone tasks run on one core).
        self.wide: Any = None
        #: With ``share_weights``: the buffer every session here borrows its weights from.
        self.shared_weights: Optional[SplitModel] = None
        if share_with is not None:
            self._share(share_with)
        elif self._may_share_weights() and self._open_sharing():
            pass  # narrow and wide sessions on one copy of the weights
        else:
            self.master = self._new_session(None)
            self.device = CUDA if CUDA in self.master.get_providers() else CPU
            self._check_device()
            self._sessions = self._route_sessions()
            if self._lone_runs_wide():
                self.wide = self._new_session(None, wide=True)
        self.inputs = [_spec(arg) for arg in self.master.get_inputs()]
        self.outputs = [_spec(arg) for arg in self.master.get_outputs()]

    def _share(self, master: OrtBackend) -> None:
        """``use_weight_from``: run on the master's sessions (same model, same provider)."""
        if master.model_digest != self.model_digest:
            raise InvalidArgumentError(
                "use_weight_from on the ONNX Runtime backend shares the master's loaded "
                "model, so both sessions must open the same model on the same provider "
                f"(master: {master.device}, sha256 {master.model_digest[:12]}; "
                f"this one: sha256 {self.model_digest[:12]})"
            )
        self.master, self.device = master.master, master.device
        self._sessions = {route: master.master for route in self.config.routes}
        if master.device == CUDA:
            self._sessions = dict(master._sessions)
        self._shared = True

    @functools.cached_property
    def model_digest(self) -> str:
        """sha256 of the model bytes: weight sharing needs the same model."""
        data = self.model if isinstance(self.model, bytes) else _read(self.model)
        return hashlib.sha256(data).hexdigest()

    @property
    def name(self) -> str:
        return "ONNX Runtime"

    @property
    def ort_session(self) -> Any:
        return self.master

    # ------------------------------------------------------------------ configuration

    def _check_config(self) -> None:
        config = self.config
        if "zero_copy_layout" in config.given:
            raise InvalidArgumentError(
                "zero_copy_layout selects an RKNN NPU memory layout; it does not apply to the "
                "ONNX Runtime backend, whose tensors always use the model's own layout"
            )
        if "output_dtype" in config.given:
            raise InvalidArgumentError(
                "output_dtype chooses between dequantised float32 and native RKNN outputs; "
                "ONNX Runtime always returns each output in the model's own dtype"
            )
        if config.custom_op_default_path:
            raise InvalidArgumentError(
                "custom_op_default_path loads RKNN plugins (librkcst_*.so) from the NPU "
                "runtime's directory; the ONNX Runtime backend has no such directory: "
                "pass the library files in custom_op_paths"
            )
        for path in config.custom_op_paths:
            if not os.path.isfile(path):
                raise InvalidArgumentError(f"custom_op_paths: library not found: {path!r}")

    def _check_device(self) -> None:
        config = self.config
        if self.device == CUDA:
            if config.tp_mode is not None:
                raise InvalidArgumentError(
                    "tp_mode splits one task over CPU or NPU cores; it is not meaningful for "
                    "CUDAExecutionProvider (use schedule=[device ids] for several GPUs)"
                )
            return
        cpus = allowed_cpus()
        for core in config.schedule or ():
            if core not in cpus:
                raise InvalidArgumentError(
                    f"schedule core {core} is not a CPU this process may use "
                    f"(allowed CPUs: {_ranges(cpus)})"
                )

    def _plan_threads(self) -> Tuple[Optional[int], Optional[str]]:
        """Intra-op threads and pool-thread affinities for CPU sessions; set worker pins.

        (Thread settings do not matter to a CUDA session's compute, so the same plan
        serves both; a CUDA topology is recognised once the session says CUDA is used.)
        """
        config = self.config
        if config.schedule is not None:
            for core in set(config.schedule):
                self._pins[core] = [core] if _CAN_PIN else None
            return 1, None
        if config.tp_mode is None or config.tp_mode == "auto":
            self._pins[None] = None
            return None, None
        cpus = allowed_cpus()
        if config.tp_mode == "all":
            self._pins[None] = None
            return len(cpus), None
        mask = TP_MODE_MASKS[config.tp_mode]
        cores = [bit for bit in range(16) if mask >> bit & 1]
        unavailable = [core for core in cores if core not in cpus]
        if unavailable:
            raise InvalidArgumentError(
                f"tp_mode '{config.tp_mode}' needs CPUs {cores}, but this process may only use "
                f"CPUs {_ranges(cpus)}"
            )
        self._pins[None] = cores if _CAN_PIN else None
        # ORT pins its pool threads (not the calling thread, which is the worker); it counts
        # logical processors from 1 ("Processor id must start from 1"), so CPU n is n + 1.
        affinities = ";".join(str(core + 1) for core in cores[1:]) if _CAN_PIN else None
        return len(cores), affinities or None

    def _session_options(self) -> Any:
        """The caller's SessionOptions (borrowed while a session is built), or a fresh one."""
        options = self._arguments.sess_options
        if options is None:
            options = ort().SessionOptions()
        if self._affinities is not None:
            _set_config_entry(options, "session.intra_op_thread_affinities", self._affinities)
        for path in self.config.custom_op_paths:
            self._register_custom_ops(options, path)
        return options

    @staticmethod
    def _register_custom_ops(options: Any, path: str) -> None:
        try:
            options.register_custom_ops_library(path)
        except Exception as exc:
            raise InvalidArgumentError(
                f"custom_op_paths: {path!r} is not an ONNX Runtime custom-op library "
                f"(it must export RegisterCustomOps): {exc}"
            ) from exc

    def _new_session(self, device_id: Optional[int], *, wide: bool = False) -> Any:
        """An ORT session from the caller's arguments; ``device_id`` moves CUDA to a GPU.
        ``wide``: the session of lone calls, with an intra-op thread per scheduled CPU."""
        arguments = self._arguments
        providers, provider_options = arguments.providers, arguments.provider_options
        if device_id is not None:
            providers, provider_options = _on_device(providers, provider_options, device_id)
        intra = len(self.config.routes) if wide else self._intra
        needs_options = (
            intra is not None or self._affinities is not None or self.config.custom_op_paths
        )
        with self._lock:
            options = self._session_options() if needs_options else arguments.sess_options
            if wide and arguments.sess_options is None:
                # A session of the caller's is left as it was given.
                self._configure_wide(options)
            saved = None
            if intra is not None:
                saved = (options.intra_op_num_threads, options.inter_op_num_threads)
                options.intra_op_num_threads = intra
                options.inter_op_num_threads = 1
            try:
                return ort_session_class()(
                    self.model, options, providers, provider_options, **arguments.kwargs
                )
            except Exception as exc:
                _reraise(exc)
            finally:
                if saved is not None:
                    options.intra_op_num_threads, options.inter_op_num_threads = saved

    def _configure_wide(self, options: Any) -> None:
        """The lone-run session's pool threads: brief spinning, and kept on the scheduled
        CPUs. Each may run on any of them (pinning each to one CPU measured slower: when a
        worker starts a task beside a lone run, the pool thread can no longer move away)."""
        options.add_session_config_entry(*_WIDE_SPIN)
        cores = [core for core in self.config.routes if core is not None]
        if _CAN_PIN and len(cores) > 1:
            anywhere = ",".join(str(core + 1) for core in cores)  # ORT counts CPUs from 1
            pins = ";".join([anywhere] * (len(cores) - 1))  # one entry per pool thread
            options.add_session_config_entry("session.intra_op_thread_affinities", pins)

    def _lone_runs_wide(self) -> bool:
        """Whether lone tasks get every scheduled core (``lone_run``, see the README).

        ``auto``: when ezrt builds the sessions' options itself, so that the wide session
        shares the weights and the activation arena with the workers' session and costs
        little; with the caller's own SessionOptions it would hold a second copy of both.
        """
        config = self.config
        if self.device != CPU or config.schedule is None or len(config.routes) < 2:
            return False
        if config.lone_run == "auto":
            return self._arguments.sess_options is None
        return config.lone_run == "all_cores"

    # ------------------------------------------------------------------ one copy of the weights

    def _may_share_weights(self) -> bool:
        """The narrow and wide sessions may borrow one copy of the weights: ``schedule`` on
        CPU, and the session options are ezrt's own (a caller's SessionOptions would keep
        the borrowed buffer and the config entries after this session is gone)."""
        config, arguments = self.config, self._arguments
        if not config.share_weights or config.disable_dup_context:
            return False
        if config.schedule is None or arguments.sess_options is not None:
            return False
        return _names_cpu_only(arguments.providers)

    def _open_sharing(self) -> bool:
        """Build the workers' session (and the wide one) on one shared copy of the weights;
        False when the model has nothing to share (it is then loaded as it is)."""
        split = split_weights(self.model)
        if split is None:
            return False
        _register_env_arena()
        self.shared_weights = split
        self.master = self._borrowing_session(1)
        self.device = CPU
        self._check_device()
        self._sessions = self._route_sessions()
        if self._lone_runs_wide():
            self.wide = self._borrowing_session(len(self.config.routes))
        return True

    def _borrowing_session(self, intra: int) -> Any:
        """A session on the shared weights, with ``intra`` intra-op threads. Prepacking is
        off (a prepacked copy would be per session); activations come from one arena."""
        assert self.shared_weights is not None
        options = ort().SessionOptions()
        options.intra_op_num_threads = intra
        options.inter_op_num_threads = 1
        for key, value in _SHARING_ENTRIES:
            options.add_session_config_entry(key, value)
        if intra > 1:
            self._configure_wide(options)
        for path in self.config.custom_op_paths:
            self._register_custom_ops(options, path)
        weights = self.shared_weights.weights
        options.add_external_initializers_from_files_in_memory(
            [WEIGHTS_LOCATION], [weights], [weights.nbytes]
        )
        arguments = self._arguments
        try:
            return ort_session_class()(
                self.shared_weights.model,
                options,
                arguments.providers,
                arguments.provider_options,
                **arguments.kwargs,
            )
        except Exception as exc:
            _reraise(exc)

    def _route_sessions(self) -> Dict[Optional[int], Any]:
        """The session of each route: the master, or (CUDA schedule) one per GPU."""
        routes = self.config.routes
        self._shared = not self.config.disable_dup_context
        if not self._shared:
            # The first worker of the first route adopts the master; the others build theirs.
            self._spare.append(self.master)
            return {}
        if self.device != CUDA or self.config.schedule is None:
            return {route: self.master for route in routes}
        sessions = {}
        master_device = _device_id(self.master)
        for route in routes:
            sessions[route] = self.master if route == master_device else self._cuda_session(route)
        return sessions

    def _cuda_session(self, device_id: Optional[int]) -> Any:
        session = self._new_session(device_id)
        if CUDA not in session.get_providers():
            raise BackendUnavailableError(
                f"CUDAExecutionProvider could not be initialised for device {device_id} "
                f"(onnxruntime used {session.get_providers()}); check the CUDA/cuDNN install"
            )
        return session

    # ------------------------------------------------------------------ the backend

    def make_feed(self) -> OrtFeed:
        names = [spec.name for spec in self.outputs]
        return OrtFeed(self.inputs, names, self.config.layout, self._probe)

    def _probe(self, feed: Dict[str, Any], output_names: Any) -> None:
        """ORT's own verdict on a call ezrt's checks refused: raises ORT's error (ORT checks
        a call before it runs anything). Returns only if ORT accepts it after all."""
        names = output_names if output_names else [spec.name for spec in self.outputs]
        try:
            self.master._sess.run(names, feed, None)
        except Exception as exc:
            _reraise(exc)

    def make_batcher(self) -> FeedBatcher:
        check_batchable(self.inputs, self.outputs)
        return FeedBatcher(
            [spec.name for spec in self.inputs],
            lambda inputs, fetch: Request(inputs, fetch),
        )

    def request_inputs(self, arrays: Sequence[Any]) -> Dict[str, Any]:
        return dict(zip((spec.name for spec in self.inputs), arrays))

    def input_args(self, user_shapes: Sequence[Any]) -> List[Any]:
        if any(shape != spec.shape for spec, shape in zip(self.inputs, user_shapes)):
            return super().input_args(user_shapes)  # ezrt's layout option: caller's shapes
        return list(self.master.get_inputs())

    def output_args(self) -> List[Any]:
        return list(self.master.get_outputs())

    def lone_runner(self) -> OrtWorker:
        """Runs a waiting caller's task on its own thread when a worker's place is free: on
        the workers' session, or on the wide session (if any) when the engine is idle."""
        return OrtWorker(self.master, direct=self.device == CPU, alone=self.wide)

    def make_worker(self, core: Optional[int], slot: int) -> OrtWorker:
        """Called in the worker's own thread: pin it, then give it its session."""
        pins = self._pins.get(core)
        if pins is not None and self.device != CUDA:
            os.sched_setaffinity(0, pins)
        if self._shared:
            session = self._sessions[core]
        else:
            with self._lock:
                session = self._spare.pop() if self._spare else None
            if session is None:
                session = (
                    self._cuda_session(core)
                    if self.device == CUDA and core is not None
                    else self._new_session(None)
                )
        return OrtWorker(session, direct=self.device == CPU, alone=self.wide)

    def metadata(self) -> Any:
        return self.master.get_modelmeta()

    def providers(self) -> List[str]:
        return list(self.master.get_providers())

    def provider_options(self) -> Dict[str, Dict[str, Any]]:
        return dict(self.master.get_provider_options())

    def io_binding(self, session: Any) -> Any:
        return self.master.io_binding()

    def run_bound(self, binding: Any, run_options: Any) -> None:
        """ORT's ``run_with_iobinding`` on the session that made the binding."""
        self.master.run_with_iobinding(binding, run_options)

    def set_providers(self, providers: Any, provider_options: Any) -> None:
        """ORT's ``set_providers`` on the master; the workers' sessions follow it."""
        self.master.set_providers(providers, provider_options)
        self._arguments = self._arguments._replace(
            providers=providers, provider_options=provider_options
        )
        self.device = CUDA if CUDA in self.master.get_providers() else CPU
        self._check_device()
        self._spare = []
        self._sessions = self._route_sessions()

    def close(self) -> None:
        self._sessions = {}
        self._spare = []


def _register_env_arena() -> None:
    """Register ONNX Runtime's shared CPU arena once per process: the sessions that borrow
    the shared weights draw their activations from it (``session.use_env_allocators``),
    instead of an arena each. Sessions that do not ask for it are not affected."""
    global _env_arena
    with _env_arena_lock:
        if _env_arena:
            return
        module = ort()
        memory = module.OrtMemoryInfo(
            "Cpu", module.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, module.OrtMemType.DEFAULT
        )
        try:
            module.create_and_register_allocator(memory, module.OrtArenaCfg(0, -1, -1, -1))
        except Exception as exc:  # registered already (by the application itself): use it
            if "already" not in str(exc).lower():
                raise
        _env_arena = True


def _names_cpu_only(providers: Any) -> bool:
    """``providers`` (ORT's forms) asks for the CPU provider only, or for nothing."""
    if providers is None:
        return True
    if isinstance(providers, str) or not isinstance(providers, (list, tuple)):
        return False
    names = [entry[0] if isinstance(entry, (list, tuple)) else entry for entry in providers]
    return bool(names) and all(name == CPU for name in names)


def _reraise(error: Exception) -> NoReturn:
    """Raise ORT's ``error`` as ezrt raises it (see :func:`ezrt.compat.ort_error`)."""
    converted = ort_error(error)
    if converted is error:
        raise error
    raise converted from error


def _on_device(providers: Any, provider_options: Any, device_id: int) -> Tuple[Any, Any]:
    """The caller's providers with CUDA moved to ``device_id`` (ORT's forms kept)."""
    if providers is None:
        return [(CUDA, {"device_id": device_id}), CPU], None
    if provider_options is not None:
        options = [
            {**opts, "device_id": device_id} if name == CUDA else opts
            for name, opts in zip(providers, provider_options)
        ]
        return list(providers), options
    moved: List[Any] = []
    for entry in providers:
        name, opts = (entry, {}) if isinstance(entry, str) else entry
        moved.append((CUDA, {**opts, "device_id": device_id}) if name == CUDA else entry)
    return moved, None


def _device_id(session: Any) -> int:
    options = session.get_provider_options().get(CUDA, {})
    try:
        return int(options.get("device_id", 0))
    except (TypeError, ValueError):
        return 0


def _set_config_entry(options: Any, key: str, value: str) -> None:
    try:
        current = options.get_session_config_entry(key)
    except Exception:
        current = None
    if current is None:
        options.add_session_config_entry(key, value)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _ranges(cpus: Sequence[int]) -> str:
    return ", ".join(str(c) for c in cpus) or "none"
