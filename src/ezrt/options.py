"""Provider options: the user-facing dict, its helper, and the one parser that validates it.

Everything about option values is decided here, once, before a model is touched: the
session and the backends only ever see a frozen :class:`SessionConfig`. Messages keep the
upstream phrases (``"max_queue_size must be > 0"``) and add what was given.
"""

from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    FrozenSet,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    Union,
)

import numpy as np

from .errors import InvalidArgumentError, InvalidTypeError

__all__ = [
    "DISPATCH_BATCH_KEY",
    "LayoutLike",
    "ProviderOptions",
    "RknnProviderOptions",
    "SessionConfig",
    "TpModeLike",
    "make_provider_options",
    "parse_provider_options",
]

#: ``run_options`` key (dict key or ``onnxruntime.RunOptions`` config entry) that turns on
#: batch dispatch in :meth:`ezrt.InferenceSession.run`.
DISPATCH_BATCH_KEY = "ztu_modelrt_dispatch_batch"

#: The most completed results that may wait for the callback thread before admission blocks.
MAX_UNDELIVERED = 8
#: A sanity bound: more workers per core than this is a typo, not a configuration.
MAX_THREADS_PER_CORE = 64
#: The largest ``max_queue_size`` and ``submit_timeout_ms`` (a C int, as upstream's).
MAX_INT32 = 2**31 - 1
#: The largest ``max_batch_size``, and ``batch_timeout_us`` (10 s).
MAX_BATCH_SIZE = 4096
MAX_BATCH_TIMEOUT_US = 10_000_000
#: The largest core id in ``schedule`` (a CPU id below this; RKNN core masks have 16 bits).
MAX_CORE_ID = 4095

LayoutLike = Literal["nchw", "original", "nchw_software", "original_software", "nhwc", "any"]
TpModeLike = Literal["auto", "all", "0", "1", "2", "0,1", "0,1,2"]
DispatchPolicy = Literal["round_robin", "least_loaded"]
PathLike = Union[str, "os.PathLike[str]"]


class ProviderOptions(TypedDict, total=False):
    """The keys ezrt reads from ``provider_options`` (all optional).

    See the README's option table for what each does on each backend.
    """

    layout: str
    zero_copy_layout: str
    max_queue_size: int
    threads_per_core: int
    submit_timeout_ms: int
    sequential_callbacks: bool
    schedule: Union[int, str, Sequence[int]]
    tp_mode: str
    enable_pacing: bool
    disable_dup_context: bool
    custom_op_path: Union[PathLike, Sequence[PathLike]]
    custom_op_paths: Union[PathLike, Sequence[PathLike]]
    custom_op_default_path: bool
    load_custom_ops_from_default_path: bool
    dispatch_policy: str
    output_dtype: str
    max_batch_size: int
    batch_timeout_us: int
    lone_run: str
    share_weights: bool


#: Upstream's name for :class:`ProviderOptions`.
RknnProviderOptions = ProviderOptions

_LAYOUTS = {
    "nchw": "nchw",
    "original": "nchw",
    "nchw_software": "nchw_software",
    "original_software": "nchw_software",
    "nhwc": "nhwc",
    "any": "any",
}
_ZERO_COPY_LAYOUTS = ("nhwc", "native")
#: tp_mode text -> RKNN core mask (RKNN_NPU_CORE_*). ``auto`` is 0, ``all`` 0xffff.
TP_MODE_MASKS: Dict[str, int] = {
    "auto": 0,
    "all": 0xFFFF,
    "0": 0b001,
    "1": 0b010,
    "2": 0b100,
    "0,1": 0b011,
    "0,1,2": 0b111,
}
_DISPATCH_POLICIES = ("round_robin", "least_loaded")
_BOOLEAN_KEYS = ("sequential_callbacks", "enable_pacing", "disable_dup_context", "share_weights")
#: How a task that finds every worker idle runs (ONNX Runtime, CPU, with ``schedule``).
LONE_RUNS = ("auto", "all_cores", "one_core")
_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})
_INT_TEXT = re.compile(r"[+-]?\d+")

