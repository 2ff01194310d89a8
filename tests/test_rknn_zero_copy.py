"""Zero copy on RKNPU2 (UPSTREAM_0_11.md §3) against the librknnrt double.

The double keeps the CPU's and the NPU's views of every buffer apart (a missing or
misdirected ``rknn_mem_sync`` gives wrong numbers) and logs every broken rule: memory
destroyed twice, after its context, with another context or before its imports; used after
destroy; sizes or attrs that do not match the native tensor; copy calls on a zero-copy
context; two threads on one context. Every test ends with no violation and nothing alive.

Ported from upstream 0.11's tests, in our words: zero-copy Add over ranks and dtypes equals
the copy path; ``update_inplace`` then rerun; ``zero_copy_layout`` nhwc / native and the
native-layout mismatch; shape / type mismatch messages; a weight-sharing slave with IOBinding.
"""

from __future__ import annotations

import gc
import mmap
import os
import threading
import weakref

import numpy as np
import pytest

import ezrt
from ezrt.backends.rknn import abi
from ezrt.backends.rknn.memory import ContextSlot
from ezrt.backends.rknn.zerocopy import hold_dmabuf

from .conftest import WAIT, Collector
from .rknn_double.harness import (
    F16,
    F32,
    I8,
    I32,
    NHWC,
    U8,
    UNDEF,
    ContendedLock,
    Double,
    doubles,
    fake_model,
    memfd_holds,
    needs_cc,
    npu,
)

__all__ = ["doubles", "npu"]  # fixtures used here

pytestmark = needs_cc

NUMPY = {F32: np.float32, F16: np.float16, I8: np.int8, U8: np.uint8, I32: np.int32}


def add_model(dtype: int, dims: tuple, *extra: str) -> bytes:
    """a + b; 4-D tensors are NHWC attrs [N, H, W, C] (the caller feeds NCHW)."""
    fmt = NHWC if len(dims) == 4 else UNDEF
    shape = f"{len(dims)} " + " ".join(map(str, dims))
    return fake_model(
        f"input a {dtype} {fmt} {shape}",
        f"input b {dtype} {fmt} {shape}",
        f"output y {dtype} 0 0 1.0 1.0 0.0 {shape}",
        "mix 0 1 1.0",
        *extra,
    )


