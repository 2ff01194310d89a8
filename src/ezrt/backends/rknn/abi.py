"""ctypes binding of Rockchip's NPU runtime ``librknnrt.so`` (RKNN API v2.3.2 ABI).

Struct layouts, enum values and status codes follow shared/reference/RKNN_ABI.md. The layouts
are declared once, with two symbolic types resolved per platform: ``rknn_context`` is
``uint64_t`` everywhere except 32-bit ARM, where the header makes it ``uint32_t``, and
pointers have the platform's width. :func:`check_layouts` compares the sizes ctypes computes
with the ones the header gives on that ABI (LP64 or 32-bit ARM) and refuses a platform where
they differ, with a clear error, before any call reaches the runtime.

The library is loaded only when an RKNN session opens, never on ``import ezrt``; it is looked
up as upstream 0.11 does (``ZTU_RKNPU2_RUNTIME_LIBRARY``, then ``librknnrt.so``,
``librknnrt.so.2``). Functions newer than runtime 1.4.0 are resolved lazily: a missing one
raises a clear error when (and only when) it is needed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import threading
from ctypes import (
    POINTER,
    Structure,
    c_char,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_int64,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np

from ...errors import BackendUnavailableError, EzrtError

MAX_DIMS = 16
MAX_NAME_LEN = 256
MAX_DYNAMIC_SHAPES = 512

# rknn_query_cmd
QUERY_IN_OUT_NUM = 0
QUERY_INPUT_ATTR = 1
QUERY_OUTPUT_ATTR = 2
QUERY_SDK_VERSION = 5
QUERY_CUSTOM_STRING = 7
QUERY_NATIVE_INPUT_ATTR = 8
QUERY_NATIVE_OUTPUT_ATTR = 9
QUERY_NATIVE_NHWC_INPUT_ATTR = 10
QUERY_NATIVE_NHWC_OUTPUT_ATTR = 11
QUERY_INPUT_DYNAMIC_RANGE = 13
QUERY_CURRENT_INPUT_ATTR = 14
QUERY_CURRENT_OUTPUT_ATTR = 15

# rknn_tensor_format
FMT_NCHW, FMT_NHWC, FMT_NC1HWC2, FMT_UNDEFINED = 0, 1, 2, 3
FMT_NAMES = {FMT_NCHW: "NCHW", FMT_NHWC: "NHWC", FMT_NC1HWC2: "NC1HWC2", FMT_UNDEFINED: "UNDEFINED"}

# rknn_core_mask
CORE_AUTO, CORE_0 = 0, 1

# rknn_init flags
FLAG_SHARE_WEIGHT_MEM = 0x20

# rknn_mem_sync_mode
SYNC_TO_DEVICE, SYNC_FROM_DEVICE, SYNC_BIDIRECTIONAL = 1, 2, 3
# rknn_mem_alloc_flags (rknn_create_mem2)
MEM_DEFAULT, MEM_CACHEABLE, MEM_NON_CACHEABLE, MEM_TRY_SRAM = 0, 1, 2, 4

# rknn_tensor_type -> (numpy dtype, ONNX-style type string)
TENSOR_TYPES: Dict[int, Tuple[Optional[np.dtype], str]] = {
    0: (np.dtype(np.float32), "tensor(float)"),
    1: (np.dtype(np.float16), "tensor(float16)"),
    2: (np.dtype(np.int8), "tensor(int8)"),
    3: (np.dtype(np.uint8), "tensor(uint8)"),
    4: (np.dtype(np.int16), "tensor(int16)"),
    5: (np.dtype(np.uint16), "tensor(uint16)"),
    6: (np.dtype(np.int32), "tensor(int32)"),
    7: (np.dtype(np.uint32), "tensor(uint32)"),
    8: (np.dtype(np.int64), "tensor(int64)"),
    9: (np.dtype(np.bool_), "tensor(bool)"),
    10: (None, "tensor(int4)"),
    11: (None, "tensor(bfloat16)"),
}
#: numpy dtype -> rknn_tensor_type, for the dtypes an input may be given in.
NUMPY_TO_TENSOR_TYPE: Dict[np.dtype, int] = {
    dtype: code for code, (dtype, _) in TENSOR_TYPES.items() if dtype is not None
}

#: Status codes: name and a short description (ours, after the vendor's meaning).
STATUS: Dict[int, Tuple[str, str]] = {
    -1: ("RKNN_ERR_FAIL", "execution failed"),
    -2: ("RKNN_ERR_TIMEOUT", "timed out"),
    -3: ("RKNN_ERR_DEVICE_UNAVAILABLE", "the NPU device is not available"),
    -4: ("RKNN_ERR_MALLOC_FAIL", "memory allocation failed"),
    -5: ("RKNN_ERR_PARAM_INVALID", "invalid parameter"),
    -6: ("RKNN_ERR_MODEL_INVALID", "invalid or unsupported model"),
    -7: ("RKNN_ERR_CTX_INVALID", "invalid context"),
    -8: ("RKNN_ERR_INPUT_INVALID", "invalid input"),
    -9: ("RKNN_ERR_OUTPUT_INVALID", "invalid output"),
    -10: ("RKNN_ERR_DEVICE_UNMATCH", "runtime, driver or firmware versions do not match"),
    -11: (
        "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL",
        "pre-compiled model incompatible with the driver",
    ),
    -12: (
        "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION",
        "model optimisation level incompatible with the driver",
    ),
    -13: ("RKNN_ERR_TARGET_PLATFORM_UNMATCH", "model target platform does not match this chip"),
    -14: ("RKNN_WARNING_SKIP_CUSTOM_OP_COMPUTE", "custom op asks for the built-in implementation"),
}
ERR_TARGET_PLATFORM_UNMATCH = -13


def status_text(code: int) -> str:
    """``"<NAME> (<code>): <description>."`` for an RKNN status code."""
    name, description = STATUS.get(code, ("RKNN_ERR_UNKNOWN", "unknown RKNN error"))
    return f"{name} ({code}): {description}."


class RknnError(EzrtError):
    """An RKNN API call failed: ``"<api> failed: <NAME> (<code>): <description>"``."""

    def __init__(self, api: str, code: int, where: str = "", hint: str = "") -> None:
        self.api = api
        self.code = code
        super().__init__(f"{api} failed{where}: {status_text(code)}" + (f" {hint}" if hint else ""))


def check(api: str, code: int, where: str = "") -> None:
    """Raise :class:`RknnError` for a negative status."""
    if code < 0:
        raise RknnError(api, code, where)


# ---------------------------------------------------------------------------- the ABI

#: The platform's ABI as far as the RKNN headers care: "lp64" (aarch64, x86-64) or "arm32"
#: (armhf/armel: ``rknn_context`` is ``uint32_t`` there, H:125-129).
_MACHINE = platform.machine().lower()
ARM32 = ctypes.sizeof(c_void_p) == 4 and _MACHINE.startswith(("arm", "aarch"))
ABI = "arm32" if ARM32 else ("lp64" if ctypes.sizeof(c_void_p) == 8 else "unsupported")

# Symbolic field types, resolved per ABI by _declare: a pointer, and rknn_context.
_PTR = "pointer"
_CTX = "context"

_FIELDS: Dict[str, List[Tuple[str, Any]]] = {
    "InputOutputNum": [("n_input", c_uint32), ("n_output", c_uint32)],
    "TensorAttr": [
        ("index", c_uint32),
        ("n_dims", c_uint32),
        ("dims", c_uint32 * MAX_DIMS),
        ("name", c_char * MAX_NAME_LEN),
        ("n_elems", c_uint32),
        ("size", c_uint32),
        ("fmt", c_int),
        ("type", c_int),
        ("qnt_type", c_int),
        ("fl", c_int8),
        ("zp", c_int32),
        ("scale", c_float),
        ("w_stride", c_uint32),
        ("size_with_stride", c_uint32),
        ("pass_through", c_uint8),
        ("h_stride", c_uint32),
    ],
    "InputRange": [
        ("index", c_uint32),
        ("shape_number", c_uint32),
        ("fmt", c_int),
        ("name", c_char * MAX_NAME_LEN),
        ("dyn_range", (c_uint32 * MAX_DIMS) * MAX_DYNAMIC_SHAPES),
        ("n_dims", c_uint32),
    ],
    "SdkVersion": [("api_version", c_char * 256), ("drv_version", c_char * 256)],
    "CustomString": [("string", c_char * 1024)],
    "TensorMem": [
        ("virt_addr", _PTR),
        ("phys_addr", c_uint64),
        ("fd", c_int32),
        ("offset", c_int32),
        ("size", c_uint32),
        ("flags", c_uint32),
        ("priv_data", _PTR),
    ],
    "Input": [
        ("index", c_uint32),
        ("buf", _PTR),
        ("size", c_uint32),
        ("pass_through", c_uint8),
        ("type", c_int),
        ("fmt", c_int),
    ],
    "Output": [
        ("want_float", c_uint8),
        ("is_prealloc", c_uint8),
        ("index", c_uint32),
        ("buf", _PTR),
        ("size", c_uint32),
    ],
    "InitExtend": [
        ("ctx", _CTX),
        ("real_model_offset", c_int32),
        ("real_model_size", c_uint32),
        ("model_buffer_fd", c_int32),
        ("model_buffer_flags", c_uint32),
        ("reserved", c_uint8 * 112),
    ],
    "PerfRun": [("run_duration", c_int64)],
    "MemSize": [
        ("total_weight_size", c_uint32),
        ("total_internal_size", c_uint32),
        ("total_dma_allocated_size", c_uint64),
        ("total_sram_size", c_uint32),
        ("free_sram_size", c_uint32),
        ("reserved", c_uint32 * 10),
    ],
}

#: sizeof() of each struct as the v2.3.2 header lays it out on each ABI. LP64 figures were
#: measured with gcc for aarch64 (RKNN_ABI.md "SIZES"); the 32-bit ARM figures follow from
#: the AAPCS rules (4-byte pointers, 8-byte-aligned 64-bit integers), and the tests check
#: them against the C compiler with -m32 -malign-double, which applies the same rules.
EXPECTED_SIZES: Dict[str, Dict[str, int]] = {
    "lp64": {
        "InputOutputNum": 8,
        "TensorAttr": 376,
        "InputRange": 33040,
        "SdkVersion": 512,
        "CustomString": 1024,
        "TensorMem": 40,
        "Input": 32,
        "Output": 24,
        "InitExtend": 136,
        "PerfRun": 8,
        "MemSize": 64,
    },
    "arm32": {
        "InputOutputNum": 8,
        "TensorAttr": 376,
        "InputRange": 33040,
        "SdkVersion": 512,
        "CustomString": 1024,
        "TensorMem": 40,
        "Input": 24,
        "Output": 16,
        "InitExtend": 132,
        "PerfRun": 8,
        "MemSize": 64,
    },
}


class _TensorAttrBase(Structure):
    """Helpers shared by rknn_tensor_attr on every ABI."""

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(self.dims[i]) for i in range(min(int(self.n_dims), MAX_DIMS)))

    @property
    def text_name(self) -> str:
        return bytes(self.name).decode("utf-8", "replace")


def _resolve(kind: Any, pointer: Any, context: Any) -> Any:
    if kind is _PTR:
        return pointer
    if kind is _CTX:
        return context
    return kind


def declare(pointer: Any = c_void_p, context: Any = None) -> Dict[str, Type[Structure]]:
    """The struct classes for one ABI: ``pointer`` and ``rknn_context`` as given.

    The module's own structs are ``declare()`` for this platform; declaring another ABI
    (e.g. ``declare(c_uint32, c_uint32)`` for 32-bit ARM) gives its layout for comparison.
    """
    if context is None:
        context = c_uint32 if ARM32 else c_uint64
    classes: Dict[str, Type[Structure]] = {}
    for name, fields in _FIELDS.items():
        base = _TensorAttrBase if name == "TensorAttr" else Structure
        resolved = [(field, _resolve(kind, pointer, context)) for field, kind in fields]
        classes[name] = type(name, (base,), {"_fields_": resolved})
    return classes


def layout_table(classes: Dict[str, Type[Structure]]) -> Dict[str, Tuple[int, Dict[str, int]]]:
    """``{struct: (size, {field: offset})}``: for tests and for the report on an ABI."""
    return {
        name: (
            ctypes.sizeof(cls),
            {field: getattr(cls, field).offset for field, _ in cls._fields_},  # type: ignore[misc]
        )
        for name, cls in classes.items()
    }


Context: Any = c_uint32 if ARM32 else c_uint64
_native = declare(c_void_p, Context)
InputOutputNum: Any = _native["InputOutputNum"]
TensorAttr: Any = _native["TensorAttr"]
InputRange: Any = _native["InputRange"]
SdkVersion: Any = _native["SdkVersion"]
CustomString: Any = _native["CustomString"]
TensorMem: Any = _native["TensorMem"]
Input: Any = _native["Input"]
Output: Any = _native["Output"]
InitExtend: Any = _native["InitExtend"]
PerfRun: Any = _native["PerfRun"]
MemSize: Any = _native["MemSize"]

STRUCT_SIZES: Dict[Any, int] = {
    _native[name]: size for name, size in EXPECTED_SIZES.get(ABI, EXPECTED_SIZES["lp64"]).items()
}


def check_layouts(abi: str = ABI, classes: Optional[Dict[str, Type[Structure]]] = None) -> None:
    """Refuse to talk to the runtime when a struct would not have the header's size here.

    Replaces an import-time ``assert`` (which ``python -O`` removes): a wrong layout must
    never reach a device, and the reason must be readable.
    """
    where = f"{platform.machine() or 'unknown machine'}, {8 * ctypes.sizeof(c_void_p)}-bit"
    expected = EXPECTED_SIZES.get(abi)
    if expected is None:
        raise BackendUnavailableError(
            f"the RKNN runtime ABI of this platform ({where}) is not one ezrt knows: "
            "librknnrt exists for aarch64 (LP64) and 32-bit ARM only"
        )
    classes = classes if classes is not None else _native
    wrong = [
        f"{name} is {ctypes.sizeof(classes[name])} bytes, the header says {size}"
        for name, size in expected.items()
        if ctypes.sizeof(classes[name]) != size
    ]
    if wrong:
        raise BackendUnavailableError(
            f"ezrt's ctypes layout of the RKNN structs does not match the {abi} ABI on this "
            f"platform ({where}): " + "; ".join(wrong)
        )


# ---------------------------------------------------------------------------- the library

_REQUIRED: Dict[str, Tuple[Any, List[Any]]] = {
    "rknn_init": (c_int, [POINTER(Context), c_void_p, c_uint32, c_uint32, POINTER(InitExtend)]),
    "rknn_dup_context": (c_int, [POINTER(Context), POINTER(Context)]),
    "rknn_destroy": (c_int, [Context]),
    "rknn_query": (c_int, [Context, c_int, c_void_p, c_uint32]),
    "rknn_inputs_set": (c_int, [Context, c_uint32, POINTER(Input)]),
    "rknn_set_core_mask": (c_int, [Context, c_int]),
    "rknn_run": (c_int, [Context, c_void_p]),
    "rknn_outputs_get": (c_int, [Context, c_uint32, POINTER(Output), c_void_p]),
    "rknn_outputs_release": (c_int, [Context, c_uint32, POINTER(Output)]),
}
#: Newer (or zero-copy) functions: (restype, argtypes, the runtime version that has them).
#: Every pointer-returning one has an explicit restype (ctypes would truncate to int).
_OPTIONAL: Dict[str, Tuple[Any, List[Any], str]] = {
    "rknn_set_input_shapes": (c_int, [Context, c_uint32, POINTER(TensorAttr)], "1.5.2"),
    "rknn_register_custom_ops": (c_int, [Context, c_void_p, c_uint32], "1.6.0"),
    "rknn_create_mem": (POINTER(TensorMem), [Context, c_uint32], "1.0"),
    "rknn_create_mem2": (POINTER(TensorMem), [Context, c_uint64, c_uint64], "2.0.0"),
    "rknn_create_mem_from_fd": (
        POINTER(TensorMem),
        [Context, c_int32, c_void_p, c_uint32, c_int32],
        "1.0",
    ),
    "rknn_destroy_mem": (c_int, [Context, POINTER(TensorMem)], "1.3.0"),
    "rknn_set_io_mem": (c_int, [Context, POINTER(TensorMem), POINTER(TensorAttr)], "1.0"),
    "rknn_mem_sync": (c_int, [Context, POINTER(TensorMem), c_int], "1.6.0"),
}

#: Upstream 0.11's variable: when set (non-empty) it is the only candidate.
RUNTIME_ENV = "ZTU_RKNPU2_RUNTIME_LIBRARY"
#: ezrt's earlier name for the same thing, still honoured after RUNTIME_ENV.
LIBRARY_ENV = "EZRT_RKNN_LIBRARY"
#: Tried in order when no variable is set: upstream's names (the loader's search path),
#: then the places Rockchip's instructions put the file.
DEFAULT_NAMES = ("librknnrt.so", "librknnrt.so.2")
USUAL_PATHS = (
    "/usr/lib/librknnrt.so",
    "/usr/lib64/librknnrt.so",
    "/usr/local/lib/librknnrt.so",
    "/usr/lib/aarch64-linux-gnu/librknnrt.so",
    "/usr/lib/arm-linux-gnueabihf/librknnrt.so",
    "/vendor/lib64/librknnrt.so",
    "/vendor/lib/librknnrt.so",
)
INSTALL_HINT = (
    "Install Rockchip's NPU runtime (librknnrt.so, from airockchip/rknn-toolkit2 "
    "rknpu2/runtime/Linux/librknn_api/<arch>/) into /usr/lib and run ldconfig, or set "
    f"{RUNTIME_ENV} to its path."
)
_VERSION_MARKER = re.compile(rb"librknnrt version: ([^\x00\n]{1,200})")


class Runtime:
    """A loaded librknnrt with typed functions; optional ones resolved on first use."""

    # The required functions, set in __init__; ctypes checks their arguments on each call.
    rknn_init: Any
    rknn_dup_context: Any
    rknn_destroy: Any
    rknn_query: Any
    rknn_inputs_set: Any
    rknn_set_core_mask: Any
    rknn_run: Any
    rknn_outputs_get: Any
    rknn_outputs_release: Any

    def __init__(self, path: str) -> None:
        check_layouts()
        try:
            self.lib = ctypes.CDLL(path)  # ctypes releases the GIL around every call
        except OSError as exc:
            raise BackendUnavailableError(f"could not load {path}: {exc}") from exc
        self.path = path
        missing = [name for name in _REQUIRED if not hasattr(self.lib, name)]
        if missing:
            raise BackendUnavailableError(
                f"{path} is not a usable librknnrt: it lacks {', '.join(missing)}"
            )
        for name, (restype, argtypes) in _REQUIRED.items():
            function = getattr(self.lib, name)
            function.restype = restype
            function.argtypes = argtypes
            setattr(self, name, function)
        self._optional: Dict[str, Any] = {}
        self._optional_lock = threading.Lock()

    def has(self, name: str) -> bool:
        """Whether the library exports ``name``."""
        return hasattr(self.lib, name)

    def optional(self, name: str) -> Any:
        """A newer function, or an error naming the runtime version that has it."""
        function = self._optional.get(name)
        if function is None:
            restype, argtypes, since = _OPTIONAL[name]
            found = getattr(self.lib, name, None)
            if found is None:
                raise BackendUnavailableError(
                    f"{name} is missing from {self.path} (runtime {self.file_version() or '?'}); "
                    f"it needs librknnrt >= {since}"
                )
            with self._optional_lock:
                found.restype = restype
                found.argtypes = argtypes
                function = self._optional.setdefault(name, found)
        return function

    def file_version(self) -> Optional[str]:
        """The version string the library file carries, if any."""
        return library_version(self.path)


def library_version(path: str) -> Optional[str]:
    """The version a library file announces ("librknnrt version: X"), without a model."""
    if os.sep not in path:  # a bare name: the loader's choice, not readable here
        return None
    try:
        with open(path, "rb") as handle:
            match = _VERSION_MARKER.search(handle.read())
    except OSError:
        return None
    return match.group(1).decode("ascii", "replace").strip() if match else None


def candidate_paths() -> List[str]:
    """Where to look, in order (upstream 0.11's rule, then ezrt's extra places)."""
    for variable in (RUNTIME_ENV, LIBRARY_ENV):
        override = os.environ.get(variable)
        if override:
            return [override]
    return [*DEFAULT_NAMES, *USUAL_PATHS]


_runtimes: Dict[str, Runtime] = {}
_runtimes_lock = threading.Lock()  # guards _runtimes: one Runtime per library path


def load_runtime(path: Optional[str] = None) -> Runtime:
    """The librknnrt to use (loaded once per path). Raises BackendUnavailableError naming
    every candidate tried and why it failed."""
    candidates: Sequence[str] = [path] if path else candidate_paths()
    tried = []
    for candidate in candidates:
        with _runtimes_lock:
            if candidate in _runtimes:
                return _runtimes[candidate]
        is_name = os.sep not in candidate
        if not is_name and not os.path.exists(candidate):
            tried.append(f"{candidate}: no such file")
            continue
        try:
            runtime = Runtime(candidate)
        except BackendUnavailableError as exc:
            tried.append(f"{candidate}: {exc}")
            continue
        with _runtimes_lock:
            return _runtimes.setdefault(candidate, runtime)
    chosen_by = next((v for v in (RUNTIME_ENV, LIBRARY_ENV) if os.environ.get(v)), None)
    source = f" (from {chosen_by})" if chosen_by else ""
    raise BackendUnavailableError(
        "unable to load the RKNPU2 runtime: the RKNN runtime library librknnrt.so was not "
        f"found{source}. Tried: " + "; ".join(tried) + f". {INSTALL_HINT}"
    )


def parse_version(text: str) -> Tuple[int, ...]:
    """The first three integer groups of a version string ("2.3.2 (abc@...)" -> (2, 3, 2))."""
    return tuple(int(group) for group in re.findall(r"\d+", text)[:3])


#: Below this runtime version upstream warns that behaviour may be unstable.
RECOMMENDED_VERSION = (2, 4, 1)