# Order matters: it is the order of the "Supported keys" list in the unknown-key message.
SUPPORTED_KEYS: Tuple[str, ...] = (
    "layout",
    "zero_copy_layout",
    "max_queue_size",
    "threads_per_core",
    "submit_timeout_ms",
    "sequential_callbacks",
    "schedule",
    "tp_mode",
    "enable_pacing",
    "disable_dup_context",
    "custom_op_path",
    "custom_op_paths",
    "custom_op_default_path",
    "load_custom_ops_from_default_path",
    "dispatch_policy",
    "output_dtype",
    "max_batch_size",
    "batch_timeout_us",
    "lone_run",
    "share_weights",
)


@dataclass(frozen=True)
class SessionConfig:
    """Validated, normalised provider options. Built only by :func:`parse_provider_options`."""

    layout: str = "nchw"
    zero_copy_layout: str = "nhwc"
    max_queue_size: int = 3
    threads_per_core: int = 1
    submit_timeout_ms: int = 10000
    sequential_callbacks: bool = True
    #: Core ids for data-parallel mode, in the user's order (duplicates weight round robin).
    schedule: Optional[Tuple[int, ...]] = None
    #: Normalised tp_mode text, or None when not given.
    tp_mode: Optional[str] = None
    enable_pacing: bool = False
    disable_dup_context: bool = False
    custom_op_paths: Tuple[str, ...] = ()
    custom_op_default_path: bool = False
    dispatch_policy: str = "round_robin"
    #: Dynamic batching: the most queued tasks one run takes (1: off).
    max_batch_size: int = 1
    #: How long a worker holding fewer than max_batch_size tasks waits for more (us).
    batch_timeout_us: int = 0
    #: ONNX Runtime, CPU, schedule: "auto", "all_cores" or "one_core" (see the README).
    lone_run: str = "auto"
    #: ONNX Runtime, CPU, schedule: the sessions borrow one copy of the weights.
    share_weights: bool = True
    #: RKNN outputs: "float32" (dequantised by the runtime) or "native" (the model's dtype).
    output_dtype: str = "float32"
    #: The keys the user actually gave, for "not meaningful on this backend" errors.
    given: FrozenSet[str] = field(default_factory=frozenset)

    @property
    def tp_mask(self) -> int:
        """The RKNN-style core mask of ``tp_mode`` (0 = auto when not given)."""
        return TP_MODE_MASKS[self.tp_mode or "auto"]

    @property
    def routes(self) -> Tuple[Optional[int], ...]:
        """Distinct cores that get workers, sorted; ``(None,)`` in tp/default mode."""
        if self.schedule is None:
            return (None,)
        return tuple(sorted(set(self.schedule)))

    @property
    def wants_custom_ops(self) -> bool:
        return bool(self.custom_op_paths) or self.custom_op_default_path


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__}: {text}"


def as_int(name: str, value: object) -> int:
    """Upstream's int-like rule, widened to numpy integers: an int, or a decimal string."""
    if isinstance(value, str):
        text = value.strip()
        if _INT_TEXT.fullmatch(text):
            return int(text)
        raise InvalidArgumentError(f"{name} must be an integer (got {_describe(value)})")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidTypeError(f"{name} must be an integer (got {_describe(value)})") from None


