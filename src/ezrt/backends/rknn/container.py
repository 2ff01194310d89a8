"""What an RKNN model file says about itself, read without any runtime.

``.rknn`` (RKNPU2) layout, little-endian: ``RKNN``, 4 zero bytes, u64 container version, u64
payload length, 40 reserved bytes when the version is 2 or more, the payload (a FlatBuffers
buffer), then a u64 JSON length and the JSON model description. Encrypted models start with
``CYPTRKNN`` and only the runtime can read them. RKNPU3 models start with ``RKNX``; their
format is not public, so only the magic and the companion ``.weight`` file are reported.

The reader trusts nothing: every field it uses is checked for type and shape, and a bad file
raises :class:`ezrt.InvalidArgumentError` ("<name> is not a valid RKNN model: ...") naming
the field, never a ``TypeError``, ``KeyError`` or ``RecursionError``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ...errors import InvalidArgumentError

__all__ = ["RknnContainer", "TensorInfo", "companion_weight_path", "parse_container"]

MAGIC = b"RKNN"
ENCRYPTED_MAGIC = b"CYPTRKNN"
RKNX_MAGIC = b"RKNX"
#: Container versions the format is known to use (netron accepts these).
KNOWN_VERSIONS = frozenset({1, 2, 3, 4, 5, 6, 0x1001, 0x1002, 0x1003, 0x1004})


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as the JSON description gives it."""

    name: str
    shape: List[int]
    dtype: str


@dataclass(frozen=True)
class RknnContainer:
    """The readable facts of an RKNN model file."""

    format_version: int
    encrypted: bool = False
    family: str = "RKNPU2"
    size: int = 0
    weight_file: str = ""
    target_platforms: List[str] = field(default_factory=list)
    toolkit_version: str = ""
    source_platform: str = ""
    inputs: List[TensorInfo] = field(default_factory=list)
    outputs: List[TensorInfo] = field(default_factory=list)

    def describe(self) -> List[str]:
        """Lines for ``ezrt info``."""
        if self.family == "RKNPU3":
            if self.weight_file:
                state = "present" if os.path.isfile(self.weight_file) else "missing"
                weight = f"{self.weight_file} ({state})"
            else:
                weight = "- (in-memory model: set provider option 'weight_path')"
            return [
                f"RKNPU3 model (RKNX container, {self.size} bytes): only librknn3_api reads "
                "its tensors",
                f"  weight file: {weight}",
            ]
        if self.encrypted:
            return ["RKNN model, encrypted (CYPTRKNN): only the runtime can read it"]
        lines = [
            f"RKNN model, container version {self.format_version}",
            f"  target platform: {', '.join(self.target_platforms) or '-'}",
            f"  toolkit version: {self.toolkit_version or '-'}",
            f"  converted from: {self.source_platform or '-'}",
        ]
        for label, tensors in (("input", self.inputs), ("output", self.outputs)):
            lines += [f"  {label} {t.name}: {t.dtype} {t.shape}" for t in tensors]
        return lines


def companion_weight_path(model_path: str) -> str:
    """Upstream's rule: the model path with its last extension replaced by ``.weight``
    (``a/m.rknn`` -> ``a/m.weight``, ``m`` -> ``m.weight``, ``m.v1.rknn`` -> ``m.v1.weight``)."""
    head, tail = os.path.split(model_path)
    stem, extension = os.path.splitext(tail)
    if not stem:  # ".rknn": splitext keeps a leading dot as the name
        stem, extension = tail, ""
    del extension
    return os.path.join(head, stem + ".weight")


class _Invalid(Exception):
    """A field of the JSON description is malformed (message: which and how)."""


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(obj: Dict[str, Any], key: str, where: str, expected: Any, default: Any) -> Any:
    value = obj.get(key, default)
    if value is default and key not in obj:
        return default
    if expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        name = getattr(expected, "__name__", None) or "/".join(t.__name__ for t in expected)
        raise _Invalid(f"field '{where}{key}' must be {_article(name)} (got {_kind(value)})")
    return value


def _article(name: str) -> str:
    words = {"str": "a string", "int": "an integer", "list": "a list", "dict": "an object"}
    return words.get(name, name)


def _int_list(values: List[Any], where: str) -> List[int]:
    for index, value in enumerate(values):
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"field '{where}[{index}]' must be an integer (got {_kind(value)})")
    return list(values)


def _str_list(values: List[Any], where: str) -> List[str]:
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise _Invalid(f"field '{where}[{index}]' must be a string (got {_kind(value)})")
    return list(values)


