"""Making OrtValues for one RKNN session: upstream 0.11's factory rules and error phrases.

Each RKNN backend (RKNPU2, RKNPU3) offers a :class:`ZeroCopyModel`: its inputs and outputs as
:class:`~ezrt.backends.rknn.values.IoSpec` and the calls that allocate or import memory.
The functions here check the caller's arguments against it and build
:class:`~ezrt.backends.rknn.values.RknnOrtValue` objects; :mod:`ezrt.ortvalue` and the
IOBinding call them.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
import os
from typing import Any, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import numpy as np

from ...errors import EzrtError, InvalidArgumentError, InvalidTypeError
from .layout import NativeLayout
from .memory import Memory, let_go
from .values import IoSpec, RknnOrtValue, format_dims, type_name

__all__ = [
    "BoundRun",
    "DmabufHold",
    "ZeroCopyModel",
    "hold_dmabuf",
    "new_value",
    "parse_mem_flags",
    "parse_shape",
    "value_from_dmabuf",
    "value_from_numpy",
]

_MEM_FLAG_WORDS = {
    "default": 0,
    "cacheable": 0,
    "non_cacheable": 2,
    "non-cacheable": 2,
    "uncached": 2,
    "try_sram": 4,
    "sram": 4,
}


class ZeroCopyModel(Protocol):
    """What a backend offers zero copy (see the RKNPU2 and RKNPU3 backends)."""

    family: str  # "rknpu2" or "rknpu3"
    inputs: List[IoSpec]
    outputs: List[IoSpec]

    def allocate(self, spec: IoSpec, mem_flags: int) -> Memory: ...

    def import_dmabuf(
        self, spec: IoSpec, fd: int, size: int, offset: int, virt_addr: Optional[int]
    ) -> Memory: ...

    def hatch_layout(self, spec: IoSpec, shape: Tuple[int, ...]) -> Optional[NativeLayout]:
        """RKNPU3's NCHW compatibility path: a layout for a 4-D NCHW ``shape`` of an
        NC1HWC2 input, or None when it does not apply."""
        ...

    def check_bindable(self, spec: IoSpec, value: RknnOrtValue) -> None:
        """Raise when ``value`` cannot be bound to ``spec`` of this session."""
        ...


class BoundRun:
    """The payload of one ``run_with_iobinding``: values in model order, snapshotted from
    the binding when the run was submitted (later binding changes do not affect it)."""

    __slots__ = ("inputs", "outputs")

    def __init__(
        self,
        inputs: Tuple[Tuple[IoSpec, RknnOrtValue], ...],
        outputs: Tuple[Tuple[IoSpec, RknnOrtValue], ...],
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs


def spec_of(zc: ZeroCopyModel, name: Any, io_kind: Any) -> IoSpec:
    if io_kind not in ("input", "output"):
        raise InvalidArgumentError(f"io_kind must be 'input' or 'output' (got {io_kind!r})")
    specs = zc.inputs if io_kind == "input" else zc.outputs
    for spec in specs:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in specs)
    raise InvalidArgumentError(f"Unknown {io_kind} name: {name} (model {io_kind}s: {known})")


def parse_mem_flags(mem_flags: Any) -> int:
    """Upstream's words (or a raw int) -> allocation flags."""
    if mem_flags is None:
        return 0
    if isinstance(mem_flags, str):
        word = mem_flags.strip().lower()
        if word not in _MEM_FLAG_WORDS:
            raise InvalidArgumentError(
                f"invalid mem_flags: {mem_flags!r} (expected one of: {', '.join(_MEM_FLAG_WORDS)})"
            )
        return _MEM_FLAG_WORDS[word]
    if isinstance(mem_flags, bool):
        raise InvalidTypeError("mem_flags must be a string, integer, or None (got bool)")
    try:
        return operator.index(mem_flags)
    except TypeError:
        raise InvalidTypeError(
            f"mem_flags must be a string, integer, or None (got {type(mem_flags).__name__})"
        ) from None


def parse_shape(shape: Any) -> Tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise InvalidTypeError(f"shape must be a sequence of integers (got {shape!r})")
    dims = []
    for dim in shape:
        if isinstance(dim, bool):
            raise InvalidTypeError(f"shape dim must be an integer (got {dim!r})")
        try:
            value = operator.index(dim)
        except TypeError:
            raise InvalidTypeError(f"shape dim must be an integer (got {dim!r})") from None
        if value < 0:
            raise InvalidArgumentError(f"shape dims must be >= 0 (got {list(shape)})")
        dims.append(value)
    return tuple(dims)


def parse_dtype(element_type: Any) -> np.dtype:
    try:
        dtype: np.dtype = np.dtype(element_type)
    except TypeError:
        raise InvalidTypeError(
            f"Unsupported numpy dtype for RKNN tensor: {element_type!r}"
        ) from None
    return dtype


def _check_device_id(device: str, device_id: Any) -> None:
    if device_id not in (0, None) or isinstance(device_id, bool):
        family = device.upper()
        supported = (
            "RKNN supports device_id 0 only"
            if device == "rknpu2"
            else (f"{family} supports device_id 0 only")
        )
        raise InvalidArgumentError(f"{supported} (got {device_id!r})")


