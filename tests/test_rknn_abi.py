"""ctypes layouts of both NPU runtimes on both ABIs, and the native-layout copies.

The C compiler is the judge: a C file declaring the same structs (generated from the field
lists the ctypes classes are built from) asserts, at compile time, every size and offset
ctypes computes. LP64 is checked with the host compiler; 32-bit ARM with ``-m32
-malign-double`` (4-byte pointers, 8-byte-aligned 64-bit integers: the AAPCS rules armhf
uses), freestanding so that no 32-bit C library is needed.

The NCHW <-> NHWC / NC1HWC2 copies are checked against plain loops written from the layout
definitions, including row padding, channel padding and upstream's own packing case.
"""

from __future__ import annotations

import ctypes
import pathlib
import subprocess
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ezrt.backends.rknn import abi
from ezrt.backends.rknn.layout import (
    NativeLayout,
    dense_strides,
    nc1hwc2_to_nchw,
    nchw_to_nc1hwc2,
)
from ezrt.backends.rknn.rknpu3 import abi as abi3

from .rknn_double.harness import CC

_C_TYPES = {
    ctypes.c_uint8: "uint8_t",
    ctypes.c_int8: "int8_t",
    ctypes.c_uint32: "uint32_t",
    ctypes.c_int32: "int32_t",
    ctypes.c_int: "int",
    ctypes.c_int64: "int64_t",
    ctypes.c_uint64: "uint64_t",
    ctypes.c_float: "float",
    ctypes.c_char: "char",
}


def _c_field(name: str, kind: Any, context_c: str) -> str:
    dims = ""
    while isinstance(kind, type) and issubclass(kind, ctypes.Array):
        dims = f"{dims}[{kind._length_}]"
        kind = kind._type_
    if kind == "pointer":
        return f"void *{name}{dims};"
    if kind == "context":
        return f"{context_c} {name}{dims};"
    if isinstance(kind, type) and issubclass(kind, ctypes.Structure):
        return f"{kind.__name__} {name}{dims};"
    return f"{_C_TYPES[kind]} {name}{dims};"


def _c_source(fields: Dict[str, List[Tuple[str, Any]]], table: Dict[str, Any], ctx: str) -> str:
    lines = ["#include <stdint.h>", "#include <stddef.h>"]
    for struct, members in fields.items():
        body = " ".join(_c_field(name, kind, ctx) for name, kind in members)
        lines.append(f"typedef struct {{ {body} }} {struct};")
        size, offsets = table[struct]
        lines.append(f'_Static_assert(sizeof({struct}) == {size}, "{struct} size");')
        for name, offset in offsets.items():
            lines.append(
                f'_Static_assert(offsetof({struct}, {name}) == {offset}, "{struct}.{name}");'
            )
    return "\n".join(lines) + "\n"


def _rknpu3_fields() -> Dict[str, List[Tuple[str, Any]]]:
    fields = dict(abi3._FIELDS)
    classes = abi3.declare()
    fields["TensorAttr"] = [
        (name, kind)
        for name, kind in classes["TensorAttr"]._fields_  # type: ignore[attr-defined]
    ]
    return {"InputOutputNum": fields["InputOutputNum"], "QuantInfo": fields["QuantInfo"], **fields}


