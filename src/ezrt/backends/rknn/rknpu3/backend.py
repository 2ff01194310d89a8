"""The RKNPU3 backend: an ``RKNX`` model and its ``.weight`` file on ``librknn3_api``.

Construction follows upstream 0.11 (UPSTREAM_0_11.md §4.4): load the runtime, find the
weight file, ``rknn3_init``, load the model, ``rknn3_model_init`` with the core mask (0 =
every core of the model, because runtime 1.0.4 refuses AUTO), then read the tensor
attributes. Tensors are reported as the runtime lays them out (native shape, layout and
strides).

Past upstream: ``run``, ``run_async`` and every other engine path work too. Each worker owns
NPU memory for the inputs and outputs of one task; the session's one context is shared
through its :class:`~ezrt.backends.rknn.memory.ContextSlot`, so a worker packs its inputs
while another's inference runs. ``run`` takes inputs in the native shape (float32 for a
float16 tensor is converted) and returns outputs in the native shape; bound runs
(``run_with_iobinding``) go through the same workers and context.

Values' memory is made by :func:`~ezrt.backends.rknn.memory.new_memory` and recorded in the
session's :class:`~ezrt.backends.rknn.memory.Registry`, whose closing is the session's: a
value made while another thread closes the session is freed by close, or refused and
freed at once while the context still exists (the lock discipline is :mod:`..memory`'s).
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ....errors import EzrtError, EzrtWarning, InvalidArgumentError, SessionClosedError, warn
from ....io import ModelMetadata, NodeArg, TensorSpec
from ....options import SessionConfig
from ...base import Backend, Request
from ..container import companion_weight_path
from ..layout import NativeLayout, dense_strides, span_bytes
from ..memory import ContextSlot, Memory, Registry, describe_mem, new_memory
from ..options import Rknpu3Config
from ..values import IoSpec, RknnOrtValue
from ..zerocopy import BoundRun, DmabufHold, hold_dmabuf
from . import abi

__all__ = ["Rknpu3Backend"]

logger = logging.getLogger("ezrt")

#: Float inputs may be fed as float32 for a float16 tensor (converted by the worker).
_FLOAT_FEEDS = (np.dtype(np.float16), np.dtype(np.float32))


class _Ops:
    """librknn3_api's memory calls, as :class:`~ezrt.backends.rknn.memory.Memory` uses them."""

    family = "rknpu3"

    def __init__(self, rt: abi.Runtime3) -> None:
        self.rt = rt

    def destroy_mem(self, ctx: int, handle: Any) -> None:
        code = self.rt.rknn3_destroy_mem(ctx, handle)
        if code != 0:
            logger.warning("ezrt: rknn3_destroy_mem failed: %s", abi.STATUS.get(code, code))

    def mem_sync(self, ctx: int, handle: Any, mode: int) -> None:
        abi.check("rknn3_mem_sync", self.rt.rknn3_mem_sync(ctx, handle, mode))

    def import_fd(self, ctx: int, fd: int, virt_addr: int, size: int, offset: int) -> Any:
        handle = self.rt.rknn3_create_mem_from_fd(ctx, fd, virt_addr, size, offset)
        if not handle:
            raise EzrtError(
                "RKNPU3 tensor memory allocation/import failed (rknn3_create_mem_from_fd)"
            )
        return handle

    def describe(self, handle: Any) -> Dict[str, int]:
        return describe_mem(handle)


def _layout_of(attr: Any, name: str) -> Tuple[NativeLayout, Optional[np.dtype]]:
    dtype = abi.TENSOR_TYPES.get(int(attr.dtype), (None, ""))[0]
    dims = attr.dims
    strides = attr.strides
    opaque = len(strides) not in (0, len(dims))
    if not strides or opaque:
        strides = dense_strides(dims)
    layout = NativeLayout(
        abi.LAYOUTS.get(int(attr.layout), "UNKNOWN"),
        dims,
        strides,
        dtype if dtype is not None else np.dtype(np.uint8),
        dims,
        "identity",
        opaque=opaque,
    )
    return layout, dtype


