"""What a ``.rknn`` file says about itself, read without any runtime.

Layout (little-endian): ``RKNN``, 4 zero bytes, u64 container version, u64 payload length,
40 reserved bytes when the version is 2 or more, the payload (a FlatBuffers buffer), then a
u64 JSON length and the JSON model description. Encrypted models start with ``CYPTRKNN``
and can only be read by the runtime.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ...errors import InvalidArgumentError

__all__ = ["RknnContainer", "TensorInfo", "parse_container"]

MAGIC = b"RKNN"
ENCRYPTED_MAGIC = b"CYPTRKNN"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: List[int]
    dtype: str


@dataclass(frozen=True)
class RknnContainer:
    format_version: int
    encrypted: bool = False
    target_platforms: List[str] = field(default_factory=list)
    toolkit_version: str = ""
    source_platform: str = ""
    inputs: List[TensorInfo] = field(default_factory=list)
    outputs: List[TensorInfo] = field(default_factory=list)

    def describe(self) -> List[str]:
        """Lines for ``ezrt info``."""
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


def _tensors(description: Dict[str, Any], side: str) -> List[TensorInfo]:
    norm = {t.get("tensor_id"): t for t in description.get("norm_tensor", [])}
    found = []
    for edge in description.get("graph", []):
        if edge.get("left") != side or edge.get("right") != "norm_tensor":
            continue
        tensor = norm.get(edge.get("right_tensor_id"), {})
        dtype = (tensor.get("dtype") or {}).get("vx_type") or "float"
        found.append(
            TensorInfo(str(tensor.get("url", "?")), list(tensor.get("size", [])), str(dtype))
        )
    return found


def parse_container(data: bytes, name: str = "model") -> RknnContainer:
    """Parse the header and JSON description; raises InvalidArgumentError if malformed."""
    if data.startswith(ENCRYPTED_MAGIC):
        return RknnContainer(format_version=0, encrypted=True)
    if not data.startswith(MAGIC) or len(data) < 24:
        raise InvalidArgumentError(f"{name} is not an RKNN model (no RKNN magic)")
    version, payload_length = struct.unpack_from("<QQ", data, 8)
    header = 24 if version <= 1 else 64
    trailer = header + payload_length
    if version > 0x1004 or trailer + 8 > len(data):
        raise InvalidArgumentError(
            f"{name}: RKNN container version {version} with a {payload_length}-byte payload "
            f"does not fit in {len(data)} bytes"
        )
    (json_length,) = struct.unpack_from("<Q", data, trailer)
    description: Optional[Dict[str, Any]] = None
    if json_length and trailer + 8 + json_length <= len(data):
        try:
            description = json.loads(data[trailer + 8 : trailer + 8 + json_length])
        except ValueError:
            description = None
    if not isinstance(description, dict):
        return RknnContainer(format_version=int(version))
    return RknnContainer(
        format_version=int(version),
        target_platforms=[str(p) for p in description.get("target_platform", [])],
        toolkit_version=str(description.get("version", "")),
        source_platform=str(description.get("ori_network_platform", "")),
        inputs=_tensors(description, "input"),
        outputs=_tensors(description, "output"),
    )