def feeds(dtype: int, dims: tuple, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (dims[0], dims[3], dims[1], dims[2]) if len(dims) == 4 else dims
    low, high = (0, 100) if dtype == U8 else (-50, 50)
    a = rng.integers(low, high, size=shape).astype(NUMPY[dtype])
    b = rng.integers(low, high, size=shape).astype(NUMPY[dtype])
    return a, b


def expected_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    total = a.astype(np.float64) + b.astype(np.float64)
    return total.transpose(0, 2, 3, 1) if total.ndim == 4 else total  # element order of attrs


def session(model: bytes, **options) -> ezrt.InferenceSession:
    return ezrt.InferenceSession(model, provider_options=options)


def bound_run(s: ezrt.InferenceSession, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    binding = s.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_ortvalue_input(
        "b", ezrt.OrtValue.ortvalue_from_numpy(b, "rknpu2", session=s, name="b", io_kind="input")
    )
    s.run_with_iobinding(binding)
    (y,) = binding.copy_outputs_to_cpu()
    return y


# ---------------------------------------------------------------- zero copy equals the copy path

RANKS = [(64,), (2, 33), (2, 3, 17), (1, 5, 7, 3), (1, 6, 5, 8), (1, 4, 6, 20)]


@pytest.mark.parametrize("dims", RANKS, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("dtype", [F32, F16, I8, U8, I32], ids=["f32", "f16", "i8", "u8", "i32"])
@pytest.mark.parametrize("zero_copy_layout", ["nhwc", "native"])
def test_zero_copy_add_equals_the_copy_path(npu, dtype, dims, zero_copy_layout):
    a, b = feeds(dtype, dims)
    with session(
        add_model(dtype, dims, "w_align 8"),
        output_dtype="native",
        zero_copy_layout=zero_copy_layout,
    ) as s:
        (copied,) = s.run(None, {"a": a, "b": b})
        zero_copied = bound_run(s, a, b)
    assert zero_copied.dtype == copied.dtype == NUMPY[dtype]
    np.testing.assert_array_equal(zero_copied, copied)
    np.testing.assert_allclose(zero_copied.astype(np.float64), expected_sum(a, b), rtol=1e-3)


def test_update_inplace_then_rerun(npu):
    dims = (1, 4, 6, 8)
    with session(add_model(F16, dims, "w_align 8")) as s:
        a, b = feeds(F16, dims)
        va = ezrt.OrtValue.ortvalue_from_numpy(a, "rknpu2", session=s, name="a", io_kind="input")
        vb = ezrt.OrtValue.ortvalue_from_numpy(b, "rknpu2", session=s, name="b", io_kind="input")
        y = ezrt.OrtValue.ortvalue_from_shape_and_type(
            [1, 4, 6, 8], np.float16, "rknpu2", session=s, name="y", io_kind="output"
        )
        binding = s.io_binding()
        binding.bind_ortvalue_input("a", va)
        binding.bind_ortvalue_input("b", vb)
        binding.bind_ortvalue_output("y", y)
        s.run_with_iobinding(binding)
        np.testing.assert_allclose(y.numpy(), expected_sum(a, b), rtol=1e-3)
        a2 = (a * 2).astype(np.float16)
        va.update_inplace(a2)
        s.run_with_iobinding(binding)
        np.testing.assert_allclose(y.numpy(), expected_sum(a2, b), rtol=1e-3)
        np.testing.assert_array_equal(va.numpy(), a2)
        with pytest.raises(
            ezrt.InvalidArgumentError, match=r"update_inplace source shape mismatch"
        ):
            va.update_inplace(a2[:, :2])
        with pytest.raises(
            ezrt.InvalidTypeError,
            match="update_inplace source element type mismatch: expected float16, got float32",
        ):
            va.update_inplace(a2.astype(np.float32))


def test_writing_through_data_ptr_reaches_the_npu(npu):
    dims = (1, 12)
    with session(add_model(F32, dims)) as s:
        binding = s.io_binding()
        a = ezrt.OrtValue.ortvalue_from_shape_and_type(
            [1, 12], np.float32, "rknpu2", session=s, name="a", io_kind="input"
        )
        binding.bind_ortvalue_input("a", a)
        binding.bind_cpu_input("b", np.zeros((1, 12), np.float32))
        view = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * 12).from_address(a.data_ptr()))
        view[:] = np.arange(12)  # no sync: the run flushes bound inputs itself
        s.run_with_iobinding(binding)
        assert binding.copy_outputs_to_cpu()[0].tolist() == [list(map(float, range(12)))]


# ---------------------------------------------------------------- layouts


def test_zero_copy_layout_modes_and_native_args(npu):
    dims = (1, 4, 6, 20)  # 20 channels: NC1HWC2 natively
    model = add_model(F16, dims, "w_align 8")
    with session(model) as nhwc, session(model, zero_copy_layout="native") as native:
        (na, _) = nhwc.get_native_inputs()
        assert (na.layout, na.shape, na.strides) == ("NHWC", [1, 4, 6, 20], [640, 160, 20, 1])
        (ny,) = nhwc.get_native_outputs()
        assert ny.layout == "NHWC" and ny.type == "tensor(float16)"
        (qa, _) = native.get_native_inputs()
        assert (qa.layout, qa.shape) == ("NC1HWC2", [1, 3, 4, 6, 8])
        assert qa.strides == [768, 256, 64, 8, 1]
        a, b = feeds(F16, dims)
        vn = ezrt.OrtValue.ortvalue_from_numpy(
            a, "rknpu2", session=native, name="a", io_kind="input"
        )
        info = vn.memory_info()
        assert (info["fmt"], info["layout"], info["pass_through"]) == (2, "NC1HWC2", True)
        vh = ezrt.OrtValue.ortvalue_from_numpy(a, "rknpu2", session=nhwc, name="a", io_kind="input")
        assert (vh.memory_info()["fmt"], vh.memory_info()["pass_through"]) == (1, False)
        out = native.io_binding()
        out.bind_output("y", "rknpu2")
        assert out.get_outputs()[0].memory_info()["fmt"] == 2  # NC1HWC2 output
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match=r"OrtValue for input 'a' native zero-copy layout mismatch: fmt expected NHWC, "
            r"got NC1HWC2",
        ):
            nhwc.io_binding().bind_ortvalue_input("a", vn)
        np.testing.assert_allclose(bound_run(native, a, b), expected_sum(a, b), rtol=1e-3)
        np.testing.assert_array_equal(vn.numpy(), a)  # NC1HWC2 read back right
    with pytest.raises(ezrt.InvalidArgumentError, match="Unknown zero_copy_layout"):
        session(model, zero_copy_layout="nc1hwc2")


def test_layout_nhwc_session_gives_nhwc_values(npu):
    dims = (1, 4, 6, 3)
    with session(add_model(F32, dims, "w_align 8"), layout="nhwc") as s:
        a = np.arange(72, dtype=np.float32).reshape(1, 4, 6, 3)  # NHWC, as get_inputs says
        assert s.get_inputs()[0].shape == [1, 4, 6, 3]
        value = ezrt.OrtValue.ortvalue_from_numpy(a, "rknpu2", session=s, name="a", io_kind="input")
        assert value.shape() == [1, 4, 6, 3] and value.memory_info()["layout"] == "NHWC"
        np.testing.assert_array_equal(value.numpy(), a)
        binding = s.io_binding()
        binding.bind_ortvalue_input("a", value)
        binding.bind_cpu_input("b", a)
        s.run_with_iobinding(binding)
        np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[0], 2 * a)


def test_memory_info_has_upstream_keys(npu):
    with session(add_model(F32, (1, 8))) as s:
        value = ezrt.OrtValue.ortvalue_from_shape_and_type(
            [1, 8], np.float32, "rknpu2", session=s, name="a", io_kind="input"
        )
        info = value.memory_info()
        assert set(info) == {
            "device_type", "device_id", "size", "fd", "offset", "virt_addr", "import_count",
            "dmabuf_backed", "attr_size", "size_with_stride", "w_stride", "h_stride", "fmt",
            "pass_through", "aligned_size", "core_id", "layout", "strides",
        }  # fmt: skip
        assert (info["device_type"], info["layout"], info["strides"]) == (
            "rknpu2",
            "UNDEFINED",
            [8, 1],
        )
        assert info["size"] == 32 and info["dmabuf_backed"] and info["import_count"] == 1
        assert value.device_name() == "rknpu2" and value.element_type() == "tensor(float)"