def _query_attr(rt: abi.Runtime3, ctx: int, kind: str, command: int, index: int) -> Any:
    """The attr of ``kind`` tensor ``index``, checked for what ezrt relies on."""
    attr = abi.TensorAttr()
    attr.index = index
    code = rt.rknn3_query(ctx, command, ctypes.byref(attr), ctypes.sizeof(abi.TensorAttr))
    abi.check(f"rknn3_query({kind} attr {index})", code)
    if attr.n_dims > abi.MAX_DIMS or attr.n_stride > abi.MAX_STRIDES:
        raise EzrtError(f"invalid RKNPU3 {kind} tensor rank/stride rank")
    if attr.aligned_size == 0:
        raise EzrtError(f"RKNPU3 {kind} tensor has aligned_size=0")
    return attr


def _io_spec(attr: Any, kind: str, index: int) -> IoSpec:
    """A tensor as zero copy (and, on RKNPU3, every run) sees it."""
    name = attr.text_name or f"{kind}_{index}"
    layout, dtype = _layout_of(attr, name)
    itemsize = layout.itemsize
    info = {
        "attr_size": int(attr.n_elems) * itemsize,
        "size_with_stride": int(attr.aligned_size) if attr.aligned_size <= 0xFFFFFFFF else 0,
        "w_stride": 0,
        "h_stride": 0,
        "fmt": int(attr.layout),
        "pass_through": False,
        "aligned_size": int(attr.aligned_size),
        "core_id": int(attr.core_id),
        "layout": layout.name,
        "strides": list(attr.strides),
        "_supported": dtype is not None,
    }
    alloc = max(int(attr.aligned_size), span_bytes(layout.dims, layout.strides, itemsize))
    return IoSpec(name, kind, index, layout, alloc, abi.TensorAttr.from_buffer_copy(attr), info)


def _tensor_spec(spec: IoSpec) -> TensorSpec:
    """What the caller sees of a tensor: its native shape, layout and strides."""
    dtype = spec.dtype if spec.info["_supported"] else None
    accepts = _FLOAT_FEEDS if dtype == np.float16 else None
    return TensorSpec(
        spec.name,
        spec.layout.dims,
        abi.TENSOR_TYPES.get(int(spec.attr.dtype), (None, "tensor(unknown)"))[1],
        dtype=None if accepts else dtype,
        accepts=accepts,
        layout=spec.layout.name,
        strides=tuple(spec.attr.strides),
    )


class Rknpu3Worker:
    """Runs tasks on the shared context with NPU memory of its own for one task's I/O."""

    def __init__(self, backend: Rknpu3Backend) -> None:
        self._backend = backend
        self._inputs: Optional[List[Memory]] = None
        self._outputs: Optional[List[Memory]] = None

    def run(self, request: Any) -> Any:
        if type(request) is BoundRun:
            return self._backend.execute_bound(request)
        return self._run(request)

    def _memories(self) -> Tuple[List[Memory], List[Memory]]:
        if self._inputs is None or self._outputs is None:
            backend = self._backend
            inputs: List[Memory] = []
            outputs: List[Memory] = []
            try:
                for spec in backend.zero_copy.inputs:
                    inputs.append(backend.allocate(spec, 0))
                for spec in backend.zero_copy.outputs:
                    outputs.append(backend.allocate(spec, 0))
            except BaseException:
                for memory in (*inputs, *outputs):
                    memory.free()
                raise
            self._inputs, self._outputs = inputs, outputs
        return self._inputs, self._outputs

    def _run(self, request: Request) -> List[Any]:
        backend = self._backend
        zc = backend.zero_copy
        inputs, outputs = self._memories()
        for spec, memory, array in zip(zc.inputs, inputs, request.inputs):
            if array.dtype != spec.dtype:
                array = array.astype(spec.dtype)
            spec.layout.write(memory.cpu_view(read=False, write=True), array)
        backend.run_tensors(
            [(spec, memory) for spec, memory in zip(zc.inputs, inputs)],
            [(spec, memory) for spec, memory in zip(zc.outputs, outputs)],
        )
        wanted = (
            range(len(outputs))
            if request.fetch is None
            else [backend.output_index[name] for name in request.fetch]
        )
        return [
            zc.outputs[i].layout.read(outputs[i].cpu_view(read=True, write=False)) for i in wanted
        ]

    def close(self) -> None:
        for memory in (*(self._inputs or ()), *(self._outputs or ())):
            memory.free()
        self._inputs = self._outputs = None


