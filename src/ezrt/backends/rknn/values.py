"""OrtValues of the RKNN backends: tensors in NPU memory, and plain CPU tensors.

An :class:`RknnOrtValue` is one tensor of one model input or output, in NPU memory laid out
as that session's *native* tensor (:class:`IoSpec`); ``numpy()`` and ``update_inplace()``
convert between that layout and the logical array the caller sees (NCHW <-> NHWC or
NC1HWC2, row padding honoured both ways). The memory is freed when the value is
garbage-collected or when its session closes, whichever comes first; after that every
access raises :class:`ezrt.SessionClosedError` instead of touching freed memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import InvalidArgumentError, InvalidTypeError
from .layout import NativeLayout
from .memory import Memory

__all__ = ["CpuOrtValue", "IoSpec", "RknnOrtValue", "onnx_type", "type_name"]

#: numpy dtype -> ONNX type string (the element types RKNN tensors can have).
_ONNX = {
    np.dtype(np.float32): "tensor(float)",
    np.dtype(np.float16): "tensor(float16)",
    np.dtype(np.int8): "tensor(int8)",
    np.dtype(np.uint8): "tensor(uint8)",
    np.dtype(np.int16): "tensor(int16)",
    np.dtype(np.uint16): "tensor(uint16)",
    np.dtype(np.int32): "tensor(int32)",
    np.dtype(np.uint32): "tensor(uint32)",
    np.dtype(np.int64): "tensor(int64)",
    np.dtype(np.bool_): "tensor(bool)",
    np.dtype(np.float64): "tensor(double)",
    np.dtype(np.uint64): "tensor(uint64)",
}


def onnx_type(dtype: np.dtype) -> str:
    """``tensor(float)`` etc. for a numpy dtype."""
    return _ONNX.get(np.dtype(dtype), "tensor(unknown)")


def type_name(dtype: np.dtype) -> str:
    """The short type name upstream uses in messages (``float32``, ``int8``, ...)."""
    return "bool" if np.dtype(dtype) == np.bool_ else str(np.dtype(dtype))


def format_dims(dims: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in dims) + "]"


@dataclass(frozen=True)
class IoSpec:
    """One model input or output as zero copy sees it: logical and native."""

    name: str
    io_kind: str  # "input" or "output"
    index: int
    layout: NativeLayout
    #: Bytes to allocate (upstream's rule; at least the native span).
    alloc_bytes: int
    #: What set_io_mem / rknn3_run get for this tensor (a ctypes struct; copied per use).
    attr: Any
    #: Facts for memory_info() and native NodeArgs.
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.layout.logical

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype


class RknnOrtValue:
    """A tensor in NPU memory, bound to a model input or output of one session."""

    __slots__ = ("__weakref__", "_finalizer", "backend", "device", "layout", "memory", "spec")

    def __init__(
        self,
        device: str,
        backend: Any,
        spec: IoSpec,
        memory: Memory,
        layout: Optional[NativeLayout] = None,
    ) -> None:
        self.device = device
        self.backend = backend  # keeps the backend object (not its contexts) alive
        self.spec = spec
        self.memory = memory
        self.layout = layout or spec.layout
        # Freed with the value; the session's close frees it earlier if it comes first.
        self._finalizer = weakref.finalize(self, memory.free)
        self._finalizer.atexit = False

    # ------------------------------------------------------------------ data

    def numpy(self) -> np.ndarray:
        """A new array with the tensor's logical contents (synced from the NPU first)."""
        return self.layout.read(self.memory.cpu_view(read=True, write=False))

    def update_inplace(self, np_arr: Any) -> None:
        """Overwrite the tensor with ``np_arr`` (same shape and element type), then sync it
        to the NPU."""
        if not isinstance(np_arr, np.ndarray):
            raise InvalidTypeError(
                f"update_inplace source must be a numpy array (got {type(np_arr).__name__})"
            )
        want = self.layout
        if tuple(np_arr.shape) != want.logical:
            raise InvalidArgumentError(
                f"update_inplace source shape mismatch: expected {format_dims(want.logical)}, "
                f"got {format_dims(np_arr.shape)}"
            )
        if np_arr.dtype != want.dtype:
            raise InvalidTypeError(
                "update_inplace source element type mismatch: expected "
                f"{type_name(want.dtype)}, got {type_name(np_arr.dtype)}"
            )
        want.write(self.memory.cpu_view(read=False, write=True), np_arr)
        self.memory.sync_to_device()

    def data_ptr(self) -> int:
        """The CPU address of the native buffer (synced for reading; you may write it:
        it is flushed to the NPU before the next run that reads it)."""
        self.memory.cpu_view(read=True, write=True)
        return self.memory.address

    def sync_to_device(self) -> None:
        """Flush CPU writes to the NPU (``*_mem_sync(TO_DEVICE)``)."""
        self.memory.sync_to_device()

    def sync_from_device(self) -> None:
        """Make the NPU's writes visible to the CPU (``*_mem_sync(FROM_DEVICE)``)."""
        self.memory.sync_from_device()

    # ------------------------------------------------------------------ description

    def device_name(self) -> str:
        """``"rknpu2"`` or ``"rknpu3"``."""
        return self.device

    def device_type(self) -> str:
        """Same as :meth:`device_name` (upstream has both)."""
        return self.device

    def device_id(self) -> int:
        """Always 0."""
        return 0

    def shape(self) -> List[int]:
        """The logical shape."""
        return list(self.layout.logical)

    def element_type(self) -> str:
        """ONNX type string of the elements, e.g. ``tensor(float16)``."""
        return onnx_type(self.layout.dtype)

    def data_type(self) -> str:
        """Same as :meth:`element_type` (ONNX Runtime's name)."""
        return self.element_type()

    def tensor_size_in_bytes(self) -> int:
        """Bytes of the logical tensor."""
        return int(np.prod(self.layout.logical, dtype=np.int64)) * self.layout.itemsize

    def is_tensor(self) -> bool:
        """Always True."""
        return True

    def has_value(self) -> bool:
        """True while the NPU memory exists (False once its session closed)."""
        return not self.memory.dead

    def memory_info(self) -> Dict[str, Any]:
        """Where the tensor lives: upstream 0.11's keys (size, fd, offset, virt_addr,
        import_count, dmabuf_backed, attr_size, size_with_stride, w_stride, h_stride, fmt,
        pass_through, aligned_size, core_id, layout, strides)."""
        memory = self.memory
        info: Dict[str, Any] = {"device_type": self.device, "device_id": 0}
        info.update(
            size=memory.size,
            fd=memory.fd,
            offset=memory.offset,
            virt_addr=memory.virt_addr,
            import_count=memory.import_count,
            dmabuf_backed=memory.fd >= 0,
        )
        info.update((k, v) for k, v in self.spec.info.items() if not k.startswith("_"))
        return info

    def __repr__(self) -> str:
        state = "" if self.has_value() else ", released"
        return (
            f"<RKNN OrtValue {self.device} {self.spec.io_kind} '{self.spec.name}' "
            f"{self.element_type()} {self.shape()}{state}>"
        )