# ---------------------------------------------------------------- errors with upstream's phrases


def test_factory_errors(npu):
    with session(add_model(F32, (1, 8))) as s:
        x = np.zeros((1, 8), np.float32)
        values, shaped = (
            ezrt.OrtValue.ortvalue_from_numpy,
            ezrt.OrtValue.ortvalue_from_shape_and_type,
        )
        dmabuf = ezrt.OrtValue.ortvalue_from_dmabuf
        a = {"session": s, "name": "a", "io_kind": "input"}
        y = {"session": s, "name": "y", "io_kind": "output"}
        f32 = np.float32
        cases = [
            (lambda: values(x, "rknpu2"), "session, name, and io_kind are required for RKNN"),
            (lambda: values(x, "rknpu3", **a), "device_type must be 'cpu' or 'rknpu2' for this"),
            (lambda: values(x, "rknpu2", 1, **a), "RKNN supports device_id 0 only"),
            (lambda: values(x, "rknpu2", **{**a, "io_kind": "in"}), "io_kind must be 'input' or"),
            (lambda: values(x, "rknpu2", **{**a, "name": "q"}), "Unknown input name: q"),
            (lambda: values(x, "gpu", **a), "device_type must be 'cpu', 'rknpu2', or 'rknpu3'"),
            (
                lambda: shaped([1, 8], f32, "rknpu3", **a),
                "OrtValue device_type does not match session provider; expected 'rknpu2'",
            ),
            (
                lambda: shaped([1, 8], f32, "rknpu2"),
                "standalone RKNPU2 OrtValue requires session, name, and io_kind",
            ),
            (
                lambda: shaped([1, 9], f32, "rknpu2", **a),
                r"OrtValue for input 'a' shape mismatch: expected \[1, 8\], got \[1, 9\]",
            ),
            (
                lambda: shaped([1, 8], np.int8, "rknpu2", **y),
                "OrtValue for output 'y' element type mismatch: expected float32, got int8",
            ),
            (lambda: shaped([1, -8], f32, "rknpu2", **a), "shape dims must be >= 0"),
            (lambda: shaped([1, 8], f32, "rknpu2", **a, mem_flags="fast"), "invalid mem_flags"),
            (
                lambda: dmabuf(3, [1, 8], f32, size=32),
                "session, name, and io_kind are required for dma-buf OrtValue",
            ),
            (
                lambda: dmabuf(3, [1, 8], f32, size=2**32, **a),
                "dma-buf size is too large for RKNPU2",
            ),
            (
                lambda: dmabuf(3, [1, 8], f32, size=16, **a),
                "invalid dma-buf: dma-buf of 16 bytes is too small for input 'a'",
            ),
            (
                lambda: dmabuf(3, [1, 7], f32, size=32, **a),
                "OrtValue from dmabuf for input 'a' shape mismatch",
            ),
        ]
        for call, message in cases:
            with pytest.raises(ezrt.EzrtError, match=message):
                call()


def test_binding_errors(npu):
    with session(add_model(F32, (1, 8))) as s:
        x = np.zeros((1, 8), np.float32)
        binding = s.io_binding()
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match=r"bind_input with raw buffer_ptr is not supported; use an OrtValue or "
            r"OrtValue\.ortvalue_from_dmabuf",
        ):
            binding.bind_input("a", "cpu", 0, np.float32, [1, 8], 1234)
        with pytest.raises(
            ezrt.InvalidArgumentError, match="bind_output with raw buffer_ptr is not implemented"
        ):
            binding.bind_output("y", "rknpu2", buffer_ptr=1234)
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match="device_type must be 'cpu' or 'rknpu2' for this session",
        ):
            binding.bind_output("y", "cuda")
        with pytest.raises(
            ezrt.InvalidArgumentError, match="OrtValue for output 'y' shape mismatch"
        ):
            binding.bind_output("y", "rknpu2", shape=[2, 8])
        with pytest.raises(
            ezrt.InvalidTypeError, match="OrtValue for output 'y' element type mismatch"
        ):
            binding.bind_output("y", "rknpu2", element_type=np.float16)
        with pytest.raises(
            ezrt.InvalidArgumentError, match="preallocated CPU output binding is not supported"
        ):
            binding.bind_ortvalue_output("y", ezrt.OrtValue.ortvalue_from_numpy(x))
        with pytest.raises(ezrt.InvalidTypeError, match="bind_cpu_input needs a numpy array"):
            binding.bind_cpu_input("a", [0.0] * 8)
        with pytest.raises(
            ezrt.InvalidTypeError, match="OrtValue for input 'a' element type mismatch"
        ):
            binding.bind_cpu_input("a", x.astype(np.float64))  # exact type, no cast
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match=r"All model inputs must be bound before run_with_iobinding \(not bound: a, b\)",
        ):
            s.run_with_iobinding(binding)
        with (
            session(add_model(F32, (1, 8))) as other,
            pytest.raises(
                ezrt.InvalidArgumentError, match="IoBinding belongs to a different session"
            ),
        ):
            other.run_with_iobinding(binding)


