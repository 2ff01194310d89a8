"""Native tensor layouts of the NPU and the copies between them and numpy arrays.

A native tensor is described by its layout name, its native dims and its element strides
(one per native dim). The user sees a *logical* array: NCHW for 4-D image tensors, the dims
as they are otherwise. Three mappings exist:

* ``identity``: logical dims are the native dims (any strides);
* ``nchw`` / ``nhwc``: native ``[N, C, H, W]`` / ``[N, H, W, C]`` holds a 4-D logical array
  (NCHW, or NHWC with ``logical_order="NHWC"``);
* ``nc1hwc2``: native ``[N, C1, H, W, C2]`` holds logical NCHW ``[N, C, H, W]``, channel
  ``c`` at ``(c // C2, c % C2)``; channels ``C..C1*C2-1`` are padding (written as zeros).

Every copy goes through a strided numpy view of the native buffer, so row padding
(``w_stride``/``h_stride`` on RKNPU2, explicit strides on RKNPU3) is honoured both ways.
Nothing here touches a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from ...errors import EzrtError

__all__ = [
    "NativeLayout",
    "OpaqueLayoutError",
    "dense_strides",
    "nc1hwc2_to_nchw",
    "nchw_to_nc1hwc2",
    "span_bytes",
]


class OpaqueLayoutError(EzrtError):
    """The tensor's strides cannot be mapped to a numpy view."""


def dense_strides(dims: Sequence[int]) -> Tuple[int, ...]:
    """Row-major element strides of ``dims``."""
    strides = []
    step = 1
    for dim in reversed(dims):
        strides.append(step)
        step *= max(int(dim), 1)
    return tuple(reversed(strides))


def span_bytes(dims: Sequence[int], strides: Sequence[int], itemsize: int) -> int:
    """Bytes from the first element to the end of the last one (0 for an empty tensor)."""
    if any(int(d) == 0 for d in dims):
        return 0
    last = sum((int(d) - 1) * int(s) for d, s in zip(dims, strides))
    return (last + 1) * itemsize