def as_bool(name: str, value: object) -> bool:
    """A bool, an int (non-zero is True), or one of 1/true/on/yes, 0/false/off/no."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise InvalidArgumentError(
            f"{name} must be a boolean (got {_describe(value)}; "
            "strings accepted: 1/true/on/yes, 0/false/off/no)"
        )
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, float):  # operator.index refuses floats anyway; say it plainly
        raise InvalidTypeError(f"{name} must be a boolean (got {_describe(value)})")
    try:
        return operator.index(value) != 0  # type: ignore[arg-type]
    except TypeError:
        raise InvalidTypeError(f"{name} must be a boolean (got {_describe(value)})") from None


def _positive(name: str, value: object, most: int = MAX_INT32) -> int:
    """An integer in 1..``most``."""
    number = as_int(name, value)
    if number <= 0:
        raise InvalidArgumentError(f"{name} must be > 0 (got {number})")
    if number > most:
        raise InvalidArgumentError(f"{name} must be <= {most} (got {number})")
    return number


def _non_negative(name: str, value: object, most: int) -> int:
    """An integer in 0..``most``."""
    number = as_int(name, value)
    if number < 0:
        raise InvalidArgumentError(f"{name} must be >= 0 (got {number})")
    if number > most:
        raise InvalidArgumentError(f"{name} must be <= {most} (got {number})")
    return number


def _one_of(name: str, value: object, choices: Tuple[str, ...]) -> str:
    text = _text(name, value).strip().lower()
    if text not in choices:
        raise InvalidArgumentError(f"{name} must be one of: {', '.join(choices)} (got {value!r})")
    return text


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidTypeError(f"{name} must be a string (got {_describe(value)})")
    return value


def _parse_schedule(value: object) -> Tuple[int, ...]:
    if isinstance(value, str):
        tokens = re.sub(r"[\[\],]", " ", value).split()
        cores = []
        for token in tokens:
            if not _INT_TEXT.fullmatch(token):
                raise InvalidArgumentError(
                    f"schedule must contain integers (got {token!r} in {value!r})"
                )
            cores.append(int(token))
    elif isinstance(value, (bytes, bytearray, Mapping)):
        raise InvalidTypeError(
            f"schedule must be an integer, string, or sequence (got {_describe(value)})"
        )
    elif isinstance(value, Sequence):
        cores = [as_int("schedule", item) for item in value]
    else:
        try:
            cores = [operator.index(value)]  # type: ignore[arg-type]
        except TypeError:
            raise InvalidTypeError(
                f"schedule must be an integer, string, or sequence (got {_describe(value)})"
            ) from None
    if not cores:
        raise InvalidArgumentError("schedule must not be empty")
    negative = [core for core in cores if core < 0]
    if negative:
        raise InvalidArgumentError(f"schedule values must be >= 0 (got {negative[0]})")
    too_big = [core for core in cores if core > MAX_CORE_ID]
    if too_big:
        raise InvalidArgumentError(
            f"schedule values must be <= {MAX_CORE_ID} (got {too_big[0]}): a core id"
        )
    return tuple(cores)


def _parse_tp_mode(value: object) -> str:
    text = _text("tp_mode", value).strip().lower()
    if text not in TP_MODE_MASKS:
        raise InvalidArgumentError(
            f"invalid tp_mode: '{text}', expected one of: " + ", ".join(TP_MODE_MASKS)
        )
    return text


def _parse_layout(value: object) -> str:
    text = _text("layout", value)
    try:
        return _LAYOUTS[text.lower()]
    except KeyError:
        raise InvalidArgumentError(
            f"Unknown layout: {text} (expected one of: {', '.join(_LAYOUTS)})"
        ) from None


def _parse_zero_copy_layout(value: object) -> str:
    text = _text("zero_copy_layout", value)
    if text.lower() not in _ZERO_COPY_LAYOUTS:
        raise InvalidArgumentError(f"Unknown zero_copy_layout: {text}, expected 'nhwc' or 'native'")
    return text.lower()


def _parse_paths(name: str, value: object) -> List[str]:
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        paths = []
        for item in value:
            if not isinstance(item, (str, os.PathLike)):
                raise InvalidTypeError(
                    f"{name} must be a path-like object or sequence of path-like objects "
                    f"(got an element {_describe(item)})"
                )
            paths.append(os.fspath(item))
        return paths
    raise InvalidTypeError(
        f"{name} must be a path-like object or sequence of path-like objects "
        f"(got {_describe(value)})"
    )


def split_provider_options(provider_options: object) -> List[Mapping[str, Any]]:
    """Accept ``None``, one dict, or ORT's list of dicts (one per provider)."""
    if provider_options is None:
        return []
    if isinstance(provider_options, Mapping):
        return [provider_options]
    if isinstance(provider_options, Sequence) and not isinstance(
        provider_options, (str, bytes, bytearray)
    ):
        for index, item in enumerate(provider_options):
            if not isinstance(item, Mapping):
                raise InvalidTypeError(
                    "provider_options must be a dict or a sequence whose first element is a "
                    f"dict (element {index} is {_describe(item)})"
                )
        return list(provider_options)
    raise InvalidTypeError(
        "provider_options must be a dict or a sequence whose first element is a dict "
        f"(got {_describe(provider_options)})"
    )