def test_cpu_ortvalues_are_onnxruntimes_and_bind_by_copy(npu):
    import onnxruntime

    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    plain = ezrt.OrtValue.ortvalue_from_numpy(x)
    assert type(plain) is onnxruntime.OrtValue and isinstance(plain, ezrt.OrtValue)
    assert issubclass(onnxruntime.OrtValue, ezrt.OrtValue)
    typed = ezrt.OrtValue.ortvalue_from_shape_and_type([2], np.int64)
    assert type(typed) is onnxruntime.OrtValue and typed.shape() == [2]
    # other class attributes are onnxruntime's own
    assert ezrt.OrtValue.ortvalue_from_numpy_with_onnx_type is not None
    assert not isinstance(x, ezrt.OrtValue)
    with session(add_model(F32, (1, 8))) as s:
        binding = s.io_binding()
        assert isinstance(binding, ezrt.SessionIOBinding) and isinstance(binding, ezrt.IOBinding)
        assert type(ezrt.IOBinding(s)) is type(binding)
        binding.bind_ortvalue_input("a", plain)  # CPU values are copied into NPU memory
        cpu = ezrt.OrtValue.ortvalue_from_numpy(x, "cpu", session=s, name="b", io_kind="input")
        assert isinstance(cpu, ezrt.OrtValue) and cpu.device_name() == "cpu"
        binding.bind_ortvalue_input("b", cpu)
        s.run_with_iobinding(binding)
        (y,) = binding.get_outputs()
        assert isinstance(y, ezrt.OrtValue) and y.device_name() == "rknpu2"
        assert y.numpy().tolist() == (2 * x).tolist()


# ---------------------------------------------------------------- outputs: bound, auto-bound, cpu


def test_unbound_outputs_are_returned_by_get_outputs(npu):
    model = fake_model(
        f"input a {F32} {UNDEF} 2 1 4",
        f"output first {F32} 0 0 1.0 1.0 1.0 2 1 4",
        f"output second {F32} 0 0 1.0 3.0 0.0 2 1 4",
    )
    a = np.arange(4, dtype=np.float32).reshape(1, 4)
    with session(model) as s:
        binding = s.io_binding()
        binding.bind_cpu_input("a", a)
        s.run_with_iobinding(binding)  # nothing bound: both auto-bound and returned
        first, second = binding.copy_outputs_to_cpu()  # upstream returns [] here (N2)
        assert first.tolist() == (a + 1).tolist() and second.tolist() == (3 * a).tolist()
        again = s.io_binding()
        again.bind_cpu_input("a", a)
        again.bind_output("second", "cpu")  # explicit first, then the auto-bound one
        s.run_with_iobinding(again)
        values = again.get_outputs()
        assert [v.device_name() for v in values] == ["cpu", "rknpu2"]
        assert values[0].numpy().tolist() == (3 * a).tolist()
        again.clear_binding_outputs()
        assert again.get_outputs() == []


# ---------------------------------------------------------------- dma-buf


def _memfd(size: int) -> int:
    fd = os.memfd_create("camera-frame")
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize("own_mapping", [False, True])
def test_dmabuf_inputs_in_the_native_layout(npu, own_mapping):
    dims = (1, 4, 6, 3)  # NHWC native, rows padded to 8 pixels
    with session(add_model(F32, dims, "w_align 8")) as s:
        native = s.get_native_inputs()[0]
        assert native.strides == [96, 24, 3, 1]
        size = native.strides[0] * 4
        a = np.arange(72, dtype=np.float32).reshape(1, 3, 4, 6)  # NCHW, what the model takes
        fd = _memfd(size + 64)
        mapping = mmap.mmap(fd, size + 64)
        frame = np.ndarray((1, 4, 6, 3), np.float32, mapping, offset=64, strides=(384, 96, 12, 4))
        frame[...] = a.transpose(0, 2, 3, 1)  # the "camera" writes NHWC with padded rows
        virt = None
        if own_mapping:
            virt = np.ctypeslib.ctypes.addressof(np.ctypeslib.ctypes.c_char.from_buffer(mapping))
        value = ezrt.OrtValue.ortvalue_from_dmabuf(
            fd, [1, 3, 4, 6], np.float32, size=size, offset=64, virt_addr=virt,
            session=s, name="a", io_kind="input",
        )  # fmt: skip
        os.close(fd)  # the value keeps its own descriptor
        np.testing.assert_array_equal(value.numpy(), a)
        assert value.memory_info()["offset"] == 64 and value.memory_info()["dmabuf_backed"]
        binding = s.io_binding()
        binding.bind_ortvalue_input("a", value)
        binding.bind_cpu_input("b", np.ones_like(a))
        s.run_with_iobinding(binding)
        got = binding.copy_outputs_to_cpu()[0]
        np.testing.assert_array_equal(got, expected_sum(a, np.ones_like(a)))
        del value, binding, frame
        gc.collect()
        if virt is None:
            mapping.close()
    if virt is not None:
        mapping.close()


