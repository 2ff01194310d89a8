"""The RKNN backend: one librknnrt context per worker, each pinned to its NPU core.

Every context is created up front, in the constructing thread: context 0 by ``rknn_init``,
the others by ``rknn_dup_context`` (weights shared) or a fresh ``rknn_init`` when dup is
disabled (option, custom ops, or weight sharing, where each init borrows the master's
weights). Each context gets its core mask (``schedule``: ``1 << core``; otherwise the
``tp_mode`` mask). If anything fails half-way, every context already made is destroyed.
A worker uses its own context only, so no context is ever driven by two threads.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import EzrtError, EzrtWarning, InvalidArgumentError
from ...io import ModelMetadata, TensorSpec, format_shape
from ...options import SessionConfig
from ..base import Backend, Request
from . import abi

__all__ = ["RknnBackend", "RknnWorker"]

logger = logging.getLogger("ezrt")
perf_logger = logging.getLogger("ezrt.perf")

PERF_ENV = "ZTU_EZRKNN_ASYNC_PRINT_PERF"
DEFAULT_PLUGIN_DIR = "/usr/lib/rknpu/op_plugins/"
_CUSTOM_OP_SIZE = 832  # sizeof(rknn_custom_op)
#: What an input may be given as: the runtime converts it to the model's own type.
INPUT_DTYPES = tuple(abi.NUMPY_TO_TENSOR_TYPE)


def _perf_enabled() -> bool:
    return os.environ.get(PERF_ENV, "").lower() in ("1", "true", "on", "yes")


class RknnWorker:
    """Runs requests on one context, from one thread."""

    def __init__(self, backend: RknnBackend, context: int, index: int, core: Optional[int]):
        self._backend = backend
        self._context = context
        self._index = index
        self._core = -1 if core is None else core
        self._perf = backend.perf

    def run(self, request: Request) -> List[Any]:
        backend = self._backend
        rt = backend.rt
        ctx = self._context
        arrays = backend.to_native_layout(request.inputs)
        started = time.perf_counter()
        if backend.dynamic:
            shapes = backend.shape_attrs(arrays)
            abi.check(
                "rknn_set_input_shapes",
                rt.optional("rknn_set_input_shapes")(ctx, len(arrays), shapes),
            )
        inputs = (abi.Input * len(arrays))()
        for i, (array, fmt) in enumerate(zip(arrays, backend.input_fmts)):
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
    ) -> None:
        self.config = config
        self._check_config()
        self.rt = runtime or abi.load_runtime()
        self._model = model
        self._master = share_with
        self._lock = threading.Lock()  # guards _dependents / _closed (weight-sharing lifetime)
        self._dependents = 0
        self._closed = False
        self._contexts: List[int] = []
        self.perf = _perf_enabled()
        self.want_float = config.output_dtype != "native"
        if config.wants_custom_ops:  # said first, as upstream: even if loading then fails
            warnings.warn(
                "Custom op loading requested; dup_context is disabled for this session to "
                "avoid known RKNN stability issues.",
                EzrtWarning,
                stacklevel=4,
            )
        plugins = self._load_plugins() if config.wants_custom_ops else []
        self._dup = not (config.disable_dup_context or config.wants_custom_ops or share_with)
        try:
            self._contexts.append(self._new_context())
            self._read_model_info(self._contexts[0])
            n_workers = config.threads_per_core * len(config.routes)
            for _ in range(1, n_workers):
                self._contexts.append(self._dup_context() if self._dup else self._new_context())
            for index, ctx in enumerate(self._contexts):
                self._set_core_mask(index, ctx)
            if plugins:
                self._register_custom_ops(plugins)
        except BaseException:
            self._destroy_contexts()
            raise
        if share_with is not None:
            with share_with._lock:
                share_with._dependents += 1

    # ------------------------------------------------------------------ construction

    def _check_config(self) -> None:
        for core in self.config.schedule or ():
            if core > 15:
                raise InvalidArgumentError(
                    f"schedule core {core} is not an NPU core (masks have 16 bits; RK3588 has "
                    "cores 0-2, RK3576 0-1, RK3566 0)"
                )

    def _new_context(self) -> int:
        ctx = ctypes.c_uint64(0)
        data = ctypes.create_string_buffer(self._model, len(self._model))
        if self._master is not None:
            extend = abi.InitExtend()
            extend.ctx = self._master._contexts[0]
            code = self.rt.rknn_init(
                ctypes.byref(ctx),
                data,
                len(self._model),
                abi.FLAG_SHARE_WEIGHT_MEM,
                ctypes.byref(extend),
            )
        else:
            code = self.rt.rknn_init(ctypes.byref(ctx), data, len(self._model), 0, None)
        abi.check("rknn_init", code)
        return int(ctx.value)

    def _dup_context(self) -> int:
        source = ctypes.c_uint64(self._contexts[0])
        copy = ctypes.c_uint64(0)
        abi.check(
            "rknn_dup_context", self.rt.rknn_dup_context(ctypes.byref(source), ctypes.byref(copy))
        )
        return int(copy.value)

    def _query(self, ctx: int, command: int, info: ctypes.Structure) -> int:
        return int(self.rt.rknn_query(ctx, command, ctypes.byref(info), ctypes.sizeof(info)))

    def _attr(self, ctx: int, command: int, index: int, kind: str) -> abi.TensorAttr:
        attr = abi.TensorAttr()
        attr.index = index
        abi.check(
            "rknn_query",
            self._query(ctx, command, attr),
            f" for {kind} index {index}",
        )
        return attr

    def _read_model_info(self, ctx: int) -> None:
        counts = abi.InputOutputNum()
        abi.check("rknn_query", self._query(ctx, abi.QUERY_IN_OUT_NUM, counts))
        self.input_attrs = [
            self._attr(ctx, abi.QUERY_INPUT_ATTR, i, "input attr") for i in range(counts.n_input)
        ]
        self.output_attrs = [
            self._attr(ctx, abi.QUERY_OUTPUT_ATTR, i, "output attr") for i in range(counts.n_output)
        ]
        version = abi.SdkVersion()
        self.sdk_version = ""
        if self._query(ctx, abi.QUERY_SDK_VERSION, version) >= 0:
            self.sdk_version = version.api_version.decode("utf-8", "replace")
            parsed = abi.parse_version(self.sdk_version)
            if parsed and parsed < abi.RECOMMENDED_VERSION:
                warnings.warn(
                    f"RKNN API version {self.sdk_version} is likely outdated; behavior may be "
                    "unstable. Recommended minimum version is 2.4.1.",
                    EzrtWarning,
                    stacklevel=5,
                )
        custom = abi.CustomString()
        self.custom_string = ""
        if self._query(ctx, abi.QUERY_CUSTOM_STRING, custom) >= 0:
            # Invalid UTF-8 is replaced, not raised on access (upstream W26).
            self.custom_string = custom.string.decode("utf-8", "replace")
        self._read_dynamic_ranges(ctx)
        self._describe_tensors()

    def _read_dynamic_ranges(self, ctx: int) -> None:
        self.ranges: List[List[Tuple[int, ...]]] = []
        for i in range(len(self.input_attrs)):
            found = abi.InputRange()
            found.index = i
            shapes: List[Tuple[int, ...]] = []
            if self._query(ctx, abi.QUERY_INPUT_DYNAMIC_RANGE, found) >= 0:
                for k in range(min(found.shape_number, abi.MAX_DYNAMIC_SHAPES)):
                    shapes.append(tuple(int(d) for d in found.dyn_range[k][: found.n_dims]))
            self.ranges.append(shapes)
        self.dynamic = any(self.ranges)

    def _user_shape(self, attr: abi.TensorAttr, dims: Sequence[Optional[int]]) -> Tuple[Any, ...]:
        """The shape the caller feeds for this layout. Only NHWC attrs are permuted (W14)."""
        dims = tuple(dims)
        if (
            attr.n_dims == 4
            and attr.fmt == abi.FMT_NHWC
            and self.config.layout
            in (
                "nchw",
                "nchw_software",
            )
        ):
            return (dims[0], dims[3], dims[1], dims[2])
        return dims

    def _describe_tensors(self) -> None:
        layout = self.config.layout
        self.input_fmts: List[int] = []
        self._transpose: List[bool] = []
        specs: List[TensorSpec] = []
        for attr, shapes in zip(self.input_attrs, self.ranges):
            dims: List[Optional[int]] = list(attr.shape)
            if shapes:  # dynamic: a dim that differs between allowed shapes is symbolic
                dims = [d if len({s[a] for s in shapes}) == 1 else None for a, d in enumerate(dims)]
            four_d_nhwc = attr.n_dims == 4 and attr.fmt == abi.FMT_NHWC
            if attr.n_dims != 4:
                fmt = abi.FMT_UNDEFINED
            elif not four_d_nhwc:
                fmt = attr.fmt if attr.fmt in (abi.FMT_NCHW, abi.FMT_NHWC) else abi.FMT_UNDEFINED
            else:
                fmt = abi.FMT_NCHW if layout == "nchw" else abi.FMT_NHWC
            self.input_fmts.append(fmt)
            self._transpose.append(four_d_nhwc and layout == "nchw_software")
            type_text = abi.TENSOR_TYPES.get(attr.type, (None, "tensor(unknown)"))[1]
            name = attr.text_name or f"input_{len(specs)}"
            shape = self._user_shape(attr, dims)
            specs.append(TensorSpec(name, shape, type_text, accepts=INPUT_DTYPES))
        self.inputs = specs
        self.outputs = []
        for i, attr in enumerate(self.output_attrs):
            native_type = abi.TENSOR_TYPES.get(attr.type, (None, "tensor(unknown)"))[1]
            type_text = "tensor(float)" if self.want_float else native_type
            self.outputs.append(TensorSpec(attr.text_name or f"output_{i}", attr.shape, type_text))
        self.output_index = {spec.name: i for i, spec in enumerate(self.outputs)}

    def _set_core_mask(self, index: int, ctx: int) -> None:
        routes = self.config.routes
        core = routes[index % len(routes)]
        mask = self.config.tp_mask if core is None else 1 << core
        code = self.rt.rknn_set_core_mask(ctx, mask)
        if code == abi.ERR_TARGET_PLATFORM_UNMATCH and mask in (abi.CORE_AUTO, abi.CORE_0):
            return  # single-core NPUs refuse any mask; AUTO and core 0 mean the same there
        if code < 0:
            raise abi.RknnError(
                "rknn_set_core_mask",
                code,
                f" for thread {index} (mask {mask:#x})",
                "Maybe you specified a configuration that is not supported by the current "
                "platform (RK3588: cores 0-2, RK3576: 0-1, RK3566: 0 only).",
            )

    # ------------------------------------------------------------------ custom ops

    def _load_plugins(self) -> List[Tuple[str, ctypes.CDLL, int]]:
        plugins: List[Tuple[str, ctypes.CDLL, int]] = []
        for path in self.config.custom_op_paths:
            plugins.append(self._load_plugin(path))
        if self.config.custom_op_default_path:
            directory = DEFAULT_PLUGIN_DIR
            if not os.path.isdir(directory):
                warnings.warn(
                    f"Default plugin directory does not exist: {directory}",
                    EzrtWarning,
                    stacklevel=5,
                )
            for path in sorted(glob.glob(os.path.join(directory, "librkcst_*.so"))):
                try:
                    plugins.append(self._load_plugin(path))
                except EzrtError as exc:
                    warnings.warn(
                        f"Failed to load plugin {os.path.basename(path)}: {exc}",
                        EzrtWarning,
                        stacklevel=5,
                    )
        seen: Dict[Tuple[bytes, int, int], str] = {}
        for path, _, address in plugins:
            raw = ctypes.string_at(address, _CUSTOM_OP_SIZE)
            version, target = int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little")
            op_type = raw[8:264].split(b"\0", 1)[0]
            key = (op_type, version, target)
            if key in seen:
                raise InvalidArgumentError(
                    f"Duplicate custom op definition detected: {op_type.decode()} "
                    f"(version={version}, target={target}) from {path} (first from {seen[key]})"
                )
            seen[key] = path
        return plugins

    @staticmethod
    def _load_plugin(path: str) -> Tuple[str, ctypes.CDLL, int]:
        try:
            library = ctypes.CDLL(path)
        except OSError as exc:
            warnings.warn(
                f"dlopen {path} fail: {exc} "
                "(this could lead to a crash due to internal bugs of rknnrt)",
                EzrtWarning,
                stacklevel=6,
            )
            raise InvalidArgumentError(f"dlopen {path} fail: {exc}") from exc
        entry = getattr(library, "get_rknn_custom_op", None)
        if entry is None:
            raise InvalidArgumentError(
                f"dlsym fail for get_rknn_custom_op: {path} does not export it"
            )
        entry.restype = ctypes.c_void_p
        entry.argtypes = []
        address = entry()
        if not address:
            raise InvalidArgumentError(f"get_rknn_custom_op returned null ({path})")
        return path, library, int(address)

    def _register_custom_ops(self, plugins: List[Tuple[str, ctypes.CDLL, int]]) -> None:
        register = self.rt.optional("rknn_register_custom_ops")
        ops = ctypes.create_string_buffer(_CUSTOM_OP_SIZE * len(plugins))
        for i, (_, _, address) in enumerate(plugins):
            ctypes.memmove(ctypes.addressof(ops) + i * _CUSTOM_OP_SIZE, address, _CUSTOM_OP_SIZE)
        self._plugins = plugins  # keep the libraries loaded while contexts live
        for ctx in self._contexts:
            abi.check("rknn_register_custom_ops", register(ctx, ops, len(plugins)))

    # ------------------------------------------------------------------ running

    def to_native_layout(self, arrays: Tuple[np.ndarray, ...]) -> List[np.ndarray]:
        """nchw_software: the caller's NCHW becomes NHWC here (the copy is the worker's)."""
        return [
            np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if transpose else a
            for a, transpose in zip(arrays, self._transpose)
        ]

    def shape_attrs(self, arrays: Sequence[np.ndarray]) -> ctypes.Array:  # type: ignore[type-arg]
        """Attrs for rknn_set_input_shapes: the runtime wants 4-D dims in NHWC order (W13)."""
        attrs = (abi.TensorAttr * len(arrays))()
        for i, (array, attr, fmt) in enumerate(zip(arrays, self.input_attrs, self.input_fmts)):
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
        if not self.dynamic:
            return
        for i, (array, attr, shapes) in enumerate(zip(arrays, self.input_attrs, self.ranges)):
            if not shapes:
                continue
            native = array.shape
            if len(native) == 4 and self.input_fmts[i] != abi.FMT_NHWC and attr.fmt == abi.FMT_NHWC:
                native = (native[0], native[2], native[3], native[1])
            if tuple(native) not in shapes:
                allowed = ", ".join(format_shape(self._user_shape(attr, s)) for s in shapes)
                raise InvalidArgumentError(
                    f"Input '{self.inputs[i].name}' shape {format_shape(array.shape)} is not one "
                    f"the model allows: {allowed}"
                )

    def fetch_outputs(self, ctx: int) -> List[np.ndarray]:
        rt = self.rt
        attrs = self.output_attrs
        if self.dynamic:
            attrs = []
            for i in range(len(self.output_attrs)):
                current = abi.TensorAttr()
                current.index = i
                if self._query(ctx, abi.QUERY_CURRENT_OUTPUT_ATTR, current) < 0:
                    current = self._attr(ctx, abi.QUERY_OUTPUT_ATTR, i, "output attr")
                attrs.append(current)
        results = []
        outputs = (abi.Output * len(attrs))()
        for i, attr in enumerate(attrs):
            dtype = np.dtype(np.float32) if self.want_float else abi.TENSOR_TYPES[attr.type][0]
            if dtype is None:
                raise EzrtError(
                    f"output {i} has an RKNN type numpy cannot hold; use float32 outputs"
                )
            array = np.empty(attr.shape, dtype=dtype)
            entry = outputs[i]
            entry.want_float = 1 if self.want_float else 0
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
        return RknnWorker(self, self._contexts[slot], slot, core)

    # ------------------------------------------------------------------ the protocol

    def metadata(self) -> ModelMetadata:
        custom = {"rknn_custom_string": self.custom_string} if self.custom_string else {}
        return ModelMetadata(producer_name="rknn", custom_metadata_map=custom)

    def providers(self) -> List[str]:
        return ["RKNNExecutionProvider"]

    def provider_options(self) -> Dict[str, Dict[str, Any]]:
        return {
            "RKNNExecutionProvider": {
                "library": self.rt.path,
                "api_version": self.sdk_version,
                "contexts": str(len(self._contexts)),
            }
        }

    def _destroy_contexts(self) -> None:
        for ctx in self._contexts:
            code = self.rt.rknn_destroy(ctx)
            if code < 0:
                logger.warning("ezrt: rknn_destroy failed: %s", abi.status_text(code))
        self._contexts = []

    def close(self) -> None:
        """Destroy the contexts; a master whose weights slaves borrow waits for them."""
        with self._lock:
            self._closed = True
            ready = self._dependents == 0
        if ready:
            self._release()

    def _release(self) -> None:
        self._destroy_contexts()
        master, self._master = self._master, None
        if master is None:
            return
        with master._lock:
            master._dependents -= 1
            ready = master._closed and master._dependents == 0
        if ready:
            master._release()
