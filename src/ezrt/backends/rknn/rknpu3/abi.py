"""ctypes binding of ``librknn3_api`` (RKNPU3), after the declarations upstream 0.11 uses.

Upstream ships a private minimal subset of the vendor's ABI (UPSTREAM_0_11.md §4.3); ezrt
declares the same subset. ``Context`` is ``uint32_t`` on 32-bit ARM and RV32, ``uint64_t``
elsewhere; pointers have the platform's width; :func:`check_layouts` refuses a platform
where a struct would not have the size that ABI gives it. The library is looked up as
upstream does (§2.4): the ``runtime_library`` option, then ``ZTU_RKNPU3_RUNTIME_LIBRARY``,
then ``librknn3_api.so``, ``librknn3_api_rkcp.so``, ``librknn3_api_native.so``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from ctypes import (
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any, Dict, List, Optional, Tuple, Type

import numpy as np

from ....errors import BackendUnavailableError, EzrtError

MAX_DIMS = 16
MAX_STRIDES = 17
MAX_NAME_LEN = 256

# query commands
QUERY_IN_OUT_NUM = 0
QUERY_INPUT_ATTR = 1
QUERY_OUTPUT_ATTR = 2
QUERY_SDK_VERSION = 5
QUERY_CUSTOM_STRING = 7
QUERY_CORE_NUMBER = 13

# status
SUCCESS = 0
WARNING_CORE_UNUSED = -100

# alloc flags and sync modes
MEM_DEFAULT, MEM_CACHEABLE, MEM_NON_CACHEABLE = 0, 1, 2
SYNC_TO_DEVICE, SYNC_FROM_DEVICE, SYNC_BIDIRECTIONAL = 1, 2, 3

#: tensor type -> (numpy dtype or None, ONNX-style type string)
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
    9: (np.dtype(np.uint64), "tensor(uint64)"),
    10: (np.dtype(np.bool_), "tensor(bool)"),
    11: (None, "tensor(int4)"),
    12: (None, "tensor(float8e4m3fn)"),
    13: (None, "tensor(bfloat16)"),
    14: (None, "tensor(float8e8m0)"),
    15: (None, "tensor(float4e2m1)"),
}

LAYOUTS = {
    0: "UNDEFINED",
    1: "NCHW",
    2: "NHWC",
    3: "NC1HWC2",
    4: "CHWN",
    5: "HWIO",
    6: "OIHW",
    7: "O1I1HWI2O2",
}
LAYOUT_NC1HWC2 = 3

#: Status texts (ours, after upstream's list).
STATUS = {
    -1: "generic failure",
    -2: "invalid argument",
    -3: "invalid model",
    -4: "invalid context",
    -5: "run task failed",
    -6: "out of memory",
    -7: "timeout",
    -8: "invalid input",
    -9: "invalid output",
    -10: "device unavailable",
    -11: "device mismatch",
    -12: "target platform mismatch",
    -13: "communication error",
    -14: "memory synchronization failed",
    -15: "invalid decryption key",
    -16: "model decryption failed",
    -17: "streaming weight load is not prepared",
    -18: "incompatible runtime/proxy/server versions",
    -100: "requested NPU core is unused",
}


class Rknpu3Error(EzrtError):
    """An RKNPU3 call failed: ``"<operation> failed: <code> (<text>)"`` (upstream's form)."""

    def __init__(self, operation: str, code: int) -> None:
        self.operation = operation
        self.code = code
        super().__init__(f"{operation} failed: {code} ({STATUS.get(code, 'unknown status')})")


def check(operation: str, code: int) -> None:
    """Raise :class:`Rknpu3Error` for a non-zero status."""
    if code != SUCCESS:
        raise Rknpu3Error(operation, code)


# ---------------------------------------------------------------------------- the ABI

_MACHINE = platform.machine().lower()
NARROW_CONTEXT = ctypes.sizeof(c_void_p) == 4 and _MACHINE.startswith(("arm", "aarch", "riscv"))
ABI = "ilp32" if NARROW_CONTEXT else ("lp64" if ctypes.sizeof(c_void_p) == 8 else "unsupported")

_PTR = "pointer"
_CTX = "context"

_FIELDS: Dict[str, List[Tuple[str, Any]]] = {
    "InputOutputNum": [("n_input", c_uint32), ("n_output", c_uint32)],
    "QuantInfo": [("scale", c_float), ("zero_point", c_int32)],
    "TensorAttr": [],  # filled below (needs QuantInfo)
    "TensorMem": [
        ("virt_addr", _PTR),
        ("phys_addr", c_uint64),
        ("fd", c_int32),
        ("buffer_id", c_uint64),
        ("offset", c_uint64),
        ("size", c_uint64),
        ("flags", c_uint64),
        ("core_id", c_int32),
        ("priv_data", _PTR),
        ("mem_type", c_int),
    ],
    "Config": [
        ("priority", c_int32),
        ("run_timeout", c_uint32),
        ("run_core_mask", c_uint32),
        ("user_mem_weight", c_uint8),
        ("user_mem_internal", c_uint8),
        ("user_sram", c_uint8),
        ("reserved", c_uint8 * 128),
    ],
    "Tensor": [("mem", _PTR), ("attr", _PTR)],
    "InitExtend": [("device_id", _PTR), ("reserved", c_uint8 * 128)],
    "SdkVersion": [("api_version", c_char * 256), ("drv_version", c_char * 256)],
    "CustomString": [("string", c_char * 1024)],
}

EXPECTED_SIZES: Dict[str, Dict[str, int]] = {
    "lp64": {
        "InputOutputNum": 8,
        "QuantInfo": 8,
        "TensorAttr": 512,
        "TensorMem": 80,
        "Config": 144,
        "Tensor": 16,
        "InitExtend": 136,
        "SdkVersion": 512,
        "CustomString": 1024,
    },
    "ilp32": {
        "InputOutputNum": 8,
        "QuantInfo": 8,
        "TensorAttr": 512,
        "TensorMem": 72,
        "Config": 144,
        "Tensor": 8,
        "InitExtend": 132,
        "SdkVersion": 512,
        "CustomString": 1024,
    },
}


class _TensorAttrBase(Structure):
    @property
    def dims(self) -> Tuple[int, ...]:
        return tuple(int(self.shape[i]) for i in range(min(int(self.n_dims), MAX_DIMS)))

    @property
    def strides(self) -> Tuple[int, ...]:
        return tuple(int(self.stride[i]) for i in range(min(int(self.n_stride), MAX_STRIDES)))

    @property
    def text_name(self) -> str:
        return bytes(self.name).decode("utf-8", "replace")


def declare(pointer: Any = c_void_p, context: Any = None) -> Dict[str, Type[Structure]]:
    """The struct classes for one ABI (as :func:`ezrt.backends.rknn.abi.declare`)."""
    del context  # no struct holds a context
    classes: Dict[str, Type[Structure]] = {}
    for name, fields in _FIELDS.items():
        if name == "TensorAttr":
            resolved = [
                ("index", c_uint32),
                ("name", c_char * MAX_NAME_LEN),
                ("n_dims", c_uint32),
                ("shape", c_uint32 * MAX_DIMS),
                ("aligned_size", c_uint64),
                ("n_stride", c_uint32),
                ("stride", c_uint64 * MAX_STRIDES),
                ("n_elems", c_uint32),
                ("dtype", c_int),
                ("layout", c_int),
                ("qnt_type", c_int),
                ("qnt_info", classes["QuantInfo"]),
                ("core_id", c_int32),
            ]
            classes[name] = type(name, (_TensorAttrBase,), {"_fields_": resolved})
            continue
        resolved = [(field, pointer if kind is _PTR else kind) for field, kind in fields]
        classes[name] = type(name, (Structure,), {"_fields_": resolved})
    return classes


Context: Any = c_uint32 if NARROW_CONTEXT else c_uint64
_native = declare()
InputOutputNum: Any = _native["InputOutputNum"]
QuantInfo: Any = _native["QuantInfo"]
TensorAttr: Any = _native["TensorAttr"]
TensorMem: Any = _native["TensorMem"]
Config: Any = _native["Config"]
Tensor: Any = _native["Tensor"]
InitExtend: Any = _native["InitExtend"]
SdkVersion: Any = _native["SdkVersion"]
CustomString: Any = _native["CustomString"]


def check_layouts(abi: str = ABI, classes: Optional[Dict[str, Type[Structure]]] = None) -> None:
    """Refuse a platform where the structs would not have that ABI's sizes."""
    where = f"{platform.machine() or 'unknown machine'}, {8 * ctypes.sizeof(c_void_p)}-bit"
    expected = EXPECTED_SIZES.get(abi)
    if expected is None:
        raise BackendUnavailableError(
            f"the RKNPU3 runtime ABI of this platform ({where}) is not one ezrt knows"
        )
    classes = classes if classes is not None else _native
    wrong = [
        f"{name} is {ctypes.sizeof(classes[name])} bytes, expected {size}"
        for name, size in expected.items()
        if ctypes.sizeof(classes[name]) != size
    ]
    if wrong:
        raise BackendUnavailableError(
            f"ezrt's ctypes layout of the RKNPU3 structs does not match the {abi} ABI on this "
            f"platform ({where}): " + "; ".join(wrong)
        )


_FUNCTIONS: Dict[str, Tuple[Any, List[Any]]] = {
    "rknn3_init": (c_int, [POINTER(Context), POINTER(InitExtend)]),
    "rknn3_load_model_from_path": (c_int, [Context, c_char_p, c_char_p]),
    "rknn3_load_model_from_data": (c_int, [Context, c_void_p, c_uint64, c_void_p, c_uint64]),
    "rknn3_model_init": (c_int, [Context, POINTER(Config)]),
    "rknn3_destroy": (c_int, [Context]),
    "rknn3_query": (c_int, [Context, c_int, c_void_p, c_uint64]),
    "rknn3_run": (c_int, [Context, POINTER(Tensor), c_uint32, POINTER(Tensor), c_uint32]),
    "rknn3_create_mem": (POINTER(TensorMem), [Context, c_uint64, c_int32, c_int]),
    "rknn3_create_mem_from_fd": (
        POINTER(TensorMem),
        [Context, c_int32, c_void_p, c_uint64, c_uint64],
    ),
    "rknn3_destroy_mem": (c_int, [Context, POINTER(TensorMem)]),
    "rknn3_mem_sync": (c_int, [Context, POINTER(TensorMem), c_int]),
}

RUNTIME_ENV = "ZTU_RKNPU3_RUNTIME_LIBRARY"
DEFAULT_NAMES = ("librknn3_api.so", "librknn3_api_rkcp.so", "librknn3_api_native.so")


class Runtime3:
    """A loaded librknn3_api with every function typed."""

    rknn3_init: Any
    rknn3_load_model_from_path: Any
    rknn3_load_model_from_data: Any
    rknn3_model_init: Any
    rknn3_destroy: Any
    rknn3_query: Any
    rknn3_run: Any
    rknn3_create_mem: Any
    rknn3_create_mem_from_fd: Any
    rknn3_destroy_mem: Any
    rknn3_mem_sync: Any

    def __init__(self, path: str, lib: ctypes.CDLL) -> None:
        self.path = path
        self.lib = lib
        for name, (restype, argtypes) in _FUNCTIONS.items():
            function = getattr(lib, name, None)
            if function is None:
                raise BackendUnavailableError(
                    f"RKNPU3 runtime '{path}' is missing symbol {name}: the library does not "
                    "export it"
                )
            function.restype = restype
            function.argtypes = argtypes
            setattr(self, name, function)


_runtimes: Dict[str, Runtime3] = {}
_runtimes_lock = threading.Lock()


def candidates(runtime_library: str = "") -> List[str]:
    """Upstream's order: the option, then the variable, then the default names."""
    if runtime_library:
        return [runtime_library]
    override = os.environ.get(RUNTIME_ENV)
    if override:
        return [override]
    return list(DEFAULT_NAMES)


def load_runtime(runtime_library: str = "") -> Runtime3:
    """The first candidate that loads; raises BackendUnavailableError naming every one tried
    (a library that loads but lacks a function is an error at once, as upstream)."""
    check_layouts()
    tried = []
    for candidate in candidates(runtime_library):
        with _runtimes_lock:
            if candidate in _runtimes:
                return _runtimes[candidate]
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as exc:
            tried.append(f"{candidate}: {exc}")
            continue
        runtime = Runtime3(candidate, lib)
        with _runtimes_lock:
            return _runtimes.setdefault(candidate, runtime)
    raise BackendUnavailableError(
        "unable to load the RKNPU3 runtime. Set provider option 'runtime_library' or "
        f"{RUNTIME_ENV}. Tried: " + "; ".join(tried)
    )
