"""The ONNX Runtime backend: CPU everywhere, CUDA where the installed onnxruntime has it.

Topology, from the session config:

* ``schedule`` (data parallel). CPU: an entry is a CPU id; each worker pins its thread to
  its CPU (Linux ``sched_setaffinity``; elsewhere workers are not pinned) and runs with one
  intra-op thread, so N workers use N CPUs. CUDA: an entry is a GPU device id.
* ``tp_mode`` (CPU only): one route whose workers use the mask's CPUs as ORT intra-op
  threads (``all`` = every CPU this process may use, ``auto`` = ORT's default).
* neither: ORT's own threading, exactly as a plain ``onnxruntime.InferenceSession``.

By default the workers of a device share one ORT session (weights loaded once; ORT's
``run`` is thread-safe). ``disable_dup_context`` gives each worker a session of its own.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import BackendUnavailableError, InferenceError, InvalidArgumentError
from ..io import ONNX_TO_NUMPY, ModelMetadata, TensorSpec
from ..options import TP_MODE_MASKS, SessionConfig
from .base import Request

__all__ = ["CPU", "CUDA", "OrtBackend", "allowed_cpus", "available_providers"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_CAN_PIN = hasattr(os, "sched_setaffinity")


def allowed_cpus() -> List[int]:
    """CPU ids this process may run on (all CPUs where the OS cannot say)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


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
    that every input is fed (ezrt's feed parser has already made sure) and a retry on CPU
    after a GPU provider failure (meaningless on CPU), about 1.5 us of Python per call on
    the worker, which is the pipeline's critical path for small models.
    """

    __slots__ = ("_input_names", "_outputs", "_run", "_session")

    def __init__(self, session: Any, input_names: Sequence[str], *, direct: bool) -> None:
        self._session = session
        self._input_names = tuple(input_names)
        self._outputs = [output.name for output in session.get_outputs()]
        binding = getattr(session, "_sess", None) if direct else None
        self._run = getattr(binding, "run", None) or session.run

    def run(self, request: Request) -> List[Any]:
        try:
            return self._run(  # type: ignore[no-any-return]
                request.fetch or self._outputs,
                dict(zip(self._input_names, request.inputs)),
                None,
            )
        except Exception as exc:
            raise InferenceError(f"onnxruntime run failed: {exc}") from exc

    def close(self) -> None:
        self._session = None
        self._run = None


class OrtBackend:
    """One model on ONNX Runtime, with the sessions its workers need."""

    def __init__(
        self,
        model: Union[str, bytes],
        config: SessionConfig,
        *,
        device: str = CPU,
        sess_options: Any = None,
        ep_options: Optional[Dict[str, Any]] = None,
        share_with: Optional[OrtBackend] = None,
    ) -> None:
        self._ort = _ort()
        self.model = model
        self.config = config
        self.device = device
        self._user_options = sess_options
        self._ep_options = dict(ep_options or {})
        self._lock = threading.Lock()  # guards _options_in_use (sessions built from workers)
        self._check_config()
        self._custom_ops = self._check_custom_ops()
        # Per worker: which CPUs to pin to (None = leave as is).
        self._pins: Dict[Optional[int], Optional[List[int]]] = {}
        self._intra, self._affinities = self._plan_threads()
        self._sessions: Dict[Optional[int], Any] = {}
        self._spare: List[Any] = []
        self.master: Any  # the ORT session used for metadata (and shared by default)
        if share_with is not None:
            if share_with.model_digest != self.model_digest or share_with.device != device:
                raise InvalidArgumentError(
                    "use_weight_from on the ONNX Runtime backend shares the master's loaded "
                    "model, so both sessions must open the same model on the same provider "
                    f"(master: {share_with.device}, sha256 {share_with.model_digest[:12]}; "
                    f"this one: {device}, sha256 {self.model_digest[:12]})"
                )
            self._sessions = dict.fromkeys(self.config.routes, share_with.master)
            self.master = share_with.master
            self._shared = True
        else:
            self._shared = not config.disable_dup_context
            if self._shared:
                for route in self.config.routes:
                    self._sessions[route] = self._new_session(route)
                self.master = self._sessions[self.config.routes[0]]
            else:
                # The first worker of the first route adopts this one; the others build theirs.
                self.master = self._new_session(self.config.routes[0])
                self._spare.append(self.master)
        self.inputs = [_spec(arg) for arg in self.master.get_inputs()]
        self.outputs = [_spec(arg) for arg in self.master.get_outputs()]

    @functools.cached_property
    def model_digest(self) -> str:
        """sha256 of the model bytes: weight sharing needs the same model."""
        data = self.model if isinstance(self.model, bytes) else _read(self.model)
        return hashlib.sha256(data).hexdigest()

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

    def _check_custom_ops(self) -> Tuple[str, ...]:
        for path in self.config.custom_op_paths:
            if not os.path.isfile(path):
                raise InvalidArgumentError(f"custom_op_paths: library not found: {path!r}")
        return self.config.custom_op_paths

    def _plan_threads(self) -> Tuple[Optional[int], Optional[str]]:
        """Intra-op threads and pool-thread affinities for this topology; set worker pins."""
        config = self.config
        if self.device == CUDA:
            return None, None
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
        # ORT pins its pool threads (not the calling thread, which is the worker).
        affinities = ";".join(str(core) for core in cores[1:]) if _CAN_PIN else None
        return len(cores), affinities or None

    def _session_options(self) -> Any:
        """The user's SessionOptions (borrowed), or a fresh one."""
        options = self._user_options
        if options is None:
            options = self._ort.SessionOptions()
        if self._affinities is not None:
            _set_config_entry(options, "session.intra_op_thread_affinities", self._affinities)
        for path in self._custom_ops:
            try:
                options.register_custom_ops_library(path)
            except Exception as exc:
                raise InvalidArgumentError(
                    f"custom_op_paths: {path!r} is not an ONNX Runtime custom-op library "
                    f"(it must export RegisterCustomOps): {exc}"
                ) from exc
        return options

    def _new_session(self, route: Optional[int]) -> Any:
        ort = self._ort
        if self.device == CUDA:
            device_id = route if route is not None else int(self._ep_options.get("device_id", 0))
            providers: List[Any] = [(CUDA, {**self._ep_options, "device_id": device_id}), CPU]
        else:
            providers = [CPU]
        with self._lock:
            options = self._session_options()
            saved = (options.intra_op_num_threads, options.inter_op_num_threads)
            try:
                if self._intra is not None:
                    options.intra_op_num_threads = self._intra
                    options.inter_op_num_threads = 1
                session = ort.InferenceSession(
                    self.model, sess_options=options, providers=providers
                )
            except InvalidArgumentError:
                raise
            except Exception as exc:
                raise InvalidArgumentError(f"onnxruntime could not load the model: {exc}") from exc
            finally:
                options.intra_op_num_threads, options.inter_op_num_threads = saved
        if self.device == CUDA and CUDA not in session.get_providers():
            raise BackendUnavailableError(
                "CUDAExecutionProvider could not be initialised for device "
                f"{providers[0][1]['device_id']} "
                f"(onnxruntime used {session.get_providers()}); check the CUDA/cuDNN install"
            )
        return session

    # ------------------------------------------------------------------ the protocol

    def make_worker(self, core: Optional[int], slot: int) -> OrtWorker:
        """Called in the worker's own thread: pin it, then give it its session."""
        pins = self._pins.get(core)
        if pins is not None:
            os.sched_setaffinity(0, pins)
        if self._shared:
            session = self._sessions[core]
        else:
            with self._lock:
                session = (
                    self._spare.pop() if self._spare and core == self.config.routes[0] else None
                )
            if session is None:
                session = self._new_session(core)
        return OrtWorker(session, [spec.name for spec in self.inputs], direct=self.device == CPU)

    def metadata(self) -> ModelMetadata:
        meta = self.master.get_modelmeta()
        return ModelMetadata(
            producer_name=meta.producer_name,
            graph_name=meta.graph_name,
            domain=meta.domain,
            description=meta.description,
            graph_description=meta.graph_description,
            version=meta.version,
            custom_metadata_map=dict(meta.custom_metadata_map),
        )

    def providers(self) -> List[str]:
        return list(self.master.get_providers())

    def provider_options(self) -> Dict[str, Dict[str, Any]]:
        return dict(self.master.get_provider_options())

    def run_with_iobinding(self, binding: Any, run_options: Any = None) -> None:
        self.master.run_with_iobinding(binding, run_options)

    def io_binding(self) -> Any:
        return self.master.io_binding()

    def close(self) -> None:
        self._sessions.clear()


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


def available_providers() -> List[str]:
    return list(_ort().get_available_providers())