def new_value(
    zc: ZeroCopyModel,
    backend: Any,
    name: Any,
    io_kind: Any,
    *,
    dtype: Optional[np.dtype] = None,
    shape: Optional[Tuple[int, ...]] = None,
    mem_flags: int = 0,
    device_id: Any = 0,
) -> RknnOrtValue:
    """A session-bound value in fresh NPU memory; ``dtype``/``shape`` (when given) must be
    the tensor's (or, RKNPU3 inputs, a 4-D NCHW shape that fits its NC1HWC2 layout)."""
    _check_device_id(zc.family, device_id)
    spec = spec_of(zc, name, io_kind)
    layout = spec.layout
    if shape is not None and tuple(shape) != spec.shape:
        hatch = zc.hatch_layout(spec, tuple(shape)) if io_kind == "input" else None
        if hatch is None:
            raise InvalidArgumentError(
                f"OrtValue for {io_kind} '{spec.name}' shape mismatch: expected "
                f"{format_dims(spec.shape)}, got {format_dims(shape)}"
            )
        layout = hatch
    if dtype is not None and np.dtype(dtype) != spec.dtype:
        raise InvalidTypeError(
            f"OrtValue for {io_kind} '{spec.name}' element type mismatch: expected "
            f"{type_name(spec.dtype)}, got {type_name(np.dtype(dtype))}"
        )
    memory = zc.allocate(spec, mem_flags)
    return RknnOrtValue(zc.family, backend, spec, memory, layout)


def value_from_numpy(
    zc: ZeroCopyModel, backend: Any, array: Any, name: Any, io_kind: Any, device_id: Any = 0
) -> RknnOrtValue:
    """A session-bound value holding ``array`` (cast to the tensor's element type)."""
    if not isinstance(array, np.ndarray):
        raise InvalidTypeError(f"Input must be a numpy array (got {type(array).__name__})")
    spec = spec_of(zc, name, io_kind)
    value = new_value(zc, backend, name, io_kind, shape=tuple(array.shape), device_id=device_id)
    try:
        value.update_inplace(np.ascontiguousarray(array, dtype=spec.dtype))
    except BaseException:
        value.memory.free()
        raise
    return value


def value_from_dmabuf(
    zc: ZeroCopyModel,
    backend: Any,
    fd: Any,
    shape: Any,
    element_type: Any,
    *,
    size: Any,
    offset: Any,
    virt_addr: Any,
    name: Any,
    io_kind: Any,
) -> RknnOrtValue:
    """A value over the caller's dma-buf ``fd`` (a camera or decoder frame): the buffer must
    already hold the tensor in this session's native layout (see ``memory_info()``)."""
    spec = spec_of(zc, name, io_kind)
    dims = parse_shape(shape)
    dtype = parse_dtype(element_type)
    if dims != spec.shape:
        raise InvalidArgumentError(
            f"OrtValue from dmabuf for {io_kind} '{spec.name}' shape mismatch: expected "
            f"{format_dims(spec.shape)}, got {format_dims(dims)}"
        )
    if dtype != spec.dtype:
        raise InvalidTypeError(
            f"OrtValue from dmabuf for {io_kind} '{spec.name}' element type mismatch: "
            f"expected {type_name(spec.dtype)}, got {type_name(dtype)}"
        )
    for label, number in (("fd", fd), ("size", size), ("offset", offset)):
        if isinstance(number, bool) or not isinstance(number, (int, np.integer)):
            raise InvalidTypeError(f"dma-buf {label} must be an integer (got {number!r})")
    need = spec.alloc_bytes if zc.family == "rknpu3" else spec.layout.nbytes
    if fd < 0 or offset < 0 or size <= 0 or size < need:
        what = "invalid or too-small dma-buf for RKNPU3 tensor: " if zc.family == "rknpu3" else ""
        if fd < 0 or offset < 0 or size <= 0:
            detail = f"fd {fd}, size {size}, offset {offset} (fd and offset must be >= 0)"
        else:
            detail = (
                f"dma-buf of {size} bytes is too small for {io_kind} '{spec.name}': its native "
                f"{spec.layout.name} tensor needs {need}"
            )
        raise InvalidArgumentError(f"{what or 'invalid dma-buf: '}{detail}")
    if zc.family == "rknpu2" and size > 0xFFFFFFFF:
        raise InvalidArgumentError(f"dma-buf size is too large for RKNPU2 (got {size})")
    if virt_addr is not None and (isinstance(virt_addr, bool) or not isinstance(virt_addr, int)):
        raise InvalidTypeError(f"virt_addr must be an integer address or None (got {virt_addr!r})")
    memory = zc.import_dmabuf(spec, int(fd), int(size), int(offset), virt_addr)
    return RknnOrtValue(zc.family, backend, spec, memory)


def _dup(fd: int) -> int:
    try:
        return os.dup(fd)
    except OSError as exc:
        raise EzrtError(f"dup dma-buf fd failed: {exc}") from exc


class DmabufHold(NamedTuple):
    """ezrt's own hold on a caller's dma-buf: a dup of its fd and, when the caller gave no
    ``virt_addr``, a mapping of it. The :class:`Memory` made from it owns both."""

    fd: int
    mapping: Optional[mmap.mmap]
    address: int  # where the CPU sees the buffer: the mapping, or the caller's virt_addr

    def release(self) -> None:
        """Let go of the hold (the import it was made for failed)."""
        let_go(self.fd, self.mapping)


def hold_dmabuf(fd: int, size: int, offset: int, virt_addr: Optional[int]) -> DmabufHold:
    """``dup`` the caller's dma-buf ``fd`` and, without ``virt_addr``, map it (upstream does
    the same): the value keeps its own descriptor and mapping, whatever the caller does with
    theirs. Nothing is kept if a step fails."""
    owned = _dup(fd)
    if virt_addr is not None:
        return DmabufHold(owned, None, virt_addr)
    mapping: Optional[mmap.mmap] = None
    try:
        try:
            mapping = mmap.mmap(
                owned, size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, ValueError) as exc:
            raise EzrtError(f"mmap dma-buf fd failed: {exc}") from exc
        address = ctypes.addressof((ctypes.c_char * len(mapping)).from_buffer(mapping))
    except BaseException:
        let_go(owned, mapping)
        raise
    return DmabufHold(owned, mapping, address)