class CpuOrtValue:
    """A CPU tensor for the RKNN bindings (used where onnxruntime's own is not available).

    Wraps the caller's array without copying when it is C-contiguous: ``update_inplace``
    writes into it, ``numpy()`` returns a copy.
    """

    __slots__ = ("_array",)

    def __init__(self, array: np.ndarray) -> None:
        self._array = np.ascontiguousarray(array)

    def numpy(self) -> np.ndarray:
        """A copy of the contents."""
        return self._array.copy()

    def update_inplace(self, np_arr: Any) -> None:
        """Overwrite the contents (same shape and element type)."""
        if not isinstance(np_arr, np.ndarray):
            raise InvalidTypeError("update_inplace source must be a numpy array")
        if np_arr.shape != self._array.shape:
            raise InvalidArgumentError(
                f"update_inplace source shape mismatch: expected "
                f"{format_dims(self._array.shape)}, got {format_dims(np_arr.shape)}"
            )
        if np_arr.dtype != self._array.dtype:
            raise InvalidTypeError(
                "update_inplace source element type mismatch: expected "
                f"{type_name(self._array.dtype)}, got {type_name(np_arr.dtype)}"
            )
        self._array[...] = np_arr

    def data_ptr(self) -> int:
        """Address of the wrapped buffer."""
        return int(self._array.ctypes.data)

    def device_name(self) -> str:
        """``"cpu"``."""
        return "cpu"

    def device_type(self) -> str:
        """``"cpu"``."""
        return "cpu"

    def device_id(self) -> int:
        """Always 0."""
        return 0

    def shape(self) -> List[int]:
        """The shape."""
        return list(self._array.shape)

    def element_type(self) -> str:
        """ONNX type string of the elements."""
        return onnx_type(self._array.dtype)

    def data_type(self) -> str:
        """Same as :meth:`element_type`."""
        return self.element_type()

    def tensor_size_in_bytes(self) -> int:
        """Bytes of the tensor."""
        return int(self._array.nbytes)

    def is_tensor(self) -> bool:
        """Always True."""
        return True

    def has_value(self) -> bool:
        """Always True."""
        return True

    def sync_to_device(self) -> None:
        """Nothing to do on the CPU."""

    def sync_from_device(self) -> None:
        """Nothing to do on the CPU."""

    def memory_info(self) -> Dict[str, Any]:
        """``{"device_type": "cpu", "device_id": 0}``."""
        return {"device_type": "cpu", "device_id": 0}

    def __repr__(self) -> str:
        return f"<OrtValue cpu {self.element_type()} {self.shape()}>"
