"""The RKNPU2 backend: one librknnrt context per worker, each pinned to its NPU core.

Every copy-path context is created up front, in the constructing thread: context 0 by
``rknn_init``, the others by ``rknn_dup_context`` (weights shared) or a fresh ``rknn_init``
when dup is disabled (option, custom ops, or weight sharing, where each init borrows the
master's weights). Each context gets its core mask (``schedule``: ``1 << core``; otherwise
the ``tp_mode`` mask). If anything fails half-way, every context already made is destroyed.

Zero copy (``OrtValue`` / ``IOBinding``) uses contexts of its own, made on first use the same
way: a *home* context that allocates NPU memory (``rknn_create_mem``) and imports dma-bufs,
and one context per worker that runs bound inferences (``rknn_set_io_mem`` + ``rknn_run``).
A context whose I/O memory was set never runs ``rknn_inputs_set``, so a bound buffer can
never be overwritten by another task's input. Every context sits in a
:class:`~ezrt.backends.rknn.memory.ContextSlot`: one thread at a time calls the runtime on
it, so bound runs are safe beside ``run_async`` and run on every worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import EzrtError, EzrtWarning, InvalidArgumentError
from ...io import ModelMetadata, NodeArg
from ...options import SessionConfig
from ..base import Backend, Request
from . import abi
from .bound import RknnZeroCopy
from .contexts import Contexts, check_schedule
from .memory import ContextSlot
from .model import query, query_attr, read_model
from .native import native_arg
from .plugins import Plugin, load_plugins
from .zerocopy import BoundRun, ZeroCopyModel

__all__ = ["RknnBackend", "RknnWorker"]

logger = logging.getLogger("ezrt")
perf_logger = logging.getLogger("ezrt.perf")

PERF_ENV = "ZTU_EZRKNN_ASYNC_PRINT_PERF"
#: Where ``custom_op_default_path`` looks for ``librkcst_*.so`` plugins.
DEFAULT_PLUGIN_DIR = "/usr/lib/rknpu/op_plugins/"


def _perf_enabled() -> bool:
    return os.environ.get(PERF_ENV, "").lower() in ("1", "true", "on", "yes")


class RknnWorker:
    """Runs requests on one context, from one thread; bound runs on its zero-copy context."""

    def __init__(self, backend: RknnBackend, slot: ContextSlot, index: int, core: Optional[int]):
        self._backend = backend
        self._slot = slot
        self._index = index
        self._core = -1 if core is None else core
        self._perf = backend.perf

    def run(self, request: Any) -> Any:
        if type(request) is BoundRun:
            return self._backend.execute_bound(request, self._index)
        with self._slot:
            return self._run(request)

    def _run(self, request: Request) -> List[Any]:
        backend = self._backend
        rt = backend.rt
        ctx = self._slot.ctx
        arrays = backend.to_native_layout(request.inputs)
        started = time.perf_counter()
        if backend.model_info.dynamic:
            shapes = backend.shape_attrs(arrays)
            abi.check(
                "rknn_set_input_shapes",
                rt.optional("rknn_set_input_shapes")(ctx, len(arrays), shapes),
            )
        inputs = (abi.Input * len(arrays))()
        for i, (array, fmt) in enumerate(zip(arrays, backend.model_info.input_fmts)):
            entry = inputs[i]
            entry.index = i
            entry.buf = array.ctypes.data
            entry.size = array.nbytes
            entry.pass_through = 0
            entry.type = abi.NUMPY_TO_TENSOR_TYPE[array.dtype]
            entry.fmt = fmt
        abi.check("rknn_inputs_set", rt.rknn_inputs_set(ctx, len(arrays), inputs))
        set_input = time.perf_counter()
        abi.check("rknn_run", rt.rknn_run(ctx, None))
        ran = time.perf_counter()
        results = backend.fetch_outputs(ctx)
        done = time.perf_counter()
        if self._perf:
            perf_logger.info(
                "[ztu_ez_rknn_async_perf] thread_id=%d core_id=%d set_input_us=%d infer_us=%d "
                "copy_output_us=%d total_us=%d",
                self._index,
                self._core,
                (set_input - started) * 1e6,
                (ran - set_input) * 1e6,
                (done - ran) * 1e6,
                (done - started) * 1e6,
            )
        if request.fetch is None:
            return results
        return [results[backend.output_index[name]] for name in request.fetch]

    def close(self) -> None:
        """Contexts are destroyed by the backend once every worker has stopped."""


class RknnBackend(Backend):
    """One .rknn model on the NPU, with a context per worker."""

    @property
    def feed_layout(self) -> str:
        """The FeedParser must not transform layouts: this backend reports the caller's
        shapes and converts itself (the runtime accepts NCHW or NHWC for 4-D inputs)."""
        return "nchw"

    def __init__(
        self,
        model: bytes,
        config: SessionConfig,
        *,
        share_with: Optional[RknnBackend] = None,
        runtime: Optional[abi.Runtime] = None,
        given_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.config = config
        self._given_options = dict(given_options or {})
        check_schedule(config)
        self.rt = runtime or abi.load_runtime()
        self.perf = _perf_enabled()
        if config.wants_custom_ops:  # said first, as upstream: even if loading then fails
            warnings.warn(
                "Custom op loading requested; dup_context is disabled for this session to "
                "avoid known RKNN stability issues.",
                EzrtWarning,
                stacklevel=4,
            )
        plugins: List[Plugin] = []
        if config.wants_custom_ops:
            default_dir = DEFAULT_PLUGIN_DIR if config.custom_op_default_path else None
            plugins = load_plugins(config.custom_op_paths, default_dir)
        lender = share_with.contexts if share_with is not None else None
        #: This session's contexts (a ``use_weight_from`` session borrows their weights).
        self.contexts: Contexts = Contexts(
            self.rt, model, config, self, lender=lender, plugins=plugins
        )
        try:
            self.model_info = read_model(self.rt, self.contexts.open_first().ctx, config)
            self.inputs = self.model_info.inputs
            self.outputs = self.model_info.outputs
            self.output_index = self.model_info.output_index
            self.contexts.open_workers(config.threads_per_core * len(config.routes))
        except BaseException:
            self.contexts.destroy_all()
            raise
        self._zero_copy = RknnZeroCopy(self, self.rt, self.contexts, self.model_info, config)
        self.contexts.borrow()

    # ------------------------------------------------------------------ running

    def to_native_layout(self, arrays: Tuple[np.ndarray, ...]) -> List[np.ndarray]:
        """nchw_software: the caller's NCHW becomes NHWC here (the copy is the worker's)."""
        return [
            np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if transpose else a
            for a, transpose in zip(arrays, self.model_info.transpose)
        ]

    def shape_attrs(self, arrays: Sequence[np.ndarray]) -> Any:
        """Attrs for rknn_set_input_shapes: the runtime wants 4-D dims in NHWC order (W13)."""
        attrs = (abi.TensorAttr * len(arrays))()
        for i, (array, attr, fmt) in enumerate(
            zip(arrays, self.model_info.input_attrs, self.model_info.input_fmts)
        ):
            ctypes.memmove(ctypes.byref(attrs[i]), ctypes.byref(attr), ctypes.sizeof(attr))
            shape = array.shape
            if fmt == abi.FMT_NCHW and attr.fmt == abi.FMT_NHWC and len(shape) == 4:
                shape = (shape[0], shape[2], shape[3], shape[1])
            attrs[i].n_dims = len(shape)
            for axis, size in enumerate(shape):
                attrs[i].dims[axis] = size
            attrs[i].fmt = abi.FMT_NHWC if attr.fmt == abi.FMT_NHWC else abi.FMT_UNDEFINED
        return attrs

    def check_shapes(self, arrays: Sequence[np.ndarray]) -> None:
        """Dynamic models: the shapes must be one of the combinations the model allows."""
        self.model_info.check_shapes(arrays)

    def fetch_outputs(self, ctx: int) -> List[np.ndarray]:
        rt = self.rt
        attrs = self.model_info.output_attrs
        if self.model_info.dynamic:
            attrs = []
            for i in range(len(self.model_info.output_attrs)):
                current = abi.TensorAttr()
                current.index = i
                if query(self.rt, ctx, abi.QUERY_CURRENT_OUTPUT_ATTR, current) < 0:
                    current = query_attr(self.rt, ctx, abi.QUERY_OUTPUT_ATTR, i, "output attr")
                attrs.append(current)
        results = []
        outputs = (abi.Output * len(attrs))()
        for i, attr in enumerate(attrs):
            dtype = (
                np.dtype(np.float32)
                if self.model_info.want_float
                else abi.TENSOR_TYPES[attr.type][0]
            )
            if dtype is None:
                raise EzrtError(
                    f"output {i} has an RKNN type numpy cannot hold; use float32 outputs"
                )
            array = np.empty(attr.shape, dtype=dtype)
            entry = outputs[i]
            entry.want_float = 1 if self.model_info.want_float else 0
            entry.is_prealloc = 1
            entry.index = i
            entry.buf = array.ctypes.data
            entry.size = array.nbytes
            results.append(array)
        try:
            abi.check("rknn_outputs_get", rt.rknn_outputs_get(ctx, len(attrs), outputs, None))
        finally:
            rt.rknn_outputs_release(ctx, len(attrs), outputs)
        return results

    def make_worker(self, core: Optional[int], slot: int) -> RknnWorker:
        return RknnWorker(self, self.contexts.slots[slot], slot, core)

    # ------------------------------------------------------------------ the protocol

    def metadata(self) -> ModelMetadata:
        custom = (
            {"rknn_custom_string": self.model_info.custom_string}
            if self.model_info.custom_string
            else {}
        )
        return ModelMetadata(producer_name="rknn", custom_metadata_map=custom)

    def providers(self) -> List[str]:
        """As upstream 0.11: the canonical name, even when the alias was asked for."""
        return ["RKNPU2ExecutionProvider"]

    def provider_options(self) -> Dict[str, Dict[str, Any]]:
        """As upstream 0.11: the options as the caller gave them (a copy, not the object)."""
        return {"RKNPU2ExecutionProvider": dict(self._given_options)}

    @property
    def runtime_path(self) -> str:
        """The librknnrt file (or loader name) this session uses."""
        return self.rt.path

    @property
    def closed(self) -> bool:
        return self.contexts.closed

    def native_inputs(self) -> List[NodeArg]:
        """Inputs as zero copy binds them: native dims, type, layout and strides."""
        return [native_arg(spec) for spec in self.zero_copy.inputs]

    def native_outputs(self) -> List[NodeArg]:
        """Outputs as zero copy binds them: native dims, type, layout and strides."""
        return [native_arg(spec) for spec in self.zero_copy.outputs]

    # ------------------------------------------------------------------ zero copy

    @property
    def zero_copy(self) -> ZeroCopyModel:
        """This session's tensors as zero copy sees them (queried on first use)."""
        return self._zero_copy.view()

    def execute_bound(self, run: BoundRun, index: int) -> None:
        """One bound inference on worker ``index``'s zero-copy context."""
        self._zero_copy.execute(run, index)

    def bound_payload(self, binding: Any, run_options: Any = None) -> BoundRun:
        """The engine payload for ``run_with_iobinding``: checked and frozen on the caller's
        thread, run by whichever worker takes it (:meth:`RknnWorker.run`)."""
        from .binding import RknnIOBinding

        if not isinstance(binding, RknnIOBinding) or binding._backend is not self:
            raise InvalidArgumentError(
                "IoBinding belongs to a different session (make it with this session's "
                "io_binding())"
            )
        return binding.snapshot()

    def io_binding(self, session: Any) -> Any:
        """A new SessionIOBinding for ``session`` (which it keeps alive)."""
        from .binding import RknnIOBinding

        self.contexts.check_open()
        return RknnIOBinding(session, self)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free zero-copy memory, then destroy the contexts; a session whose weights others
        borrow keeps its contexts until they close."""
        if self.contexts.close():
            self._zero_copy.free_memories()
        self.contexts.release()