def _tensors(description: Dict[str, Any], side: str) -> List[TensorInfo]:
    norm: Dict[int, Dict[str, Any]] = {}
    for index, tensor in enumerate(_get(description, "norm_tensor", "", list, [])):
        where = f"norm_tensor[{index}]."
        if not isinstance(tensor, dict):
            raise _Invalid(f"field 'norm_tensor[{index}]' must be an object (got {_kind(tensor)})")
        tensor_id = _get(tensor, "tensor_id", where, int, None)
        _get(tensor, "url", where, str, "")
        _int_list(_get(tensor, "size", where, list, []), f"{where}size")
        dtype = _get(tensor, "dtype", where, dict, {})
        _get(dtype, "vx_type", f"{where}dtype.", str, "")
        if tensor_id is not None:
            norm[tensor_id] = tensor
    found = []
    for index, edge in enumerate(_get(description, "graph", "", list, [])):
        where = f"graph[{index}]."
        if not isinstance(edge, dict):
            raise _Invalid(f"field 'graph[{index}]' must be an object (got {_kind(edge)})")
        left = _get(edge, "left", where, str, "")
        right = _get(edge, "right", where, str, "")
        if left != side or right != "norm_tensor":
            continue
        target = _get(edge, "right_tensor_id", where, int, None)
        tensor = norm.get(target, {}) if target is not None else {}
        dtype = tensor.get("dtype", {}).get("vx_type") or "float"
        found.append(TensorInfo(str(tensor.get("url", "?")), list(tensor.get("size", [])), dtype))
    return found


def _describe(description: Dict[str, Any], version: int) -> RknnContainer:
    platforms = _get(description, "target_platform", "", (list, str), [])
    if isinstance(platforms, str):
        platforms = [platforms]
    return RknnContainer(
        format_version=version,
        target_platforms=_str_list(platforms, "target_platform"),
        toolkit_version=_get(description, "version", "", str, ""),
        source_platform=_get(description, "ori_network_platform", "", str, ""),
        inputs=_tensors(description, "input"),
        outputs=_tensors(description, "output"),
    )


def parse_container(data: bytes, name: str = "model") -> RknnContainer:
    """Parse the header and JSON description; raises InvalidArgumentError if malformed.

    ``name`` is used in messages and, for RKNX models given by path, to find the companion
    ``.weight`` file.
    """
    bad = f"{name} is not a valid RKNN model"
    if data.startswith(ENCRYPTED_MAGIC):
        return RknnContainer(format_version=0, encrypted=True, size=len(data))
    if data.startswith(RKNX_MAGIC):
        weight = companion_weight_path(name) if name != "model" else ""
        return RknnContainer(format_version=0, family="RKNPU3", size=len(data), weight_file=weight)
    if not data.startswith(MAGIC):
        raise InvalidArgumentError(f"{bad}: no RKNN magic (starts with {data[:4]!r})")
    if len(data) < 24:
        raise InvalidArgumentError(f"{bad}: {len(data)} bytes is too small for the header")
    version, payload_length = struct.unpack_from("<QQ", data, 8)
    if version not in KNOWN_VERSIONS:
        raise InvalidArgumentError(f"{bad}: unknown container version {version}")
    header = 24 if version <= 1 else 64
    trailer = header + payload_length
    if trailer + 8 > len(data):
        raise InvalidArgumentError(
            f"{bad}: RKNN container version {version} with a {payload_length}-byte payload "
            f"does not fit in {len(data)} bytes"
        )
    (json_length,) = struct.unpack_from("<Q", data, trailer)
    if json_length == 0:
        return RknnContainer(format_version=int(version), size=len(data))
    if trailer + 8 + json_length > len(data):
        raise InvalidArgumentError(
            f"{bad}: its {json_length}-byte JSON description does not fit in {len(data)} bytes"
        )
    try:
        description = json.loads(data[trailer + 8 : trailer + 8 + json_length])
    except RecursionError:
        raise InvalidArgumentError(f"{bad}: its JSON description is nested too deeply") from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise InvalidArgumentError(f"{bad}: its JSON description does not parse ({exc})") from None
    if not isinstance(description, dict):
        raise InvalidArgumentError(
            f"{bad}: its JSON description must be an object (got {_kind(description)})"
        )
    try:
        parsed = _describe(description, int(version))
    except _Invalid as exc:
        raise InvalidArgumentError(f"{bad}: {exc}") from None
    return RknnContainer(
        format_version=parsed.format_version,
        size=len(data),
        target_platforms=parsed.target_platforms,
        toolkit_version=parsed.toolkit_version,
        source_platform=parsed.source_platform,
        inputs=parsed.inputs,
        outputs=parsed.outputs,
    )


def read_head(path: str, count: int = 16) -> Optional[bytes]:
    """The first bytes of a file, or None when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except OSError:
        return None
