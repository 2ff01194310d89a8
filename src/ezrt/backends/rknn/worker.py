"""The RKNPU2 worker, and the copy path it runs: feeds in through ``rknn_inputs_set``,
outputs out through ``rknn_outputs_get``, on the worker's own context.

A worker runs one request at a time, from its thread, holding its context's slot; a
:class:`~ezrt.backends.rknn.zerocopy.BoundRun` goes to zero copy instead, on the worker's
zero-copy context. With ``ZTU_EZRKNN_ASYNC_PRINT_PERF`` set, each copy-path run logs its
phases on the ``ezrt.perf`` logger, in upstream's format.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import EzrtError
from ..base import Request
from . import abi
from .bound import RknnZeroCopy
from .memory import ContextSlot
from .model import ModelInfo, query, query_attr
from .zerocopy import BoundRun

__all__ = ["PERF_ENV", "CopyPath", "RknnWorker", "perf_enabled"]

perf_logger = logging.getLogger("ezrt.perf")

PERF_ENV = "ZTU_EZRKNN_ASYNC_PRINT_PERF"


def perf_enabled() -> bool:
    """Whether the environment asks for upstream's per-run timing line."""
    return os.environ.get(PERF_ENV, "").lower() in ("1", "true", "on", "yes")


class CopyPath:
    """What a copy-path run does with one model's tensors, on any of its contexts."""

    def __init__(self, rt: abi.Runtime, model: ModelInfo, perf: bool) -> None:
        self.rt = rt
        self.model = model
        self.perf = perf

    def native_layout(self, arrays: Tuple[np.ndarray, ...]) -> List[np.ndarray]:
        """nchw_software: the caller's NCHW becomes NHWC here (the copy is the worker's)."""
        return [
            np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if transpose else a
            for a, transpose in zip(arrays, self.model.transpose)
        ]

    def set_inputs(self, ctx: int, arrays: List[np.ndarray]) -> None:
        """``rknn_inputs_set`` (after ``rknn_set_input_shapes`` for a dynamic model)."""
        rt = self.rt
        if self.model.dynamic:
            shapes = self.shape_attrs(arrays)
            abi.check(
                "rknn_set_input_shapes",
                rt.optional("rknn_set_input_shapes")(ctx, len(arrays), shapes),
            )
        inputs = (abi.Input * len(arrays))()
        for i, (array, fmt) in enumerate(zip(arrays, self.model.input_fmts)):
            entry = inputs[i]
            entry.index = i
            entry.buf = array.ctypes.data
            entry.size = array.nbytes
            entry.pass_through = 0
            entry.type = abi.NUMPY_TO_TENSOR_TYPE[array.dtype]
            entry.fmt = fmt
        abi.check("rknn_inputs_set", rt.rknn_inputs_set(ctx, len(arrays), inputs))

    def shape_attrs(self, arrays: Sequence[np.ndarray]) -> Any:
        """Attrs for rknn_set_input_shapes: the runtime wants 4-D dims in NHWC order (W13)."""
        model = self.model
        attrs = (abi.TensorAttr * len(arrays))()
        for i, (array, attr, fmt) in enumerate(zip(arrays, model.input_attrs, model.input_fmts)):
            ctypes.memmove(ctypes.byref(attrs[i]), ctypes.byref(attr), ctypes.sizeof(attr))
            shape = array.shape
            if fmt == abi.FMT_NCHW and attr.fmt == abi.FMT_NHWC and len(shape) == 4:
                shape = (shape[0], shape[2], shape[3], shape[1])
            attrs[i].n_dims = len(shape)
            for axis, size in enumerate(shape):
                attrs[i].dims[axis] = size
            attrs[i].fmt = abi.FMT_NHWC if attr.fmt == abi.FMT_NHWC else abi.FMT_UNDEFINED
        return attrs

    def _output_attrs(self, ctx: int) -> List[Any]:
        """The outputs' attrs for this run: a dynamic model's depend on the inputs."""
        if not self.model.dynamic:
            return self.model.output_attrs
        attrs = []
        for i in range(len(self.model.output_attrs)):
            current = abi.TensorAttr()
            current.index = i
            if query(self.rt, ctx, abi.QUERY_CURRENT_OUTPUT_ATTR, current) < 0:
                current = query_attr(self.rt, ctx, abi.QUERY_OUTPUT_ATTR, i, "output attr")
            attrs.append(current)
        return attrs

    def fetch_outputs(self, ctx: int) -> List[np.ndarray]:
        """``rknn_outputs_get`` into new arrays (float32 unless ``output_dtype`` is native)."""
        rt = self.rt
        want_float = self.model.want_float
        attrs = self._output_attrs(ctx)
        results = []
        outputs = (abi.Output * len(attrs))()
        for i, attr in enumerate(attrs):
            dtype = np.dtype(np.float32) if want_float else abi.TENSOR_TYPES[attr.type][0]
            if dtype is None:
                raise EzrtError(
                    f"output {i} has an RKNN type numpy cannot hold; use float32 outputs"
                )
            array = np.empty(attr.shape, dtype=dtype)
            entry = outputs[i]
            entry.want_float = 1 if want_float else 0
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


class RknnWorker:
    """Runs requests on one context, from one thread; bound runs on its zero-copy context."""

    def __init__(
        self,
        path: CopyPath,
        zero_copy: RknnZeroCopy,
        slot: ContextSlot,
        index: int,
        core: Optional[int],
    ) -> None:
        self._path = path
        self._zero_copy = zero_copy
        self._slot = slot
        self._index = index
        self._core = -1 if core is None else core
        self._perf = path.perf

    def run(self, request: Any) -> Any:
        if type(request) is BoundRun:
            return self._zero_copy.execute(request, self._index)
        with self._slot:
            self._slot.check_live()  # closed under a worker that outlived it (exit)
            return self._run(request)

    def _run(self, request: Request) -> List[Any]:
        path = self._path
        ctx = self._slot.ctx
        arrays = path.native_layout(request.inputs)
        started = time.perf_counter()
        path.set_inputs(ctx, arrays)
        set_input = time.perf_counter()
        abi.check("rknn_run", path.rt.rknn_run(ctx, None))
        ran = time.perf_counter()
        results = path.fetch_outputs(ctx)
        done = time.perf_counter()
        if self._perf:
            self._log(started, set_input, ran, done)
        if request.fetch is None:
            return results
        index = path.model.output_index
        return [results[index[name]] for name in request.fetch]

    def _log(self, started: float, set_input: float, ran: float, done: float) -> None:
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

    def close(self) -> None:
        """Contexts are destroyed by the backend once every worker has stopped."""