def _compile(source: str, tmp_path: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    path = tmp_path / "layouts.c"
    path.write_text(source)
    return subprocess.run(
        [CC, "-fsyntax-only", "-ffreestanding", *flags, str(path)],
        capture_output=True,
        text=True,
    )


def _can_compile_32_bit(tmp_path: pathlib.Path) -> bool:
    probe = '#include <stdint.h>\n_Static_assert(sizeof(void *) == 4, "32");\n'
    return _compile(probe, tmp_path, "-m32", "-malign-double").returncode == 0


ABIS = {
    # name: (pointer, context) as ctypes sees them on that ABI, the C flags, the C context type
    "lp64": (ctypes.c_void_p, ctypes.c_uint64, (), "uint64_t"),
    "arm32": (ctypes.c_uint32, ctypes.c_uint32, ("-m32", "-malign-double"), "uint32_t"),
}


@pytest.mark.skipif(CC is None, reason="needs a C compiler to check the layouts")
@pytest.mark.parametrize("name", list(ABIS))
def test_rknpu2_ctypes_layouts_match_the_c_compiler(name, tmp_path):
    pointer, context, flags, context_c = ABIS[name]
    if flags and not _can_compile_32_bit(tmp_path):
        pytest.skip("this C compiler cannot target 32-bit (-m32)")
    classes = abi.declare(pointer, context)
    abi.check_layouts(name, classes)  # the header's sizes on that ABI
    table = abi.layout_table(classes)
    result = _compile(_c_source(abi._FIELDS, table, context_c), tmp_path, *flags)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(CC is None, reason="needs a C compiler to check the layouts")
@pytest.mark.parametrize("name", ["lp64", "ilp32"])
def test_rknpu3_ctypes_layouts_match_the_c_compiler(name, tmp_path):
    flags = ("-m32", "-malign-double") if name == "ilp32" else ()
    if flags and not _can_compile_32_bit(tmp_path):
        pytest.skip("this C compiler cannot target 32-bit (-m32)")
    classes = abi3.declare(ctypes.c_uint32 if flags else ctypes.c_void_p)
    abi3.check_layouts(name, classes)
    table = abi.layout_table(classes)
    result = _compile(_c_source(_rknpu3_fields(), table, "uint32_t"), tmp_path, *flags)
    assert result.returncode == 0, result.stderr


def test_the_32_bit_figures():
    arm = abi.layout_table(abi.declare(ctypes.c_uint32, ctypes.c_uint32))
    lp64 = abi.layout_table(abi.declare(ctypes.c_void_p, ctypes.c_uint64))
    differs = {n for n in arm if arm[n][0] != lp64[n][0]}
    assert differs == {"Input", "Output", "InitExtend"}  # rknn_context and pointers
    assert arm["Input"][1]["buf"] == 4 and arm["Output"][1]["buf"] == 8
    assert arm["TensorMem"][0] == lp64["TensorMem"][0] == 40
    assert arm["TensorMem"][1]["priv_data"] == 32  # same size, narrower pointers
    r3 = abi.layout_table(abi3.declare(ctypes.c_uint32))
    assert (r3["TensorMem"][0], r3["Tensor"][0], r3["InitExtend"][0]) == (72, 8, 132)
    assert r3["TensorAttr"][1]["core_id"] == 504  # no pointer inside: same on both ABIs


# ---------------------------------------------------------------- layouts against plain loops


def reference_pack(x: np.ndarray, c1: int, c2: int, w_pad: int = 0) -> np.ndarray:
    """NCHW -> NC1HWC2 [N, C1, H, W + w_pad, C2], element by element."""
    n, c, h, w = x.shape
    out = np.zeros((n, c1, h, w + w_pad, c2), x.dtype)
    for i in range(n):
        for ch in range(c):
            for row in range(h):
                for col in range(w):
                    out[i, ch // c2, row, col, ch % c2] = x[i, ch, row, col]
    return out


def test_upstreams_packing_case():
    # [1, 3, 2, 2] fp16 -> [1, 1, 2, 2, 4], strides [16, 16, 8, 4, 1]: exact bytes, zero padding
    x = np.arange(12, dtype=np.float16).reshape(1, 3, 2, 2)
    layout = NativeLayout(
        "NC1HWC2", (1, 1, 2, 2, 4), (16, 16, 8, 4, 1), np.dtype(np.float16), (1, 3, 2, 2), "nc1hwc2"
    )
    buffer = bytearray(b"\xff" * layout.nbytes)
    layout.write(memoryview(buffer), x)
    assert np.frombuffer(buffer, np.float16).tolist() == [
        0, 4, 8, 0, 1, 5, 9, 0, 2, 6, 10, 0, 3, 7, 11, 0,
    ]  # fmt: skip
    np.testing.assert_array_equal(layout.read(memoryview(buffer)), x)
    with pytest.raises(ValueError, match="5 channels do not fit in C1=1 x C2=4"):
        nchw_to_nc1hwc2(np.zeros((1, 5, 2, 2), np.float16), 1, 4)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 20),
    h=st.integers(1, 5),
    w=st.integers(1, 6),
    c2=st.sampled_from([4, 8, 16]),
    w_pad=st.integers(0, 3),
    dtype=st.sampled_from([np.float16, np.int8, np.float32]),
)
def test_nc1hwc2_both_directions_against_loops(n, c, h, w, c2, w_pad, dtype):
    x = (np.arange(n * c * h * w) % 97).astype(dtype).reshape(n, c, h, w)
    c1 = -(-c // c2)
    packed = reference_pack(x, c1, c2, w_pad)
    np.testing.assert_array_equal(nchw_to_nc1hwc2(x, c1, c2), packed[:, :, :, :w])
    np.testing.assert_array_equal(nc1hwc2_to_nchw(packed[:, :, :, :w], c), x)
    wp = w + w_pad
    strides = (c1 * h * wp * c2, h * wp * c2, wp * c2, c2, 1)
    layout = NativeLayout(
        "NC1HWC2", (n, c1, h, w, c2), strides, np.dtype(dtype), (n, c, h, w), "nc1hwc2"
    )
    buffer = bytearray(packed.nbytes)
    layout.write(memoryview(buffer), x)
    got = np.frombuffer(buffer, dtype).reshape(packed.shape)
    np.testing.assert_array_equal(got, packed)  # gaps stay as they were (zero here)
    read = layout.read(memoryview(buffer))
    np.testing.assert_array_equal(read, x)
    assert not np.shares_memory(read, np.frombuffer(buffer, np.uint8))  # a copy, always


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    h=st.integers(1, 5),
    w=st.integers(1, 6),
    c=st.integers(1, 5),
    w_pad=st.integers(0, 3),
    logical_nhwc=st.booleans(),
)
def test_strided_nhwc_against_loops(h, w, c, w_pad, logical_nhwc):
    nchw = np.arange(c * h * w, dtype=np.float32).reshape(1, c, h, w)
    wp = w + w_pad
    expected = np.zeros((1, h, wp, c), np.float32)
    for ch in range(c):
        for row in range(h):
            for col in range(w):
                expected[0, row, col, ch] = nchw[0, ch, row, col]
    layout = NativeLayout(
        "NHWC",
        (1, h, w, c),
        (h * wp * c, wp * c, c, 1),
        np.dtype(np.float32),
        (1, h, w, c) if logical_nhwc else (1, c, h, w),
        "nhwc",
        "NHWC" if logical_nhwc else "NCHW",
    )
    logical = nchw.transpose(0, 2, 3, 1) if logical_nhwc else nchw
    buffer = bytearray(expected.nbytes)
    layout.write(memoryview(buffer), np.ascontiguousarray(logical))
    np.testing.assert_array_equal(
        np.frombuffer(buffer, np.float32).reshape(expected.shape), expected
    )
    read = layout.read(memoryview(buffer))
    np.testing.assert_array_equal(read, logical)
    # a copy, always: even where the native layout needs no transposing (h = w = 1, c = 1)
    assert not np.shares_memory(read, np.frombuffer(buffer, np.uint8))


def test_dense_strides_and_too_small_buffers():
    assert dense_strides((2, 3, 4)) == (12, 4, 1)
    layout = NativeLayout("UNDEFINED", (2, 3), (3, 1), np.dtype(np.float32), (2, 3))
    with pytest.raises(ValueError, match="spans 24 bytes; the buffer holds 20"):
        layout.read(memoryview(bytearray(20)))
