"""One copy of a model's weights for several ONNX Runtime sessions.

ONNX Runtime's Python API has one way for sessions to share initializer memory instead of
copying it: external data held in memory (``SessionOptions.add_external_initializers_from_
files_in_memory``) with ``session.use_external_initializer_file_buffers_directly=1``, which
makes each session borrow the buffer. :func:`split_weights` prepares that: it rewrites the
model so that every large top-level initializer stored inline (``raw_data``) becomes an
external-data reference into one buffer, and fills the buffer, reading the model's bytes
once and never parsing the rest of it.

It works on the protobuf wire format directly (ezrt does not depend on the ``onnx``
package): ``ModelProto.graph`` (field 7) -> ``GraphProto.initializer`` (field 5) ->
``TensorProto.raw_data`` (field 9), replaced by ``external_data`` (13) entries and
``data_location`` (14) = EXTERNAL. Everything else is copied byte for byte. A model it cannot
read, or with nothing worth moving, gives None: the caller then loads the model as it is.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np

__all__ = ["LOCATION", "SplitModel", "split_weights"]

#: The name the moved tensors' external data refers to (the in-memory "file").
LOCATION = "ezrt-shared-weights.bin"
#: Each tensor starts on a page boundary in the buffer (ORT may map or align it).
ALIGN = 4096
#: Smaller initializers stay inline: shape inference and constant folding read them.
MIN_BYTES = 1024

# Field numbers of onnx.proto.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_LENGTH_DELIMITED, _VARINT = 2, 0


class SplitModel(NamedTuple):
    """A model whose large initializers live in ``weights``, at ``LOCATION``."""

    model: bytes  # the model, its large initializers replaced by references into weights
    weights: np.ndarray  # uint8, the initializers' bytes, each at a page-aligned offset
    moved: int  # how many initializers were moved


class _Malformed(ValueError):
    """Not the protobuf this module expects: the model is loaded as it is."""


def _varint(data: memoryview, at: int, end: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        if at >= end or shift > 63:
            raise _Malformed("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(data: memoryview, start: int, end: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """(field, wire type, field start, payload start, payload end) of each field."""
    at = start
    while at < end:
        begin = at
        key, at = _varint(data, at, end)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, at = _varint(data, at, end)
            yield field, wire, begin, begin, at
        elif wire == 1:  # 64-bit
            at += 8
            yield field, wire, begin, at - 8, at
        elif wire == _LENGTH_DELIMITED:
            size, at = _varint(data, at, end)
            yield field, wire, begin, at, at + size
            at += size
        elif wire == 5:  # 32-bit
            at += 4
            yield field, wire, begin, at - 4, at
        else:
            raise _Malformed(f"wire type {wire}")
        if at > end:
            raise _Malformed("a field runs past its message")


def _message(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _reference(offset: int, length: int) -> bytes:
    """External-data entries and data_location=EXTERNAL for one moved tensor."""
    parts = []
    for key, value in (("location", LOCATION), ("offset", str(offset)), ("length", str(length))):
        entry = _message(1, key.encode()) + _message(2, value.encode())
        parts.append(_message(_TENSOR_EXTERNAL_DATA, entry))
    parts.append(_encode_varint(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _encode_varint(1))
    return b"".join(parts)


def _split(data: memoryview) -> Optional[Tuple[bytes, List[Tuple[int, int, int]], int]]:
    """The rewritten model, the copies to make (source, buffer offset, length), the size."""
    copies: List[Tuple[int, int, int]] = []
    size = 0
    model: List[bytes] = []
    for field, wire, begin, start, end in _fields(data, 0, len(data)):
        if field != _MODEL_GRAPH or wire != _LENGTH_DELIMITED:
            model.append(bytes(data[begin:end]))
            continue
        graph: List[bytes] = []
        for g_field, g_wire, g_begin, g_start, g_end in _fields(data, start, end):
            if g_field != _GRAPH_INITIALIZER or g_wire != _LENGTH_DELIMITED:
                graph.append(bytes(data[g_begin:g_end]))
                continue
            kept: List[bytes] = []
            raw: Optional[Tuple[int, int]] = None
            external = False
            for t_field, t_wire, t_begin, t_start, t_end in _fields(data, g_start, g_end):
                if t_field == _TENSOR_RAW_DATA and t_wire == _LENGTH_DELIMITED:
                    raw = (t_start, t_end - t_start)
                else:
                    external |= t_field in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION)
                    kept.append(bytes(data[t_begin:t_end]))
            if external:  # its data sits in files beside the model: load it as it is
                return None
            if raw is None or raw[1] < MIN_BYTES:
                graph.append(bytes(data[g_begin:g_end]))
                continue
            copies.append((raw[0], size, raw[1]))
            kept.append(_reference(size, raw[1]))
            size += -(-raw[1] // ALIGN) * ALIGN
            graph.append(_message(_GRAPH_INITIALIZER, b"".join(kept)))
        model.append(_message(_MODEL_GRAPH, b"".join(graph)))
    if not copies:
        return None
    return b"".join(model), copies, size


def split_weights(model: Union[str, bytes]) -> Optional[SplitModel]:
    """The model with its large inline initializers moved into one shared buffer, or None
    when there is nothing to move or the bytes are not a model this can read."""
    if isinstance(model, bytes):
        data = memoryview(model)
        return _assemble(data, lambda source, target: _copy(data, source, target))
    try:
        with open(model, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return None
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    # The tensors are read from the file into the buffer directly: going
                    # through the mapping would make every page of the file resident too.
                    return _assemble(view, lambda source, target: _read_at(handle, source, target))
                finally:
                    view.release()
    except OSError:
        return None


def _copy(data: memoryview, offset: int, target: memoryview) -> None:
    target[:] = data[offset : offset + len(target)]


def _read_at(handle: Any, offset: int, target: memoryview) -> None:
    done = 0
    while done < len(target):
        got = os.preadv(handle.fileno(), [target[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read of the model at byte {offset + done}")
        done += got


def _assemble(data: memoryview, copy: Callable[[int, memoryview], None]) -> Optional[SplitModel]:
    """Split the model read through ``data``; ``copy(source offset, target)`` fills each
    tensor's place in the buffer."""
    try:
        split = _split(data)
    except (_Malformed, IndexError):
        return None
    if split is None:
        return None
    rewritten, copies, size = split
    weights = np.zeros(max(size, 1), np.uint8)
    buffer = weights.data
    for source, offset, length in copies:
        copy(source, buffer[offset : offset + length])
    return SplitModel(rewritten, weights, len(copies))