class _ZeroCopy3:
    family = "rknpu3"

    def __init__(self, backend: Rknpu3Backend, inputs: List[IoSpec], outputs: List[IoSpec]):
        self._backend = backend
        self.inputs = inputs
        self.outputs = outputs

    def allocate(self, spec: IoSpec, mem_flags: int) -> Memory:
        return self._backend.allocate(spec, mem_flags)

    def import_dmabuf(
        self, spec: IoSpec, fd: int, size: int, offset: int, virt_addr: Optional[int]
    ) -> Memory:
        return self._backend.import_dmabuf(spec, fd, size, offset, virt_addr)

    def hatch_layout(self, spec: IoSpec, shape: Tuple[int, ...]) -> Optional[NativeLayout]:
        """Upstream's NCHW path for an NC1HWC2 input: a 4-D NCHW shape that fits."""
        native = spec.layout
        if len(shape) != 4:
            return None
        if native.name != "NC1HWC2" or len(native.dims) != 5:
            raise InvalidArgumentError(
                f"RKNPU3 NCHW upload requires a 5D NC1HWC2 native tensor ('{spec.name}' is "
                f"{native.name} {list(native.dims)})"
            )
        n, c1, h, w, c2 = native.dims
        if 0 in native.dims:
            raise InvalidArgumentError("RKNPU3 NC1HWC2 tensor has an empty dimension")
        if 0 in native.strides:
            raise InvalidArgumentError("RKNPU3 NC1HWC2 tensor has a zero stride")
        big_n, big_c, big_h, big_w = shape
        if big_n > n or big_c > c1 * c2 or big_h > h or big_w > w:
            raise InvalidArgumentError(
                f"RKNPU3 NCHW input does not fit the native NC1HWC2 tensor: {list(shape)} into "
                f"{list(native.dims)} (N <= {n}, C <= {c1 * c2}, H <= {h}, W <= {w})"
            )
        return NativeLayout(
            native.name,
            native.dims,
            native.strides,
            native.dtype,
            tuple(shape),
            "nc1hwc2",
            opaque=native.opaque,
        )

    def check_bindable(self, spec: IoSpec, value: RknnOrtValue) -> None:
        if value.backend is not self._backend:
            raise InvalidArgumentError(
                "RKNPU3 OrtValue belongs to a different session/context (RKNPU3 values "
                "cannot be shared between sessions)"
            )