def parse_provider_options(
    options: Optional[Mapping[str, Any]], *, allow_foreign_keys: bool = False
) -> Tuple[SessionConfig, Dict[str, Any]]:
    """Validate ezrt's keys of one options dict.

    Returns the config and the keys ezrt does not know. Those are an error unless
    ``allow_foreign_keys`` (the session allows them only when they go to an ONNX Runtime
    execution provider that has options of its own, such as CUDA).
    """
    if options is None:
        return SessionConfig(), {}
    values: Dict[str, Any] = {}
    custom_op_paths: List[str] = []
    foreign: Dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise InvalidTypeError(f"provider_options keys must be strings (got {_describe(key)})")
        if key == "layout":
            values["layout"] = _parse_layout(value)
        elif key == "zero_copy_layout":
            values["zero_copy_layout"] = _parse_zero_copy_layout(value)
        elif key in ("max_queue_size", "threads_per_core", "submit_timeout_ms"):
            most = MAX_THREADS_PER_CORE if key == "threads_per_core" else MAX_INT32
            values[key] = _positive(key, value, most)
        elif key in _BOOLEAN_KEYS:
            values[key] = as_bool(key, value)
        elif key == "schedule":
            values["schedule"] = _parse_schedule(value)
        elif key == "tp_mode":
            values["tp_mode"] = _parse_tp_mode(value)
        elif key in ("custom_op_path", "custom_op_paths"):
            custom_op_paths.extend(_parse_paths(key, value))
        elif key in ("custom_op_default_path", "load_custom_ops_from_default_path"):
            values["custom_op_default_path"] = as_bool(key, value)
        elif key == "dispatch_policy":
            values["dispatch_policy"] = _one_of(key, value, _DISPATCH_POLICIES)
        elif key == "max_batch_size":
            values[key] = _positive(key, value, MAX_BATCH_SIZE)
        elif key == "batch_timeout_us":
            values[key] = _non_negative(key, value, MAX_BATCH_TIMEOUT_US)
        elif key == "lone_run":
            values[key] = _one_of(key, value, LONE_RUNS)
        elif key == "output_dtype":
            text = _text("output_dtype", value).strip().lower()
            if text not in ("float32", "native"):
                raise InvalidArgumentError(
                    f"output_dtype must be 'float32' or 'native' (got {value!r})"
                )
            values["output_dtype"] = text
        elif allow_foreign_keys:
            foreign[key] = value
        else:
            raise InvalidArgumentError(
                f"Unknown provider_options key: {key}. Supported keys: " + ", ".join(SUPPORTED_KEYS)
            )
    if "schedule" in values and "tp_mode" in values:
        raise InvalidArgumentError(
            "provider_options 'tp_mode' conflicts with 'schedule'; set only one."
        )
    given = frozenset(k for k in options if k not in foreign)
    config = SessionConfig(custom_op_paths=tuple(custom_op_paths), given=given, **values)
    return config, foreign