@pytest.mark.parametrize("own_mapping", [False, True])
def test_a_failed_dmabuf_import_lets_go_of_its_fd_and_mapping(npu, own_mapping):
    """ezrt dups (and maps) the caller's fd to import it; when the import cannot go ahead
    (here: no NPU memory left to make zero copy's home context), neither is kept."""
    name = f"failed-import-{own_mapping}"
    with session(add_model(F32, (1, 8), "max_contexts 1")) as s:
        fd = os.memfd_create(name)
        os.ftruncate(fd, 64)
        mapping = mmap.mmap(fd, 64) if own_mapping else None
        virt = None
        if mapping is not None:
            virt = np.ctypeslib.ctypes.addressof(np.ctypeslib.ctypes.c_char.from_buffer(mapping))
        mine = memfd_holds(name)  # the caller's own (Python's mmap keeps a dup of its fd)
        assert mine == ((2, 1) if own_mapping else (1, 0))
        with pytest.raises(abi.RknnError, match=r"rknn_dup_context failed: RKNN_ERR_MALLOC_FAIL"):
            ezrt.OrtValue.ortvalue_from_dmabuf(
                fd, [1, 8], np.float32, size=32, virt_addr=virt, session=s, name="a",
                io_kind="input",
            )  # fmt: skip
        assert memfd_holds(name) == mine  # ezrt's dup and mapping are gone
        os.close(fd)
        del virt
        if mapping is not None:
            mapping.close()
    assert memfd_holds(name) == (0, 0)


@pytest.mark.parametrize("virt_addr", [None, 0x10000])
def test_a_dmabuf_fd_that_is_not_open_is_an_ezrt_error(npu, virt_addr):
    """An ezrt error (a RuntimeError) whether or not ezrt maps the buffer itself."""
    s = session(add_model(F32, (1, 8)))
    with s, pytest.raises(ezrt.EzrtError, match=r"dup dma-buf fd failed: .*Bad file descriptor"):
        ezrt.OrtValue.ortvalue_from_dmabuf(
            1_000_000, [1, 8], np.float32, size=32, virt_addr=virt_addr, session=s, name="a",
            io_kind="input",
        )  # fmt: skip


def test_a_dmabuf_hold_closes_its_fd_even_when_unmapping_fails():
    name = "hold-unmap-fails"
    fd = os.memfd_create(name)
    os.ftruncate(fd, 64)
    held = hold_dmabuf(fd, 32, 16, None)
    assert memfd_holds(name) == (3, 1)  # the caller's, ezrt's dup, and the mmap object's own
    export = memoryview(held.mapping)  # a live export: the mapping cannot be closed now
    with pytest.raises(BufferError):
        held.release()
    assert memfd_holds(name) == (2, 1)  # ezrt's dup is closed all the same
    export.release()
    held.mapping.close()
    os.close(fd)
    assert memfd_holds(name) == (0, 0)


# ---------------------------------------------------------------- lifetime


def test_memory_is_freed_with_its_value_and_at_close(npu):
    with session(add_model(F32, (1, 8)), schedule=[0, 1]) as s:
        a = np.ones((1, 8), np.float32)
        for _ in range(20):
            bound_run(s, a, a)  # a new binding and values each time: freed as they go
        gc.collect()
        assert npu["mems_live"] <= 3  # at most the last few, whose imports wait for nothing
        keep = ezrt.OrtValue.ortvalue_from_numpy(a, "rknpu2", session=s, name="a", io_kind="input")
        creates = npu["mem_creates"]
    assert npu["mems_live"] == 0 and npu["mem_creates"] == creates  # close freed `keep` once
    with pytest.raises(ezrt.SessionClosedError, match="session that allocated it was closed"):
        keep.numpy()
    assert not keep.has_value()
    del keep
    gc.collect()
    assert npu["mem_destroys"] == npu["mem_creates"] + npu["mem_imports"]


@pytest.mark.parametrize("kind", ["allocate", "import"])
@pytest.mark.parametrize("when", ["inside the runtime call", "before the runtime call"])
def test_memory_made_while_the_session_closes_is_refused_and_freed(npu, monkeypatch, kind, when):
    """close() on another thread while a value is being made: either close frees the memory
    or the factory refuses it (SessionClosedError) and frees it itself; never is memory left
    on a context that close destroyed (the double logs that as a violation)."""
    name = f"closing-{kind}-{when[:6]}"
    s = session(add_model(F32, (1, 8)))
    backend = s._backend
    home = backend.contexts.home()
    closer = threading.Thread(target=s.close)
    if when == "inside the runtime call":
        # close collects the memories to free, then waits for the home context that the
        # allocation holds; only then does the runtime call return
        probe = ContendedLock(home.lock)
        monkeypatch.setattr(home, "lock", probe)
        api = "rknn_create_mem" if kind == "allocate" else "rknn_create_mem_from_fd"
        real, optional = backend.rt.optional(api), backend.rt.optional

        def racing(*args):
            handle = real(*args)
            closer.start()
            assert probe.contended.wait(WAIT), "close never reached the home context"
            return handle

        monkeypatch.setattr(backend.rt, "optional", lambda f: racing if f == api else optional(f))
    else:  # the whole close runs after the allocation found the session open

        def home_then_close():
            closer.start()
            closer.join(WAIT)
            return home

        monkeypatch.setattr(backend.contexts, "home", home_then_close)
    fd = os.memfd_create(name)
    os.ftruncate(fd, 32)
    with pytest.raises(ezrt.SessionClosedError, match="the session is closed"):
        if kind == "allocate":
            ezrt.OrtValue.ortvalue_from_shape_and_type(
                [1, 8], np.float32, "rknpu2", session=s, name="a", io_kind="input"
            )
        else:
            ezrt.OrtValue.ortvalue_from_dmabuf(
                fd, [1, 8], np.float32, size=32, session=s, name="a", io_kind="input"
            )
    closer.join(WAIT)
    assert not closer.is_alive()
    os.close(fd)
    gc.collect()
    npu.assert_clean()
    assert memfd_holds(name) == (0, 0)


