"""RKNPU2 and RKNPU3 provider options as upstream 0.11 names them, and the RKNPU3 key parser.

The RKNPU2 keys are ezrt's own provider options (:mod:`ezrt.options`, shared with ONNX
Runtime); this room adds upstream 0.11's names for them (``Rknpu2ProviderOptions``,
``make_rknpu2_provider_options``) and everything about RKNPU3: its TypedDict, its helper,
and :func:`parse_rknpu3_options` with upstream's rules and range checks (UPSTREAM_0_11.md
§1.5, §2.2). Nothing here loads a library.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from typing import Any, Dict, Literal, Mapping, Optional, Tuple, TypedDict, Union

from ...errors import InvalidArgumentError, InvalidTypeError
from ...options import RknnProviderOptions, as_int, make_provider_options

__all__ = [
    "ENGINE_KEYS",
    "RKNPU3_KEYS",
    "Rknpu2ProviderOptions",
    "Rknpu3Config",
    "Rknpu3ProviderOptions",
    "make_rknpu2_provider_options",
    "make_rknpu3_provider_options",
    "parse_rknpu3_options",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Upstream 0.11's name for the RKNPU2 options dict: the very same TypedDict.
Rknpu2ProviderOptions = RknnProviderOptions
#: Upstream 0.11: ``make_rknpu2_provider_options is make_provider_options``.
make_rknpu2_provider_options = make_provider_options


class Rknpu3ProviderOptions(TypedDict, total=False):
    """RKNPU3 provider options (all optional), as upstream 0.11.

    ``runtime_library``: the librknn3_api to load (before ``ZTU_RKNPU3_RUNTIME_LIBRARY`` and
    the default names); ``device_id``: passed to ``rknn3_init``; ``weight_path``: the
    model's weight file (default: the model path with its last extension replaced by
    ``.weight``; required for a model given as bytes); ``priority`` (int32),
    ``run_timeout_ms`` (uint32), ``run_core_mask`` (uint32, ``"auto"`` or ``"all"``).
    ezrt also accepts its engine keys here (``max_queue_size``, ``threads_per_core``,
    ``submit_timeout_ms``, ``sequential_callbacks``, ``enable_pacing``,
    ``dispatch_policy``): RKNPU3 sessions run ``run``/``run_async`` on ezrt's workers.
    """

    runtime_library: PathLike
    device_id: Union[str, int]
    weight_path: PathLike
    priority: int
    run_timeout_ms: int
    run_core_mask: Union[int, Literal["auto", "all"]]


#: The RKNPU3 keys of upstream 0.11, in its order.
RKNPU3_KEYS: Tuple[str, ...] = (
    "runtime_library",
    "device_id",
    "weight_path",
    "priority",
    "run_timeout_ms",
    "run_core_mask",
)
#: ezrt's engine keys, meaningful for every NPU family (RKNPU3 runs on ezrt's workers too).
ENGINE_KEYS: Tuple[str, ...] = (
    "max_queue_size",
    "threads_per_core",
    "submit_timeout_ms",
    "sequential_callbacks",
    "enable_pacing",
    "dispatch_policy",
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX = 2**32 - 1
CORE_MASK_WORDS = {"auto": 0, "all": 0xFFFFFFFF}


def make_rknpu3_provider_options(
    *,
    runtime_library: Optional[PathLike] = None,
    device_id: Optional[Union[str, int]] = None,
    weight_path: Optional[PathLike] = None,
    priority: int = 0,
    run_timeout_ms: int = 0,
    run_core_mask: Union[int, str] = "auto",
) -> Rknpu3ProviderOptions:
    """Build an RKNPU3 ``provider_options`` dict, as upstream 0.11 does.

    ``priority``, ``run_timeout_ms`` and ``run_core_mask`` are always present; the other
    keys only when not None. Values are passed through unchanged and checked by the
    session (so the dict round-trips exactly).
    """
    options: Dict[str, Any] = {
        "priority": priority,
        "run_timeout_ms": run_timeout_ms,
        "run_core_mask": run_core_mask,
    }
    for key, value in (
        ("runtime_library", runtime_library),
        ("device_id", device_id),
        ("weight_path", weight_path),
    ):
        if value is not None:
            options[key] = value
    return options  # type: ignore[return-value]


@dataclass(frozen=True)
class Rknpu3Config:
    """Validated RKNPU3 options. Empty strings mean "not set"; a core mask of 0 means
    "every core of the model" (resolved at init, as upstream: the runtime refuses 0)."""

    runtime_library: str = ""
    device_id: str = ""
    weight_path: str = ""
    priority: int = 0
    run_timeout_ms: int = 0
    run_core_mask: int = 0


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__}: {text if len(text) <= 60 else text[:57] + '...'}"


def _path(name: str, value: object) -> str:
    try:
        path = os.fspath(value)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidTypeError(
            f"{name} must be a path-like object or string (got {_describe(value)})"
        ) from None
    return os.fsdecode(path) if isinstance(path, bytes) else path


def _ranged(name: str, value: object, low: int, high: int, kind: str) -> int:
    number = as_int(name, value)
    if not low <= number <= high:
        raise InvalidArgumentError(f"{name} is out of {kind} range (got {number})")
    return number


def _device_id(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise InvalidTypeError(f"device_id must be an integer (got {_describe(value)})")
    try:
        return str(operator.index(value))  # type: ignore[arg-type]
    except TypeError:
        raise InvalidTypeError(f"device_id must be an integer (got {_describe(value)})") from None


def _core_mask(value: object) -> int:
    if isinstance(value, str) and value.strip() in CORE_MASK_WORDS:
        return CORE_MASK_WORDS[value.strip()]
    return _ranged("run_core_mask", value, 0, UINT32_MAX, "uint32")


def parse_rknpu3_options(options: Mapping[str, Any]) -> Rknpu3Config:
    """Validate the RKNPU3 keys of ``options`` (other keys are the caller's business)."""
    values: Dict[str, Any] = {}
    for key, value in options.items():
        if key in ("runtime_library", "weight_path"):
            values[key] = _path(key, value)
        elif key == "device_id":
            values[key] = _device_id(value)
        elif key == "priority":
            values[key] = _ranged(key, value, INT32_MIN, INT32_MAX, "int32")
        elif key == "run_timeout_ms":
            values[key] = _ranged(key, value, 0, UINT32_MAX, "uint32")
        elif key == "run_core_mask":
            values[key] = _core_mask(value)
    return Rknpu3Config(**values)