@dataclass(frozen=True)
class NativeLayout:
    """How a logical tensor lies in a native buffer."""

    #: "NCHW", "NHWC", "NC1HWC2", "UNDEFINED", ... (as the runtime names it)
    name: str
    dims: Tuple[int, ...]
    strides: Tuple[int, ...]
    dtype: np.dtype
    #: The logical (user-facing) shape.
    logical: Tuple[int, ...]
    #: "identity", "nchw", "nhwc" or "nc1hwc2": how the logical array maps onto native.
    mapping: str = "identity"
    #: For 4-D mappings: the order of the logical dims, "NCHW" (usual) or "NHWC".
    logical_order: str = "NCHW"
    #: The runtime reported strides ezrt cannot map (RKNPU3 ``n_stride != n_dims``): the
    #: buffer is only reachable through ``data_ptr`` and the reported strides.
    opaque: bool = False

    @property
    def itemsize(self) -> int:
        return int(self.dtype.itemsize)

    @property
    def nbytes(self) -> int:
        """Bytes the native tensor spans (what the buffer must hold at least)."""
        return span_bytes(self.dims, self.strides, self.itemsize)

    @property
    def dense(self) -> bool:
        """Logical == native and without gaps: a plain byte copy will do."""
        return self.mapping == "identity" and self.strides == dense_strides(self.dims)

    def view(self, buffer: memoryview) -> np.ndarray:
        """A strided numpy view of the native tensor inside ``buffer`` (no copy)."""
        if self.nbytes > len(buffer):
            raise ValueError(
                f"a {self.name} tensor {list(self.dims)} with strides {list(self.strides)} "
                f"spans {self.nbytes} bytes; the buffer holds {len(buffer)}"
            )
        return np.ndarray(
            self.dims,
            dtype=self.dtype,
            buffer=buffer,
            strides=tuple(s * self.itemsize for s in self.strides),
        )

    def _to_nchw(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(0, 3, 1, 2) if self.logical_order == "NHWC" else array

    def _from_nchw(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(0, 2, 3, 1) if self.logical_order == "NHWC" else array

    def read(self, buffer: memoryview) -> np.ndarray:
        """The logical array, copied out of the native buffer."""
        if self.opaque:
            raise OpaqueLayoutError(
                "numpy/copy for an internally-strided RKNPU3 tensor is not implemented; access "
                "the native buffer and reported strides"
            )
        native = self.view(buffer)
        if self.mapping == "nhwc":
            nchw = native.transpose(0, 3, 1, 2)
        elif self.mapping == "nchw":
            nchw = native
        elif self.mapping == "nc1hwc2":
            n, c, h, w = self._nchw_shape()
            nchw = nc1hwc2_to_nchw(native, c)[:n, :, :h, :w]
        else:
            return np.array(native, copy=True, order="C")
        # Always a copy: for some shapes (h = w = 1, or c = 1) the native view needs no
        # transposing and is contiguous already, and ``ascontiguousarray`` would hand the
        # caller a view of NPU memory that the next run overwrites and close frees.
        return np.array(self._from_nchw(nchw), copy=True, order="C")

    def write(self, buffer: memoryview, array: np.ndarray) -> None:
        """Write a logical array (already of ``logical`` shape and ``dtype``) into place;
        NC1HWC2 padding (extra channels, and rows or columns beyond a smaller logical
        tensor) is zeroed."""
        if self.opaque:
            raise OpaqueLayoutError(
                "update_inplace for an internally-strided RKNPU3 tensor is not implemented; "
                "write the native buffer via data_ptr using the reported strides"
            )
        native = self.view(buffer)
        if self.mapping == "nhwc":
            native[...] = self._to_nchw(array).transpose(0, 2, 3, 1)
        elif self.mapping == "nchw":
            native[...] = self._to_nchw(array)
        elif self.mapping == "nc1hwc2":
            nchw = self._to_nchw(array)
            n, _, h, w = nchw.shape
            packed = nchw_to_nc1hwc2(nchw, native.shape[1], native.shape[4])
            if packed.shape == native.shape:
                native[...] = packed
            else:
                native[...] = 0
                native[:n, :, :h, :w, :] = packed
        else:
            native[...] = array.reshape(native.shape)

    def _nchw_shape(self) -> Tuple[int, ...]:
        shape = self.logical
        if self.logical_order == "NHWC":
            return (shape[0], shape[3], shape[1], shape[2])
        return shape


def nchw_to_nc1hwc2(array: np.ndarray, c1: Optional[int], c2: int) -> np.ndarray:
    """Pack NCHW into a new NC1HWC2 array ``[N, C1, H, W, C2]``; padding channels are 0.

    ``c1`` defaults to ``ceil(C / c2)``; it must hold every channel.
    """
    n, c, h, w = array.shape
    c1 = -(-c // c2) if c1 is None else c1
    if c > c1 * c2:
        raise ValueError(f"{c} channels do not fit in C1={c1} x C2={c2}")
    padded = np.zeros((n, c1 * c2, h, w), dtype=array.dtype)
    padded[:, :c] = array
    return np.ascontiguousarray(padded.reshape(n, c1, c2, h, w).transpose(0, 1, 3, 4, 2))


def nc1hwc2_to_nchw(array: np.ndarray, channels: int) -> np.ndarray:
    """Unpack ``[N, C1, H, W, C2]`` into a new NCHW array with ``channels`` channels."""
    n, c1, h, w, c2 = array.shape
    if channels > c1 * c2:
        raise ValueError(f"{channels} channels do not fit in C1={c1} x C2={c2}")
    full = array.transpose(0, 1, 4, 2, 3).reshape(n, c1 * c2, h, w)
    return np.ascontiguousarray(full[:, :channels])