def test_another_sessions_buffer_imported_while_the_session_closes_is_dropped(npu, monkeypatch):
    """At interpreter exit the engine may close a backend while a bound run is still in
    flight. A run that imports another session's buffer just then drops that import itself
    (SessionClosedError) if close has already collected what to drop: the context is never
    destroyed with the import on it, nor the import destroyed after the context."""
    model = add_model(F32, (1, 8))
    owner, user = session(model), session(model)
    a, b = feeds(F32, (1, 8))
    x = ezrt.OrtValue.ortvalue_from_numpy(a, "rknpu2", session=owner, name="a", io_kind="input")
    binding = user.io_binding()
    binding.bind_ortvalue_input("a", x)
    binding.bind_cpu_input("b", b)
    backend = user._backend
    closer = threading.Thread(target=backend.close)  # as the engine does when it gives up
    real, optional = backend.rt.optional("rknn_create_mem_from_fd"), backend.rt.optional
    first = []

    def racing(ctx, *args):
        handle = real(ctx, *args)
        if not first:  # x, imported into the worker's bound context (which the run holds)
            first.append(ctx)
            (slot,) = backend.contexts._bound.values()
            probe = ContendedLock(slot.lock)
            slot.lock = probe
            closer.start()
            assert probe.contended.wait(WAIT), "close never reached the bound context"
        return handle

    monkeypatch.setattr(
        backend.rt, "optional", lambda f: racing if f == "rknn_create_mem_from_fd" else optional(f)
    )
    with pytest.raises(ezrt.SessionClosedError):
        user.run_with_iobinding(binding)
    closer.join(WAIT)
    assert not closer.is_alive() and first
    user.close()
    assert npu.violations() == ""
    assert x.memory_info()["import_count"] == 1  # only its own handle is left
    np.testing.assert_array_equal(x.numpy(), a)
    owner.close()
    del x, binding
    gc.collect()
    assert npu["mems_live"] == 0 and npu["live"] == 0


def test_a_failing_free_leaves_the_context_usable_and_the_other_frees_done(caplog):
    """A free queued on a busy context runs when its holder lets go; one that raises is
    logged, the frees after it still run, and the holder's lock is let go all the same."""
    slot = ContextSlot(0x1234, None, "a context")
    done = []

    def failing() -> None:
        raise OSError("injected")

    held, leave = threading.Event(), threading.Event()
    outcome = []

    def holder() -> None:
        try:
            with slot:
                held.set()
                assert leave.wait(WAIT)
            outcome.append("left")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(WAIT)
    slot.call_when_free(failing)  # queued: the holder is busy
    slot.call_when_free(lambda: done.append("second"))
    assert done == []
    leave.set()
    thread.join(WAIT)
    assert outcome == ["left"] and done == ["second"]
    assert slot.lock.acquire(blocking=False), "the slot stayed locked"
    slot.lock.release()
    assert "freeing NPU memory failed" in caplog.text and "injected" in caplog.text


def test_close_frees_everything_even_when_one_free_fails(npu, monkeypatch, caplog):
    """A destroy that raises (after the runtime call) is logged; close still frees the
    session's other memory and destroys every context."""
    from ezrt.backends.rknn import bound

    real = bound._Ops.destroy_mem
    calls = []

    def destroy_mem(self, ctx, handle):
        real(self, ctx, handle)
        calls.append(handle)
        if len(calls) == 1:
            raise RuntimeError("injected after the destroy")

    monkeypatch.setattr(bound._Ops, "destroy_mem", destroy_mem)
    s = session(add_model(F32, (1, 8)))
    values = [
        ezrt.OrtValue.ortvalue_from_shape_and_type(
            [1, 8], np.float32, "rknpu2", session=s, name=name, io_kind="input"
        )
        for name in ("a", "b", "a")
    ]
    s.close()
    assert len(calls) == 3 and not any(v.has_value() for v in values)
    assert npu["mems_live"] == 0 and npu["live"] == 0
    assert "freeing NPU memory failed" in caplog.text


class _CollectingHandles(dict):
    """A memory's handle table that runs the garbage collector whenever it is read: the
    collector (and so a value's finaliser) runs inside the memory's own critical section."""

    def items(self):
        gc.collect()
        return super().items()


class _Cycle:
    """Keeps a value only through a reference cycle: the collector, not refcounting, ends it."""

    def __init__(self, value) -> None:
        self.me = self
        self.value = value


@pytest.mark.parametrize("whose", ["its own", "another session's"])
def test_a_value_collected_while_close_frees_its_memory_does_not_deadlock(npu, whose):
    """close frees (or, for another session's buffer, drops its imports of) memory whose
    value is garbage in a reference cycle; the collector may run inside that critical
    section and finalise the value, which frees the same memory again on the same thread."""
    model = add_model(F32, (1, 8))
    owner = session(model)
    user = session(model) if whose == "another session's" else owner
    cycle = _Cycle(
        ezrt.OrtValue.ortvalue_from_shape_and_type(
            [1, 8], np.float32, "rknpu2", session=owner, name="a", io_kind="input"
        )
    )
    memory = cycle.value.memory
    if user is not owner:  # a bound run of `user` imports the buffer into its context
        binding = user.io_binding()
        binding.bind_ortvalue_input("a", cycle.value)
        binding.bind_cpu_input("b", np.ones((1, 8), np.float32))
        user.run_with_iobinding(binding)
        del binding
    gc.collect()
    gc.disable()  # from here the cycle goes only when the handle table says so
    try:
        del cycle
        memory.handles = _CollectingHandles(memory.handles)
        closer = threading.Thread(target=user.close, daemon=True)
        closer.start()
        closer.join(WAIT)
        assert not closer.is_alive(), "close deadlocked"
    finally:
        gc.enable()
    assert npu.violations() == ""
    assert memory.dead  # the finaliser freed it (its session is open, or close did)
    owner.close()
    npu.assert_clean()


