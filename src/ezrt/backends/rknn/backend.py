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
import threading
import time
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import EzrtError, EzrtWarning, InvalidArgumentError
from ...io import ModelMetadata, NodeArg
from ...options import SessionConfig
from ..base import Backend, Request
from . import abi
from .contexts import Contexts, check_schedule
from .layout import NativeLayout, dense_strides, span_bytes
from .memory import ContextSlot, Memory
from .model import query, query_attr, read_model, try_attr
from .plugins import Plugin, load_plugins
from .values import IoSpec, RknnOrtValue
from .zerocopy import BoundRun, map_dmabuf

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


class _Ops:
    """librknnrt's memory calls, as :class:`~ezrt.backends.rknn.memory.Memory` uses them."""

    family = "rknpu2"

    def __init__(self, rt: abi.Runtime) -> None:
        self.rt = rt

    def destroy_mem(self, ctx: int, handle: Any) -> None:
        code = self.rt.optional("rknn_destroy_mem")(ctx, handle)
        if code < 0:  # nothing the caller could do: the memory is gone either way
            logger.warning("ezrt: rknn_destroy_mem failed: %s", abi.status_text(code))

    def mem_sync(self, ctx: int, handle: Any, mode: int) -> None:
        direction = {abi.SYNC_TO_DEVICE: "TO_DEVICE", abi.SYNC_FROM_DEVICE: "FROM_DEVICE"}
        code = self.rt.optional("rknn_mem_sync")(ctx, handle, mode)
        abi.check(f"rknn_mem_sync({direction.get(mode, mode)})", code)

    def import_fd(self, ctx: int, fd: int, virt_addr: int, size: int, offset: int) -> Any:
        handle = self.rt.optional("rknn_create_mem_from_fd")(ctx, fd, virt_addr, size, offset)
        if not handle:
            raise EzrtError(
                f"rknn_create_mem_from_fd failed (fd {fd}, {size} bytes at offset {offset})"
            )
        return handle

    def describe(self, handle: Any) -> Dict[str, int]:
        mem = handle.contents
        return {
            "virt_addr": int(mem.virt_addr or 0),
            "fd": int(mem.fd),
            "offset": int(mem.offset),
            "size": int(mem.size),
        }


def _native_strides(attr: Any) -> Tuple[int, ...]:
    """Element strides of a native RKNPU2 attr (w_stride/h_stride pad rows)."""
    dims = attr.shape
    if attr.fmt == abi.FMT_NHWC and len(dims) == 4:
        _, h, w, c = dims
        wp, hp = attr.w_stride or w, attr.h_stride or h
        return (hp * wp * c, wp * c, c, 1)
    if attr.fmt == abi.FMT_NC1HWC2 and len(dims) == 5:
        _, c1, h, w, c2 = dims
        wp, hp = attr.w_stride or w, attr.h_stride or h
        return (c1 * hp * wp * c2, hp * wp * c2, wp * c2, c2, 1)
    if attr.fmt == abi.FMT_NCHW and len(dims) == 4:
        _, c, h, w = dims
        wp, hp = attr.w_stride or w, attr.h_stride or h
        return (c * hp * wp, hp * wp, wp, 1)
    return dense_strides(dims)


def _copy_attr(attr: Any) -> Any:
    return abi.TensorAttr.from_buffer_copy(attr)


#: Element types RKNN's NATIVE_NHWC queries support (upstream asks only for these).
_NHWC_TYPES = (0, 1, 2, 3)