class Rknpu3Backend(Backend):
    """One RKNX model on librknn3_api, with ezrt's workers around its context."""

    feed_layout = "nchw"

    def __init__(
        self,
        model: Union[str, bytes],
        options: Rknpu3Config,
        config: SessionConfig,
        *,
        given_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.config = config
        self.options = options
        self._given = dict(given_options or {})
        #: The memory close frees (values' and workers'); closed = the session is closed.
        self._registry = Registry()
        self.rt = abi.load_runtime(options.runtime_library)
        self._ops = _Ops(self.rt)
        weight_path = self._weight_path(model)
        self._keep: List[Any] = []  # buffers the runtime reads for the session's life
        ctx = abi.Context(0)
        extend = None
        if options.device_id:
            device = ctypes.create_string_buffer(options.device_id.encode())
            self._keep.append(device)
            extend = abi.InitExtend()
            extend.device_id = ctypes.cast(device, ctypes.c_void_p)
        abi.check("rknn3_init", self.rt.rknn3_init(ctypes.byref(ctx), extend))
        self._slot = ContextSlot(int(ctx.value), self, "RKNPU3 context")
        try:
            self._load(model, weight_path)
            self._init_model()
            self._read_model_info()
        except BaseException:
            self.rt.rknn3_destroy(self._slot.ctx)
            raise

    # ------------------------------------------------------------------ construction

    def _weight_path(self, model: Union[str, bytes]) -> str:
        path = self.options.weight_path
        if not path:
            if not isinstance(model, str):
                raise InvalidArgumentError(
                    "RKNPU3 models require a weight file. For an in-memory model, set provider "
                    "option 'weight_path'."
                )
            path = companion_weight_path(model)
        if not os.path.isfile(path):
            raise InvalidArgumentError(
                f"RKNPU3 weight file not found: {path}. The runtime otherwise enters streaming "
                "mode and run() can return success with incorrect output, so this provider "
                "refuses to continue."
            )
        return path

    def _load(self, model: Union[str, bytes], weight_path: str) -> None:
        ctx = self._slot.ctx
        if isinstance(model, str):
            code = self.rt.rknn3_load_model_from_path(
                ctx, os.fsencode(model), os.fsencode(weight_path)
            )
            abi.check("rknn3_load_model_from_path", code)
            return
        try:
            with open(weight_path, "rb") as handle:
                weights = handle.read()
        except OSError as exc:
            raise InvalidArgumentError(
                f"unable to open RKNPU3 weight file: {weight_path} ({exc.strerror})"
            ) from exc
        if not weights:
            raise InvalidArgumentError(f"RKNPU3 weight file is empty: {weight_path}")
        model_buffer = ctypes.create_string_buffer(model, len(model))
        weight_buffer = ctypes.create_string_buffer(weights, len(weights))
        self._keep += [model_buffer, weight_buffer]
        code = self.rt.rknn3_load_model_from_data(
            ctx, model_buffer, len(model), weight_buffer, len(weights)
        )
        abi.check("rknn3_load_model_from_data", code)

    def _init_model(self) -> None:
        ctx = self._slot.ctx
        cfg = abi.Config()
        cfg.priority = self.options.priority
        cfg.run_timeout = self.options.run_timeout_ms
        mask = self.options.run_core_mask
        if mask == 0:  # runtime 1.0.4 refuses AUTO: ask for every core of the model
            cores = ctypes.c_uint32(0)
            code = self.rt.rknn3_query(ctx, abi.QUERY_CORE_NUMBER, ctypes.byref(cores), 4)
            abi.check("rknn3_query(CORE_NUMBER)", code)
            if not 0 < cores.value <= 32:
                raise EzrtError(f"invalid RKNPU3 model core count: {cores.value}")
            mask = 0xFFFFFFFF if cores.value == 32 else (1 << cores.value) - 1
        cfg.run_core_mask = mask
        self.core_mask = mask
        code = self.rt.rknn3_model_init(ctx, ctypes.byref(cfg))
        if code == abi.WARNING_CORE_UNUSED:
            warn("rknn3_model_init: requested NPU core is unused", EzrtWarning)
        else:
            abi.check("rknn3_model_init", code)

    def _read_model_info(self) -> None:
        ctx = self._slot.ctx
        version = abi.SdkVersion()
        self.runtime_version = ""
        if self.rt.rknn3_query(ctx, abi.QUERY_SDK_VERSION, ctypes.byref(version), 512) == 0:
            self.runtime_version = version.api_version.decode("utf-8", "replace")
        counts = abi.InputOutputNum()
        code = self.rt.rknn3_query(ctx, abi.QUERY_IN_OUT_NUM, ctypes.byref(counts), 8)
        abi.check("rknn3_query(IN_OUT_NUM)", code)
        specs: Dict[str, List[IoSpec]] = {"input": [], "output": []}
        for kind, command, count in (
            ("input", abi.QUERY_INPUT_ATTR, counts.n_input),
            ("output", abi.QUERY_OUTPUT_ATTR, counts.n_output),
        ):
            for i in range(count):
                attr = _query_attr(self.rt, ctx, kind, command, i)
                specs[kind].append(_io_spec(attr, kind, i))
        self.inputs = [_tensor_spec(spec) for spec in specs["input"]]
        self.outputs = [_tensor_spec(spec) for spec in specs["output"]]
        self.output_index = {spec.name: i for i, spec in enumerate(self.outputs)}
        self.zero_copy = _ZeroCopy3(self, specs["input"], specs["output"])

    # ------------------------------------------------------------------ the protocol

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            producer_name="rknpu3",
            custom_metadata_map={"rknpu3_runtime_version": self.runtime_version},
        )

    def providers(self) -> List[str]:
        return ["RKNPU3ExecutionProvider"]

    def provider_options(self) -> Dict[str, Dict[str, Any]]:
        return {"RKNPU3ExecutionProvider": dict(self._given)}

    @property
    def runtime_path(self) -> str:
        return self.rt.path

    @property
    def closed(self) -> bool:
        return self._registry.closed

    def native_inputs(self) -> List[NodeArg]:
        """Same as the inputs (RKNPU3 reports native tensors only)."""
        return [
            NodeArg(s.name, list(s.shape or ()), s.type, s.layout, s.strides) for s in self.inputs
        ]

    def native_outputs(self) -> List[NodeArg]:
        """Same as the outputs."""
        return [
            NodeArg(s.name, list(s.shape or ()), s.type, s.layout, s.strides) for s in self.outputs
        ]

    def make_worker(self, core: Optional[int], slot: int) -> Rknpu3Worker:
        return Rknpu3Worker(self)

    # ------------------------------------------------------------------ memory

    def _check_open(self) -> None:
        if self._registry.closed:
            raise SessionClosedError("zero-copy I/O rejected: the session is closed")

    def _check_supported(self, spec: IoSpec) -> None:
        if not spec.info["_supported"]:
            raise EzrtError(
                f"RKNPU3 {spec.io_kind} '{spec.name}' has tensor type {int(spec.attr.dtype)} "
                f"({abi.TENSOR_TYPES.get(int(spec.attr.dtype), (None, '?'))[1]}), which numpy "
                "cannot hold"
            )

    def allocate(self, spec: IoSpec, mem_flags: int) -> Memory:
        """NPU memory for one tensor (``rknn3_create_mem``), a value's or a worker's: close
        frees both (a worker abandoned at exit may outlive close)."""
        self._check_supported(spec)
        if mem_flags & ~0x3:
            raise InvalidArgumentError(
                f"RKNPU3 supports cacheable/non-cacheable memory flags only (got {mem_flags})"
            )
        self._check_open()

        def create(ctx: int) -> Any:
            handle = self.rt.rknn3_create_mem(
                ctx, spec.alloc_bytes, int(spec.attr.core_id), mem_flags
            )
            if not handle:
                raise EzrtError("RKNPU3 tensor memory allocation/import failed")
            return handle

        return new_memory(
            self._slot,
            self._ops,
            create,
            lambda handle: self._adopt(handle, spec),
            register=self._registry.add,
        )

    def _adopt(
        self,
        handle: Any,
        spec: IoSpec,
        held: Optional[DmabufHold] = None,
        offset: int = 0,
    ) -> Memory:
        """The :class:`Memory` of a new handle (it then owns ``held``); raises for memory
        the CPU cannot use (the caller destroys the handle and lets ``held`` go)."""
        facts = self._ops.describe(handle)
        if not facts["virt_addr"] or facts["size"] < spec.layout.nbytes:
            raise EzrtError("RKNPU3 tensor memory is unmapped or too small")
        if held is None:
            return Memory(self._ops, self._slot, handle, size=facts["size"])
        return Memory(
            self._ops,
            self._slot,
            handle,
            size=facts["size"],
            owned_fd=held.fd,
            mapping=held.mapping,
            dmabuf=True,
            where=(held.fd, held.address, offset),  # the caller's, not the runtime's echo
        )

    def import_dmabuf(
        self, spec: IoSpec, fd: int, size: int, offset: int, virt_addr: Optional[int]
    ) -> Memory:
        """The caller's dma-buf (``rknn3_create_mem_from_fd``); ezrt dups and maps the fd so
        the value can be read and written from Python (both are let go if the import fails)."""
        self._check_supported(spec)
        if size < int(spec.attr.aligned_size):
            raise InvalidArgumentError(
                f"invalid or too-small dma-buf for RKNPU3 tensor '{spec.name}': {size} bytes, "
                f"needs {int(spec.attr.aligned_size)}"
            )
        self._check_open()
        held = hold_dmabuf(fd, size, offset, virt_addr)

        def create(ctx: int) -> Any:
            return self._ops.import_fd(ctx, held.fd, held.address, size, offset)

        return new_memory(
            self._slot,
            self._ops,
            create,
            lambda handle: self._adopt(handle, spec, held, offset),
            release=held.release,
            register=self._registry.add,
        )

    # ------------------------------------------------------------------ running

    def run_tensors(
        self, inputs: List[Tuple[IoSpec, Memory]], outputs: List[Tuple[IoSpec, Memory]]
    ) -> None:
        """``rknn3_run`` with these memories, in model order, under the context's lock."""
        slot = self._slot
        keep: List[Any] = []

        def tensors(pairs: List[Tuple[IoSpec, Memory]], is_input: bool) -> Any:
            array = (abi.Tensor * len(pairs))()
            for i, (spec, memory) in enumerate(pairs):
                handle = memory.handle_for(slot)
                memory.sync_for_run(slot, handle, is_input=is_input)
                attr = abi.TensorAttr.from_buffer_copy(spec.attr)
                keep.append(attr)
                array[i].mem = ctypes.cast(handle, ctypes.c_void_p)
                array[i].attr = ctypes.cast(ctypes.pointer(attr), ctypes.c_void_p)
            return array

        with slot:
            slot.check_live()
            ins = tensors(inputs, True)
            outs = tensors(outputs, False)
            code = self.rt.rknn3_run(slot.ctx, ins, len(inputs), outs, len(outputs))
            abi.check("rknn3_run", code)
            for _, memory in outputs:
                memory.written_by_device()

    def execute_bound(self, run: BoundRun) -> None:
        """One bound inference (``run_with_iobinding``), on whichever worker took it."""
        self.run_tensors(
            [(spec, value.memory) for spec, value in run.inputs],
            [(spec, value.memory) for spec, value in run.outputs],
        )

    def bound_payload(self, binding: Any, run_options: Any = None) -> BoundRun:
        """The engine payload for ``run_with_iobinding`` (run by whichever worker takes it)."""
        from ..binding import bound_payload

        return bound_payload(binding, self)

    def io_binding(self, session: Any) -> Any:
        from ..binding import RknnIOBinding

        self._check_open()
        return RknnIOBinding(session, self)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free every value's memory, then destroy the context (after the workers).

        A value made meanwhile on another thread is freed here, or refused and freed by its
        factory while the context still exists (see :mod:`ezrt.backends.rknn.memory`)."""
        memories = self._registry.close()
        if memories is None:
            return
        for memory in memories:
            memory.free()
        slot = self._slot
        with slot:
            slot.run_pending()
            slot.closed = True
            code = self.rt.rknn3_destroy(slot.ctx)
        if code != 0:
            logger.warning("ezrt: rknn3_destroy failed: %s", abi.STATUS.get(code, code))