def test_a_binding_keeps_its_session_alive_and_refuses_after_close(npu):
    s = session(add_model(F32, (1, 8)))
    binding = s.io_binding()
    session_ref = weakref.ref(s)
    del s
    gc.collect()
    assert session_ref() is not None  # no dangling session behind the binding (upstream N5)
    binding.bind_output("y", "rknpu2")
    session_ref().close()
    with pytest.raises(ezrt.SessionClosedError, match="IOBinding rejected: its session is closed"):
        binding.bind_output("y", "rknpu2")
    with pytest.raises(ezrt.SessionClosedError):
        session_ref().run_with_iobinding(binding)


def test_a_failed_bound_run_frees_nothing_twice(npu):
    model = add_model(F32, (1, 4), "fail_run_value 7")
    with session(model) as s:
        binding = s.io_binding()
        binding.bind_cpu_input("a", np.full((1, 4), 7, np.float32))
        binding.bind_cpu_input("b", np.zeros((1, 4), np.float32))
        with pytest.raises(abi.RknnError, match=r"rknn_run failed: RKNN_ERR_FAIL \(-1\)"):
            s.run_with_iobinding(binding)
        binding.bind_cpu_input("a", np.ones((1, 4), np.float32))
        s.run_with_iobinding(binding)
        assert binding.copy_outputs_to_cpu()[0].tolist() == [[1.0] * 4]


def test_values_cross_sessions_and_die_with_their_own(npu):
    dims = (1, 4, 6, 8)
    model = add_model(F16, dims, "w_align 8")
    a, b = feeds(F16, dims)
    first, second = session(model), session(model)
    produced = first.io_binding()
    produced.bind_cpu_input("a", a)
    produced.bind_cpu_input("b", b)
    first.run_with_iobinding(produced)
    consumer = second.io_binding()
    x = ezrt.OrtValue.ortvalue_from_numpy(a, "rknpu2", session=first, name="a", io_kind="input")
    consumer.bind_ortvalue_input("a", x)  # first's value, imported into second's context
    consumer.bind_cpu_input("b", b)
    second.run_with_iobinding(consumer)
    np.testing.assert_allclose(consumer.copy_outputs_to_cpu()[0], expected_sum(a, b), rtol=1e-3)
    assert x.memory_info()["import_count"] >= 2
    first.close()  # x's memory goes with its session; second drops nothing twice
    with pytest.raises(ezrt.SessionClosedError):
        second.run_with_iobinding(consumer)
    second.close()


def test_weight_sharing_slave_supports_iobinding(npu):
    dims = (1, 12)
    with session(add_model(F32, dims)) as master:
        slave = ezrt.InferenceSession(add_model(F32, dims), use_weight_from=master)
        a, b = feeds(F32, dims)
        np.testing.assert_array_equal(bound_run(slave, a, b), expected_sum(a, b))
        slave.close()


def test_an_old_runtime_without_mem_sync_says_so(doubles, monkeypatch):
    monkeypatch.setenv(abi.RUNTIME_ENV, doubles["old"])
    old = Double(doubles["old"])
    old.reset()
    with session(add_model(F32, (1, 4))) as s:
        with pytest.raises(
            ezrt.BackendUnavailableError, match=r"rknn_mem_sync is missing .* librknnrt >= 1\.6\.0"
        ):
            bound_run(s, np.ones((1, 4), np.float32), np.ones((1, 4), np.float32))
        with pytest.raises(ezrt.BackendUnavailableError, match="rknn_create_mem2 is missing"):
            s.io_binding().bind_output("y", "rknpu2", mem_flags="non_cacheable")
    old.assert_clean()


# ---------------------------------------------------------------- beside the workers


def test_bound_runs_on_every_worker_beside_run_async(npu):
    dims = (1, 4, 6, 8)
    model = add_model(F16, dims, "w_align 8", "latency_us 2000")
    errors = []
    with session(model, schedule=[0, 1, 2], max_queue_size=12) as s:
        collector = Collector()
        a, b = feeds(F16, dims)
        for i in range(24):
            s.run_async(None, {"a": a, "b": b}, collector, i)

        def zero_copy(seed: int) -> None:
            try:
                x, y = feeds(F16, dims, seed)
                binding = s.io_binding()
                value = ezrt.OrtValue.ortvalue_from_numpy(
                    x, "rknpu2", session=s, name="a", io_kind="input"
                )
                binding.bind_ortvalue_input("a", value)
                binding.bind_cpu_input("b", y)
                for _ in range(6):
                    s.run_with_iobinding(binding)
                    got = binding.copy_outputs_to_cpu()[0]
                    np.testing.assert_allclose(got, expected_sum(x, y), rtol=1e-3)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=zero_copy, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        calls = collector.wait_for(24)
        assert all(err == "" for _, _, err in calls)
    assert errors == []
    assert npu["zc_runs"] == 24 and npu["runs"] >= 48
    # at most one zero-copy context per worker, plus the allocating one
    assert npu["contexts"] <= 3 + 3 + 1