class _ZeroCopy:
    """The zero-copy view of one RKNPU2 session: its tensors and its memory calls."""

    family = "rknpu2"

    def __init__(self, backend: RknnBackend, inputs: List[IoSpec], outputs: List[IoSpec]):
        self._backend = backend
        self.inputs = inputs
        self.outputs = outputs

    def allocate(self, spec: IoSpec, mem_flags: int) -> Memory:
        return self._backend.allocate(spec.alloc_bytes, mem_flags)

    def import_dmabuf(
        self, spec: IoSpec, fd: int, size: int, offset: int, virt_addr: Optional[int]
    ) -> Memory:
        return self._backend.import_dmabuf(fd, size, offset, virt_addr)

    def hatch_layout(self, spec: IoSpec, shape: Tuple[int, ...]) -> Optional[NativeLayout]:
        return None

    def check_bindable(self, spec: IoSpec, value: RknnOrtValue) -> None:
        if value.backend is self._backend:
            return
        mine, theirs = spec.layout, value.layout
        wrong = [
            f"{what} expected {a}, got {b}"
            for what, a, b in (
                ("fmt", mine.name, theirs.name),
                ("dims", list(mine.dims), list(theirs.dims)),
                ("strides", list(mine.strides), list(theirs.strides)),
                ("type", mine.dtype, theirs.dtype),
                ("pass_through", spec.info["pass_through"], value.spec.info["pass_through"]),
            )
            if a != b
        ]
        if wrong:
            raise InvalidArgumentError(
                f"OrtValue for {spec.io_kind} '{spec.name}' native zero-copy layout mismatch: "
                + "; ".join(wrong)
                + ". The OrtValue buffer was written using a different RKNN native layout "
                "(another session or zero_copy_layout); create it for this session."
            )
        if value.memory.size < spec.layout.nbytes:
            raise InvalidArgumentError(
                f"OrtValue buffer is too small for bound tensor: required {spec.layout.nbytes} "
                f"bytes, got {value.memory.size} bytes"
            )


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
        self._ops = _Ops(self.rt)
        # Zero copy, made on first use under the contexts' lock.
        self._zero_copy: Optional[_ZeroCopy] = None
        self._memories_lock = threading.Lock()  # guards _memories
        self._memories: weakref.WeakSet[Memory] = weakref.WeakSet()
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
        return [_native_arg(spec) for spec in self.zero_copy.inputs]

    def native_outputs(self) -> List[NodeArg]:
        """Outputs as zero copy binds them: native dims, type, layout and strides."""
        return [_native_arg(spec) for spec in self.zero_copy.outputs]

    # ------------------------------------------------------------------ zero copy

    @property
    def zero_copy(self) -> _ZeroCopy:
        """This session's tensors as zero copy sees them (queried on first use)."""
        zc = self._zero_copy
        if zc is None:
            with self.contexts.while_open():
                if self._zero_copy is None:
                    first = self.contexts.slots[0]
                    with first:
                        self._zero_copy = self._describe_zero_copy(first.ctx)
                zc = self._zero_copy
        return zc

    def _describe_zero_copy(self, ctx: int) -> _ZeroCopy:
        if self.model_info.dynamic:
            raise EzrtError(
                "zero-copy I/O needs a model with static shapes; this one has dynamic inputs "
                "(use run / run_async)"
            )
        native_mode = self.config.zero_copy_layout == "native"
        inputs = []
        for i, attr in enumerate(self.model_info.input_attrs):
            native = _copy_attr(attr)
            if attr.n_dims == 4:
                found = try_attr(self.rt, ctx, abi.QUERY_NATIVE_INPUT_ATTR, i)
                if found is not None:
                    native = found
                    if not native_mode and attr.type in _NHWC_TYPES:
                        nhwc = try_attr(self.rt, ctx, abi.QUERY_NATIVE_NHWC_INPUT_ATTR, i)
                        if nhwc is not None and nhwc.n_dims == 4:
                            native = nhwc
                        if native.fmt == abi.FMT_NC1HWC2 and native.pass_through == 0:
                            native = _nhwc_like(attr, native)
                if native.fmt == abi.FMT_NC1HWC2:
                    native.pass_through = 1  # the buffer holds NC1HWC2 bytes: ezrt packs them
            logical_nhwc = self.config.layout in ("nhwc", "any")
            inputs.append(self._io_spec("input", i, attr, native, logical_nhwc))
        outputs = []
        for i, attr in enumerate(self.model_info.output_attrs):
            native = _copy_attr(attr)
            if attr.n_dims == 4:
                found = try_attr(self.rt, ctx, abi.QUERY_NATIVE_OUTPUT_ATTR, i)
                native = found if found is not None else native
                if not native_mode and attr.type in _NHWC_TYPES:
                    nhwc = try_attr(self.rt, ctx, abi.QUERY_NATIVE_NHWC_OUTPUT_ATTR, i)
                    if nhwc is not None and nhwc.n_dims == 4:
                        native = nhwc
            outputs.append(self._io_spec("output", i, attr, native, False))
        return _ZeroCopy(self, inputs, outputs)

    def _io_spec(self, kind: str, index: int, attr: Any, native: Any, logical_nhwc: bool) -> IoSpec:
        name = (self.inputs if kind == "input" else self.outputs)[index].name
        dtype = abi.TENSOR_TYPES.get(native.type, (None, ""))[0]
        if dtype is None:
            raise EzrtError(
                f"zero-copy {kind} '{name}' has RKNN tensor type {native.type}, which numpy "
                "cannot hold"
            )
        dims = attr.shape
        order = "NCHW"
        if len(dims) == 4 and attr.fmt == abi.FMT_NHWC:
            n, h, w, c = dims
            if logical_nhwc:
                order = "NHWC"
            else:
                dims = (n, c, h, w)
        elif len(dims) == 4 and kind == "output":
            order = "NCHW"  # output attrs of 4-D tensors are NCHW
        mapping = {
            abi.FMT_NHWC: "nhwc",
            abi.FMT_NC1HWC2: "nc1hwc2",
            abi.FMT_NCHW: "nchw",
        }.get(native.fmt, "identity")
        if len(dims) != 4 or (mapping == "nchw" and order == "NCHW"):
            mapping = "identity"
        native_dims = native.shape
        strides = _native_strides(native)
        if mapping == "identity" and native_dims != dims:
            dims = native_dims  # a layout ezrt cannot map: the caller sees the native tensor
        layout = NativeLayout(
            abi.FMT_NAMES.get(native.fmt, "UNDEFINED"),
            native_dims,
            strides,
            np.dtype(dtype),
            tuple(dims),
            mapping,
            order,
        )
        itemsize = np.dtype(dtype).itemsize
        alloc = max(
            int(native.size_with_stride),
            int(native.size),
            span_bytes(native_dims, strides, itemsize),
            1,
        )
        info = {
            "attr_size": int(native.n_elems) * itemsize,
            "size_with_stride": int(native.size_with_stride),
            "w_stride": int(native.w_stride),
            "h_stride": int(native.h_stride),
            "fmt": int(native.fmt),
            "pass_through": bool(native.pass_through),
            "aligned_size": alloc,
            "core_id": -1,
            "layout": layout.name,
            "strides": list(strides),
        }
        return IoSpec(name, kind, index, layout, alloc, native, info)

    def _track(self, memory: Memory) -> None:
        with self._memories_lock:
            self._memories.add(memory)

    def allocate(self, size: int, mem_flags: int) -> Memory:
        """New NPU memory on the home context (``rknn_create_mem``; ``rknn_create_mem2`` when
        flags are asked for)."""
        home = self.contexts.home()
        with home:
            if mem_flags:
                handle = self.rt.optional("rknn_create_mem2")(home.ctx, size, mem_flags)
                api = "rknn_create_mem2"
            else:
                handle = self.rt.optional("rknn_create_mem")(home.ctx, size)
                api = "rknn_create_mem"
        if not handle:
            raise EzrtError(f"{api} failed: could not allocate {size} bytes of NPU memory")
        memory = Memory(self._ops, home, handle, size=size)
        self._track(memory)
        return memory

    def import_dmabuf(self, fd: int, size: int, offset: int, virt_addr: Optional[int]) -> Memory:
        """The caller's dma-buf, imported into the home context (the fd is dup'ed and, without
        ``virt_addr``, mapped: the value owns both)."""
        owned: Optional[int] = None
        mapping = None
        if virt_addr is None:
            owned, mapping = map_dmabuf(fd, size, offset)
            address = ctypes.addressof((ctypes.c_char * len(mapping)).from_buffer(mapping))
            source = owned
        else:
            owned = os.dup(fd)
            address, source = virt_addr, owned
        home = self.contexts.home()
        try:
            with home:
                handle = self._ops.import_fd(home.ctx, source, address, size, offset)
        except BaseException:
            if mapping is not None:
                mapping.close()
            os.close(owned)
            raise
        memory = Memory(
            self._ops,
            home,
            handle,
            size=size,
            owned_fd=owned,
            mapping=mapping,
            dmabuf=True,
            where=(owned, address, offset),  # what the caller gave, whatever the runtime echoes
        )
        self._track(memory)
        return memory

    def execute_bound(self, run: BoundRun, index: int) -> None:
        """One bound inference on worker ``index``'s zero-copy context (or, when a buffer
        has no dma-buf fd to import elsewhere, on the home context that allocated it)."""
        values = [value for _, value in (*run.inputs, *run.outputs)]
        if any(v.memory.fd < 0 and v.memory.home.owner is self for v in values):
            slot = self.contexts.home()
        else:
            slot = self.contexts.bound(index)
        rt = self.rt
        set_io = rt.optional("rknn_set_io_mem")
        with slot:
            for kind, pairs in (("input", run.inputs), ("output", run.outputs)):
                for spec, value in pairs:
                    memory = value.memory
                    handle = memory.handle_for(slot)
                    if memory.home.owner is not self:  # another session's: drop it at close
                        self._track(memory)
                    if memory.size < spec.layout.nbytes:
                        raise EzrtError(
                            f"Bound {kind} OrtValue is too small for {kind}: {spec.name} "
                            f"({memory.size} bytes, needs {spec.layout.nbytes})"
                        )
                    memory.sync_for_run(slot, handle, is_input=kind == "input")
                    attr = _copy_attr(spec.attr)
                    abi.check(
                        "rknn_set_io_mem",
                        set_io(slot.ctx, handle, ctypes.byref(attr)),
                        f" for {kind} index {spec.index}",
                    )
            abi.check("rknn_run", rt.rknn_run(slot.ctx, None))
            for _, value in run.outputs:
                value.memory.written_by_device()

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

    def _free_memories(self) -> None:
        with self._memories_lock:
            memories = list(self._memories)
            self._memories = weakref.WeakSet()
        for memory in memories:
            if memory.home.owner is self:
                memory.free()
            else:
                memory.drop_imports(self)

    def close(self) -> None:
        """Free zero-copy memory, then destroy the contexts; a session whose weights others
        borrow keeps its contexts until they close."""
        if self.contexts.close():
            self._free_memories()
        self.contexts.release()


def _nhwc_like(attr: Any, native: Any) -> Any:
    """Upstream's NHWC attr for an NC1HWC2-native input: the logical NHWC dims with the
    native row stride (the runtime converts NHWC to NC1HWC2 itself, pass_through 0)."""
    made = _copy_attr(attr)
    n, h, w, c = attr.shape
    made.fmt = abi.FMT_NHWC
    made.w_stride = native.w_stride
    made.h_stride = native.h_stride
    made.pass_through = 0
    itemsize = abi.TENSOR_TYPES[attr.type][0].itemsize  # type: ignore[union-attr]
    made.size_with_stride = n * (native.h_stride or h) * (native.w_stride or w) * c * itemsize
    return made


def _native_arg(spec: IoSpec) -> NodeArg:
    return NodeArg(
        spec.name,
        list(spec.layout.dims),
        abi.TENSOR_TYPES.get(int(spec.attr.type), (None, "tensor(unknown)"))[1],
        spec.layout.name,
        list(spec.layout.strides),
    )
