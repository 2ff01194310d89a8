"""ctypes binding of Rockchip's NPU runtime ``librknnrt.so`` (RKNN API v2.3.2 ABI, LP64).

Struct layouts, enum values and status codes follow shared/reference/RKNN_ABI.md; every struct
size is checked at import. The library is loaded only when an RKNN session opens, never on
``import ezrt``. Functions newer than runtime 1.4.0 are resolved lazily: a missing one raises
a clear error when (and only when) it is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
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
from typing import Any, Dict, List, Optional, Tuple

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
QUERY_INPUT_DYNAMIC_RANGE = 13
QUERY_CURRENT_INPUT_ATTR = 14
QUERY_CURRENT_OUTPUT_ATTR = 15

# rknn_tensor_format
FMT_NCHW, FMT_NHWC, FMT_NC1HWC2, FMT_UNDEFINED = 0, 1, 2, 3

# rknn_core_mask
CORE_AUTO, CORE_0 = 0, 1

# rknn_init flags
FLAG_SHARE_WEIGHT_MEM = 0x20

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
    name, description = STATUS.get(code, ("RKNN_ERR_UNKNOWN", "unknown RKNN error"))
    return f"{name} ({code}): {description}."


class RknnError(EzrtError):
    """An RKNN API call failed: ``"<api> failed: <NAME> (<code>): <description>"``."""

    def __init__(self, api: str, code: int, where: str = "", hint: str = "") -> None:
        self.api = api
        self.code = code
        super().__init__(f"{api} failed{where}: {status_text(code)}" + (f" {hint}" if hint else ""))


def check(api: str, code: int, where: str = "") -> None:
    if code < 0:
        raise RknnError(api, code, where)


# ---------------------------------------------------------------------------- structs


class InputOutputNum(Structure):
    _fields_ = [("n_input", c_uint32), ("n_output", c_uint32)]


class TensorAttr(Structure):
    _fields_ = [
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
    ]

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(self.dims[i]) for i in range(self.n_dims))

    @property
    def text_name(self) -> str:
        return bytes(self.name).decode("utf-8", "replace")


class InputRange(Structure):
    _fields_ = [
        ("index", c_uint32),
        ("shape_number", c_uint32),
        ("fmt", c_int),
        ("name", c_char * MAX_NAME_LEN),
        ("dyn_range", (c_uint32 * MAX_DIMS) * MAX_DYNAMIC_SHAPES),
        ("n_dims", c_uint32),
    ]


class SdkVersion(Structure):
    _fields_ = [("api_version", c_char * 256), ("drv_version", c_char * 256)]


class CustomString(Structure):
    _fields_ = [("string", c_char * 1024)]


class TensorMem(Structure):
    _fields_ = [
        ("virt_addr", c_void_p),
        ("phys_addr", c_uint64),
        ("fd", c_int32),
        ("offset", c_int32),
        ("size", c_uint32),
        ("flags", c_uint32),
        ("priv_data", c_void_p),
    ]


class Input(Structure):
    _fields_ = [
        ("index", c_uint32),
        ("buf", c_void_p),
        ("size", c_uint32),
        ("pass_through", c_uint8),
        ("type", c_int),
        ("fmt", c_int),
    ]


class Output(Structure):
    _fields_ = [
        ("want_float", c_uint8),
        ("is_prealloc", c_uint8),
        ("index", c_uint32),
        ("buf", c_void_p),
        ("size", c_uint32),
    ]


class InitExtend(Structure):
    _fields_ = [
        ("ctx", c_uint64),
        ("real_model_offset", c_int32),
        ("real_model_size", c_uint32),
        ("model_buffer_fd", c_int32),
        ("model_buffer_flags", c_uint32),
        ("reserved", c_uint8 * 112),
    ]


class PerfRun(Structure):
    _fields_ = [("run_duration", c_int64)]


STRUCT_SIZES = {
    InputOutputNum: 8,
    TensorAttr: 376,
    InputRange: 33040,
    SdkVersion: 512,
    CustomString: 1024,
    TensorMem: 40,
    Input: 32,
    Output: 24,
    InitExtend: 136,
    PerfRun: 8,
}
for _struct, _size in STRUCT_SIZES.items():  # a wrong layout must never reach a device
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct), _size)


# ---------------------------------------------------------------------------- the library

_Context = c_uint64
_REQUIRED = {
    "rknn_init": (c_int, [POINTER(_Context), c_void_p, c_uint32, c_uint32, POINTER(InitExtend)]),
    "rknn_dup_context": (c_int, [POINTER(_Context), POINTER(_Context)]),
    "rknn_destroy": (c_int, [_Context]),
    "rknn_query": (c_int, [_Context, c_int, c_void_p, c_uint32]),
    "rknn_inputs_set": (c_int, [_Context, c_uint32, POINTER(Input)]),
    "rknn_set_core_mask": (c_int, [_Context, c_int]),
    "rknn_run": (c_int, [_Context, c_void_p]),
    "rknn_outputs_get": (c_int, [_Context, c_uint32, POINTER(Output), c_void_p]),
    "rknn_outputs_release": (c_int, [_Context, c_uint32, POINTER(Output)]),
}
#: Newer functions: (restype, argtypes, the runtime version that introduced them).
_OPTIONAL = {
    "rknn_set_input_shapes": (c_int, [_Context, c_uint32, POINTER(TensorAttr)], "1.5.2"),
    "rknn_register_custom_ops": (c_int, [_Context, c_void_p, c_uint32], "1.6.0"),
    "rknn_create_mem": (POINTER(TensorMem), [_Context, c_uint32], "1.0"),
    "rknn_destroy_mem": (c_int, [_Context, POINTER(TensorMem)], "1.3.0"),
    "rknn_mem_sync": (c_int, [_Context, POINTER(TensorMem), c_int], "1.6.0"),
}

LIBRARY_ENV = "EZRT_RKNN_LIBRARY"
USUAL_PATHS = (
    "/usr/lib/librknnrt.so",
    "/usr/lib64/librknnrt.so",
    "/usr/local/lib/librknnrt.so",
    "/usr/lib/aarch64-linux-gnu/librknnrt.so",
    "/vendor/lib64/librknnrt.so",
    "/vendor/lib/librknnrt.so",
)
INSTALL_HINT = (
    "Install Rockchip's NPU runtime (librknnrt.so, from airockchip/rknn-toolkit2 "
    "rknpu2/runtime/Linux/librknn_api/aarch64/) into /usr/lib and run ldconfig, or point "
    f"{LIBRARY_ENV} at the file."
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
        try:
            self.lib = ctypes.CDLL(path)  # ctypes releases the GIL around every call
        except OSError as exc:
            raise BackendUnavailableError(f"could not load {path}: {exc}. {INSTALL_HINT}") from exc
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

    def has(self, name: str) -> bool:
        return hasattr(self.lib, name)

    def optional(self, name: str) -> Any:
        """A newer function, or an error naming the runtime version that has it."""
        function = self._optional.get(name)
        if function is None:
            restype, argtypes, since = _OPTIONAL[name]
            function = getattr(self.lib, name, None)
            if function is None:
                raise BackendUnavailableError(
                    f"{name} is missing from {self.path} (runtime {self.file_version() or '?'}); "
                    f"it needs librknnrt >= {since}"
                )
            function.restype = restype
            function.argtypes = argtypes
            self._optional[name] = function
        return function

    def file_version(self) -> Optional[str]:
        return library_version(self.path)


def library_version(path: str) -> Optional[str]:
    """The version a library file announces ("librknnrt version: X"), without a model."""
    try:
        with open(path, "rb") as handle:
            match = _VERSION_MARKER.search(handle.read())
    except OSError:
        return None
    return match.group(1).decode("ascii", "replace").strip() if match else None


def candidate_paths() -> List[str]:
    """Where to look, in order: the environment variable, the loader, the usual places."""
    paths: List[str] = []
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return [override]
    found = ctypes.util.find_library("rknnrt")
    if found:
        paths.append(found)
    paths.extend(USUAL_PATHS)
    return paths


_runtimes: Dict[str, Runtime] = {}
_runtimes_lock = threading.Lock()  # guards _runtimes: one Runtime per library path


def load_runtime(path: Optional[str] = None) -> Runtime:
    """The librknnrt to use (loaded once per path). Raises BackendUnavailableError."""
    candidates = [path] if path else candidate_paths()
    tried = []
    for candidate in candidates:
        with _runtimes_lock:
            if candidate in _runtimes:
                return _runtimes[candidate]
        is_name = os.sep not in candidate
        if not is_name and not os.path.exists(candidate):
            tried.append(f"{candidate} (absent)")
            continue
        try:
            runtime = Runtime(candidate)
        except BackendUnavailableError as exc:
            tried.append(f"{candidate} ({exc})")
            continue
        with _runtimes_lock:
            return _runtimes.setdefault(candidate, runtime)
    raise BackendUnavailableError(
        "the RKNN runtime library librknnrt.so was not found (tried: "
        + "; ".join(tried or candidates)
        + f"). {INSTALL_HINT}"
    )


def parse_version(text: str) -> Tuple[int, ...]:
    """The first three integer groups of a version string ("2.3.2 (abc@...)" -> (2, 3, 2))."""
    return tuple(int(group) for group in re.findall(r"\d+", text)[:3])


#: Below this runtime version upstream warns that behaviour may be unstable.
RECOMMENDED_VERSION = (2, 4, 1)