# ---------------------------------------------------------------- the double catches mistakes


def test_the_double_reports_broken_memory_rules(npu):
    """Drive the runtime directly, wrongly, and check the double notices each mistake."""
    ct = np.ctypeslib.ctypes
    rt = abi.load_runtime()
    model = add_model(F32, (1, 4))
    ctx, other = abi.Context(0), abi.Context(0)
    data = ct.create_string_buffer(model, len(model))
    assert rt.rknn_init(ct.byref(ctx), data, len(model), 0, None) == 0
    assert rt.rknn_init(ct.byref(other), data, len(model), 0, None) == 0
    create, destroy = rt.optional("rknn_create_mem"), rt.optional("rknn_destroy_mem")
    sync, set_io = rt.optional("rknn_mem_sync"), rt.optional("rknn_set_io_mem")

    def expect(fragment: str) -> None:
        log = npu.violations()
        npu.reset()
        assert fragment in log, log

    mem = create(ctx.value, 16)
    assert destroy(ctx.value, mem) == 0
    destroy(ctx.value, mem)
    expect("destroyed twice")
    sync(ctx.value, mem, 1)
    expect("used after it was destroyed")
    destroy(other.value, create(ctx.value, 16))
    expect("destroyed with context")
    mem = create(ctx.value, 16)
    ct.memset(mem.contents.virt_addr, 1, 16)
    sync(ctx.value, mem, 2)
    expect("discards CPU writes")
    attr = abi.TensorAttr()
    attr.index = 0
    assert rt.rknn_query(ctx.value, abi.QUERY_INPUT_ATTR, ct.byref(attr), 376) == 0
    set_io(ctx.value, create(ctx.value, 8), ct.byref(attr))
    expect("needs 16")
    attr.size_with_stride = 99
    set_io(ctx.value, mem, ct.byref(attr))
    expect("is not a native layout")
    rt.rknn_destroy(ctx.value)
    expect("context destroyed with 2 memories not destroyed")
    assert not create(ctx.value, 16)
    expect("is not alive (destroyed, or never made)")  # memory made on a destroyed context
    rt.rknn_destroy(other.value)
    rt.rknn_destroy(other.value)
    expect("is not alive (destroyed twice, or never made)")


@pytest.fixture
def forgiving_npu(doubles, monkeypatch):
    """The double, for a test that breaks the rules on purpose and checks the outcome."""
    monkeypatch.setenv(abi.RUNTIME_ENV, doubles["current"])
    double = Double(doubles["current"])
    yield double
    double.reset()
    assert double["mems_live"] == 0 and double["live"] == 0


def test_the_double_sees_a_missing_sync_in_the_numbers(forgiving_npu):
    rt = abi.load_runtime()
    model = add_model(F32, (1, 4))
    ctx = abi.Context(0)
    ct = np.ctypeslib.ctypes
    data = ct.create_string_buffer(model, len(model))
    assert rt.rknn_init(ct.byref(ctx), data, len(model), 0, None) == 0
    create, destroy = rt.optional("rknn_create_mem"), rt.optional("rknn_destroy_mem")
    sync, set_io = rt.optional("rknn_mem_sync"), rt.optional("rknn_set_io_mem")
    mems = [create(ctx.value, 16) for _ in range(3)]
    for index, (mem, command) in enumerate(zip(mems, (1, 1, 2))):
        attr = abi.TensorAttr()
        attr.index = index if command == 1 else 0
        rt.rknn_query(ctx.value, command, ct.byref(attr), 376)
        assert set_io(ctx.value, mem, ct.byref(attr)) == 0
    for mem in mems[:2]:
        ct.memmove(mem.contents.virt_addr, np.full(4, 5, np.float32).ctypes.data, 16)
    forgiving_npu.reset()
    assert rt.rknn_run(ctx.value, None) == 0  # inputs never synced TO_DEVICE
    assert "not synced TO_DEVICE" in forgiving_npu.violations()
    out = np.frombuffer(ct.string_at(mems[2].contents.virt_addr, 16), np.float32)
    assert out.tolist() == [0.0] * 4  # and the NPU computed on zeros; no FROM_DEVICE either
    for mem in mems[:2]:
        sync(ctx.value, mem, 1)
    assert rt.rknn_run(ctx.value, None) == 0
    sync(ctx.value, mems[2], 2)
    out = np.frombuffer(ct.string_at(mems[2].contents.virt_addr, 16), np.float32)
    assert out.tolist() == [10.0] * 4
    for mem in mems:
        destroy(ctx.value, mem)
    rt.rknn_destroy(ctx.value)


def test_memory_without_a_dmabuf_fd_runs_on_the_context_that_allocated_it(npu):
    dims = (1, 6)
    with session(add_model(F32, dims, "no_mem_fd"), schedule=[0, 1]) as s:
        a, b = feeds(F32, dims)
        value = ezrt.OrtValue.ortvalue_from_numpy(a, "rknpu2", session=s, name="a", io_kind="input")
        assert value.memory_info()["fd"] == -1 and not value.memory_info()["dmabuf_backed"]
        for _ in range(3):
            np.testing.assert_array_equal(bound_run(s, a, b), expected_sum(a, b))
    assert npu["mem_imports"] == 0  # nothing imported: every bound run used the home context