def make_provider_options(
    *,
    layout: str = "original",
    max_queue_size: int = 3,
    threads_per_core: int = 1,
    submit_timeout_ms: int = 10000,
    sequential_callbacks: bool = True,
    schedule: Optional[Union[int, str, Sequence[int]]] = None,
    tp_mode: Optional[str] = None,
    enable_pacing: bool = False,
    disable_dup_context: bool = False,
    custom_op_paths: Optional[Union[PathLike, Sequence[PathLike]]] = None,
    custom_op_default_path: bool = False,
    zero_copy_layout: Optional[str] = None,
    dispatch_policy: Optional[str] = None,
    output_dtype: Optional[str] = None,
    max_batch_size: Optional[int] = None,
    batch_timeout_us: Optional[int] = None,
    lone_run: Optional[str] = None,
    share_weights: Optional[bool] = None,
) -> ProviderOptions:
    """Build a ``provider_options`` dict with upstream's defaults.

    Values are checked by the session constructor, not here, except that ``schedule`` and
    ``tp_mode`` cannot both be set (``ValueError``). Keys whose value is ``None`` are left out.
    """
    if schedule is not None and tp_mode is not None:
        raise InvalidArgumentError(
            "provider options 'tp_mode' conflicts with 'schedule'; set only one."
        )
    options: Dict[str, Any] = {
        "layout": layout,
        "max_queue_size": max_queue_size,
        "threads_per_core": threads_per_core,
        "submit_timeout_ms": submit_timeout_ms,
        "sequential_callbacks": sequential_callbacks,
        "enable_pacing": enable_pacing,
        "disable_dup_context": disable_dup_context,
        "custom_op_default_path": custom_op_default_path,
    }
    optional = {
        "schedule": schedule,
        "tp_mode": tp_mode,
        "custom_op_paths": custom_op_paths,
        "zero_copy_layout": zero_copy_layout,
        "dispatch_policy": dispatch_policy,
        "output_dtype": output_dtype,
        "max_batch_size": max_batch_size,
        "batch_timeout_us": batch_timeout_us,
        "lone_run": lone_run,
        "share_weights": share_weights,
    }
    options.update({key: value for key, value in optional.items() if value is not None})
    return options  # type: ignore[return-value]


def read_run_options(run_options: Any) -> Tuple[bool, Any]:
    """(batch dispatch asked for, the run options ONNX Runtime receives)."""
    if run_options is None:
        return False, None
    if isinstance(run_options, Mapping):  # ezrt's form: only the dispatch key
        unknown = [key for key in run_options if key != DISPATCH_BATCH_KEY]
        if unknown:
            raise InvalidArgumentError(
                f"Unknown run_options key: {unknown[0]!r} (supported: {DISPATCH_BATCH_KEY})"
            )
        if DISPATCH_BATCH_KEY not in run_options:
            return False, None
        return as_bool(DISPATCH_BATCH_KEY, run_options[DISPATCH_BATCH_KEY]), None
    getter = getattr(run_options, "get_run_config_entry", None)
    if getter is None:
        raise InvalidTypeError(
            "run_options must be a dict, an onnxruntime.RunOptions or None "
            f"(got {type(run_options).__name__})"
        )
    try:
        value = getter(DISPATCH_BATCH_KEY)
    except Exception:  # ORT raises when the entry is absent
        return False, run_options
    # ORT ignores config entries it does not know, so the RunOptions go on as they are.
    return as_bool(DISPATCH_BATCH_KEY, value), run_options


def as_seconds(name: str, value: Any) -> Optional[float]:
    """A duration argument: None or a number of seconds >= 0 (``math.inf``: none)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise InvalidTypeError(f"{name} must be a number of seconds or None (got {value!r})")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise InvalidArgumentError(f"{name} must be >= 0 seconds or None (got {value!r})")
    return None if math.isinf(seconds) else seconds
