"""RKNPU3 (UPSTREAM_0_11.md §4) against the librknn3_api double.

Model detection and the ``.weight`` companion, runtime options reaching ``rknn3_init`` /
``rknn3_model_init``, tensors reported natively, IOBinding runs as upstream with the NCHW
compatibility path read back right (upstream N6), and past upstream: ``run``, ``run_async``
and ``run_pipeline`` on ezrt's workers sharing the one context.
"""

from __future__ import annotations

import gc
import mmap
import os
import pathlib
import threading
import warnings

import numpy as np
import pytest

import ezrt
from ezrt.backends.rknn.layout import nc1hwc2_to_nchw, nchw_to_nc1hwc2

from .conftest import WAIT, Collector
from .rknn_double.harness import (
    WEIGHTS,
    ContendedLock,
    doubles,
    fake_model,
    fake_rknx,
    memfd_holds,
    needs_cc,
    npu,
    npu3,
)

__all__ = ["doubles", "npu", "npu3"]  # fixtures used here

pytestmark = needs_cc

# float16 NCHW [1, 3, 4, 5] -> native NC1HWC2 [1, 1, 4, 5, 8], rows padded to 8 pixels
IMAGE = fake_rknx(
    "input x 1 nc1hwc2 4 1 3 4 5",
    "output y 1 nc1hwc2 2.0 1.0 4 1 3 4 5",
    "w_align 8",
)
x = np.arange(60, dtype=np.float16).reshape(1, 3, 4, 5)
expected = (2 * x.astype(np.float32) + 1).astype(np.float16)


def write_model(directory: pathlib.Path, model: bytes = IMAGE, name: str = "net.v1.rknn") -> str:
    path = directory / name
    path.write_bytes(model)
    (directory / (name.rsplit(".", 1)[0] + ".weight")).write_bytes(WEIGHTS)
    return str(path)


@pytest.fixture
def model_path(tmp_path: pathlib.Path) -> str:
    return write_model(tmp_path)


# ---------------------------------------------------------------- opening


def test_rknx_with_its_companion_weight_file(npu3, model_path):
    with ezrt.InferenceSession(model_path) as s:
        assert s.get_providers() == ["RKNPU3ExecutionProvider"]
        assert s.get_modelmeta().custom_metadata_map == {
            "rknpu3_runtime_version": "1.0.4 (fake rkcp)"
        }
        (arg,) = s.get_inputs()
        assert (arg.shape, arg.type, arg.layout) == ([1, 1, 4, 5, 8], "tensor(float16)", "NC1HWC2")
        assert arg.strides == [256, 256, 64, 8, 1]
        assert s.get_native_inputs() == s.get_inputs()
        assert s.get_native_outputs()[0].layout == "NC1HWC2"
    assert npu3["core_mask"] == 0b111  # auto: every core of the model (the runtime refuses 0)


def test_weight_file_rules(npu3, tmp_path):
    lonely = tmp_path / "lonely.rknn"
    lonely.write_bytes(IMAGE)
    with pytest.raises(
        ezrt.InvalidArgumentError,
        match=r"RKNPU3 weight file not found: .*lonely\.weight\. The runtime otherwise enters "
        "streaming mode",
    ):
        ezrt.InferenceSession(str(lonely))
    with pytest.raises(
        ezrt.InvalidArgumentError,
        match=r"RKNPU3 models require a weight file\. For an in-memory model, set provider "
        r"option 'weight_path'\.",
    ):
        ezrt.InferenceSession(IMAGE)
    weights = tmp_path / "w.bin"
    weights.write_bytes(WEIGHTS)
    with ezrt.InferenceSession(IMAGE, provider_options={"weight_path": weights}) as s:
        np.testing.assert_array_equal(nc1hwc2_to_nchw(s.run(None, pack(x))[0], 3), expected)
    with ezrt.InferenceSession(str(lonely), provider_options={"weight_path": str(weights)}):
        pass
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ezrt.InvalidArgumentError, match="RKNPU3 weight file is empty"):
        ezrt.InferenceSession(IMAGE, provider_options={"weight_path": tmp_path / "empty.bin"})
    (tmp_path / "bad.bin").write_bytes(b"not weights")
    with pytest.raises(
        ezrt.EzrtError, match=r"rknn3_load_model_from_data failed: -3 \(invalid model\)"
    ):
        ezrt.InferenceSession(IMAGE, provider_options={"weight_path": tmp_path / "bad.bin"})


@pytest.mark.parametrize(
    "options, directive, mask",
    [
        ({}, "cores 1", 0b1),
        ({}, "cores 32", 0xFFFFFFFF),
        ({"run_core_mask": 2}, "cores 3", 2),
        ({"run_core_mask": "all"}, "cores 3", 0xFFFFFFFF),
    ],
)
def test_core_mask_priority_and_timeout_reach_the_runtime(npu3, tmp_path, options, directive, mask):
    path = write_model(tmp_path, IMAGE + directive.encode() + b"\n")
    options = {**options, "priority": -3, "run_timeout_ms": 2500}
    with ezrt.InferenceSession(path, provider_options=options):
        pass
    assert (npu3["core_mask"], npu3["priority"], npu3["run_timeout"]) == (mask, -3, 2500)


def test_runtime_errors_and_warnings(npu3, tmp_path):
    path = write_model(tmp_path, IMAGE + b"cores 0\n")
    with pytest.raises(ezrt.EzrtError, match="invalid RKNPU3 model core count: 0"):
        ezrt.InferenceSession(path)
    path = write_model(tmp_path, IMAGE, "m.rknn")
    with pytest.raises(ezrt.EzrtError, match=r"rknn3_init failed: -10 \(device unavailable\)"):
        ezrt.InferenceSession(path, provider_options={"device_id": "missing"})
    with ezrt.InferenceSession(path, provider_options={"device_id": 0}):
        assert npu3["device_id_set"] == 1
    path = write_model(tmp_path, IMAGE + b"core_unused\n", "u.rknn")
    with pytest.warns(UserWarning, match="rknn3_model_init: requested NPU core is unused"):
        ezrt.InferenceSession(path).close()
    path = write_model(tmp_path, IMAGE + b"fail_load -17\n", "f.rknn")
    with pytest.raises(
        ezrt.EzrtError,
        match=r"rknn3_load_model_from_path failed: -17 \(streaming weight load is not prepared\)",
    ):
        ezrt.InferenceSession(path)


# ---------------------------------------------------------------- run, run_async, run_pipeline


def pack(array: np.ndarray) -> dict:
    return {"x": nchw_to_nc1hwc2(array, 1, 8)}


def test_run_takes_and_gives_native_tensors(npu3, model_path):
    with ezrt.InferenceSession(model_path) as s:
        (y,) = s.run(None, pack(x))
        assert y.shape == (1, 1, 4, 5, 8) and y.dtype == np.float16
        np.testing.assert_array_equal(nc1hwc2_to_nchw(y, 3), expected)
        assert not y[..., 3:].any()  # padding channels stay zero
        (y32,) = s.run(None, {"x": nchw_to_nc1hwc2(x.astype(np.float32), 1, 8)})
        np.testing.assert_array_equal(y32, y)  # float32 feeds are converted
        with pytest.raises(ezrt.InvalidArgumentError, match="Input rank mismatch"):
            s.run(None, {"x": x})  # run takes the native tensor (the NCHW path is zero copy's)


def test_run_async_and_pipeline_on_several_workers(npu3, tmp_path):
    path = write_model(tmp_path, IMAGE + b"latency_us 3000\n")
    frames = [np.full((1, 3, 4, 5), i, np.float16) for i in range(24)]
    collector = Collector()
    options = {"threads_per_core": 3, "max_queue_size": 8}
    with ezrt.InferenceSession(path, provider_options=options) as s:
        for i, frame in enumerate(frames):
            s.run_async(None, pack(frame), collector, i)
        calls = collector.wait_for(24)
        assert s.run_pipeline(pack(frames[0]), depth=1, reset=True) is None
        (piped,) = s.run_pipeline(pack(frames[1]), depth=1)
    assert [user for _, user, _ in calls] == list(range(24))
    for (outputs, _, err), frame in zip(calls, frames):
        assert err == ""
        np.testing.assert_array_equal(nc1hwc2_to_nchw(outputs[0], 3), 2 * frame + 1)
    np.testing.assert_array_equal(nc1hwc2_to_nchw(piped, 3), 2 * frames[0] + 1)
    assert npu3["runs"] == 26


# ---------------------------------------------------------------- zero copy


def test_iobinding_with_the_nchw_path_read_back_right(npu3, model_path):
    with ezrt.InferenceSession(model_path) as s:
        value = ezrt.OrtValue.ortvalue_from_numpy(x, "rknpu3", session=s, name="x", io_kind="input")
        assert value.shape() == [1, 3, 4, 5]
        np.testing.assert_array_equal(value.numpy(), x)  # upstream returns packed bytes (N6)
        info = value.memory_info()
        assert (info["fmt"], info["layout"], info["aligned_size"]) == (3, "NC1HWC2", 512)
        assert info["strides"] == [256, 256, 64, 8, 1] and info["w_stride"] == 0
        binding = s.io_binding()
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match="All RKNPU3 model inputs must be bound before run_with_iobinding",
        ):
            s.run_with_iobinding(binding)
        binding.bind_ortvalue_input("x", value)
        s.run_with_iobinding(binding)
        (y,) = binding.get_outputs()  # auto-bound, returned
        assert y.shape() == [1, 1, 4, 5, 8] and y.device_name() == "rknpu3"
        np.testing.assert_array_equal(nc1hwc2_to_nchw(y.numpy(), 3), expected)
        binding.bind_cpu_input("x", (x * 2).astype(np.float16))  # the NCHW path, from the CPU
        s.run_with_iobinding(binding)
        np.testing.assert_array_equal(
            nc1hwc2_to_nchw(binding.copy_outputs_to_cpu()[0], 3), 4 * x.astype(np.float32) + 1
        )
        small = ezrt.OrtValue.ortvalue_from_numpy(
            x[:, :2, :3, :4].copy(), "rknpu3", session=s, name="x", io_kind="input"
        )
        np.testing.assert_array_equal(small.numpy(), x[:, :2, :3, :4])  # fits: padded with 0
        binding.bind_ortvalue_input("x", small)
        s.run_with_iobinding(binding)
        got = nc1hwc2_to_nchw(binding.copy_outputs_to_cpu()[0], 3)
        assert got[0, 2].tolist() == [[1.0] * 5] * 4  # the channel not given is 0 on the NPU


def test_rknpu3_value_rules(npu3, npu, model_path, tmp_path):
    values = ezrt.OrtValue.ortvalue_from_numpy
    shaped = ezrt.OrtValue.ortvalue_from_shape_and_type
    with (
        ezrt.InferenceSession(model_path) as s,
        ezrt.InferenceSession(write_model(tmp_path, IMAGE, "other.rknn")) as other,
    ):
        at = {"session": s, "name": "x", "io_kind": "input"}
        with pytest.raises(
            ezrt.InvalidArgumentError, match="RKNPU3 NCHW input does not fit the native NC1HWC2"
        ):
            values(np.zeros((1, 9, 4, 5), np.float16), "rknpu3", **at)
        with pytest.raises(ezrt.InvalidArgumentError, match="RKNPU3 supports device_id 0 only"):
            shaped([1, 1, 4, 5, 8], np.float16, "rknpu3", 1, **at)
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match="RKNPU3 supports cacheable/non-cacheable memory flags only",
        ):
            shaped([1, 1, 4, 5, 8], np.float16, "rknpu3", mem_flags="try_sram", **at)
        shaped([1, 1, 4, 5, 8], np.float16, "rknpu3", mem_flags="non_cacheable", **at)
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match="standalone RKNPU3 OrtValue requires session, name, and io_kind",
        ):
            shaped([1, 1, 4, 5, 8], np.float16, "rknpu3")
        foreign = values(x, "rknpu3", session=other, name="x", io_kind="input")
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match="RKNPU3 OrtValue belongs to a different session/context",
        ):
            s.io_binding().bind_ortvalue_input("x", foreign)
        with pytest.raises(
            ezrt.InvalidArgumentError, match="invalid or too-small dma-buf for RKNPU3 tensor"
        ):
            ezrt.OrtValue.ortvalue_from_dmabuf(
                3, [1, 1, 4, 5, 8], np.float16, size=64, session=s, name="x", io_kind="input"
            )
        rknpu2 = ezrt.InferenceSession(
            fake_model("input a 0 3 2 1 4", "output b 0 0 0 1.0 1.0 0.0 2 1 4")
        )
        with rknpu2:
            value = values(np.ones((1, 4), np.float32), "rknpu2", session=rknpu2, name="a",
                           io_kind="input")  # fmt: skip
            with pytest.raises(
                ezrt.InvalidTypeError, match="bind_ortvalue_input requires an RKNPU3 OrtValue"
            ):
                s.io_binding().bind_ortvalue_input("x", value)
            del value


def test_rknpu3_dmabuf_input(npu3, model_path):
    with ezrt.InferenceSession(model_path) as s:
        native = s.get_native_inputs()[0]
        fd = os.memfd_create("frame")
        os.ftruncate(fd, 640)
        with mmap.mmap(fd, 640) as mapping:
            strides = [2 * step for step in native.strides]  # rows padded: use the strides
            view = np.ndarray(native.shape, np.float16, mapping, strides=strides)
            view[...] = nchw_to_nc1hwc2(x, 1, 8)
            value = ezrt.OrtValue.ortvalue_from_dmabuf(
                fd, native.shape, np.float16, size=640, session=s, name="x", io_kind="input"
            )
            os.close(fd)
            binding = s.io_binding()
            binding.bind_ortvalue_input("x", value)
            s.run_with_iobinding(binding)
            got = nc1hwc2_to_nchw(binding.copy_outputs_to_cpu()[0], 3)
            np.testing.assert_array_equal(got, expected)
            del view, value, binding


@pytest.mark.parametrize("own_mapping", [False, True])
def test_memory_the_runtime_cannot_map_is_refused_and_let_go(npu3, tmp_path, own_mapping):
    """A handle the runtime gives without a CPU address is destroyed, and an imported
    dma-buf's dup and mapping are let go with it; the caller keeps only their own."""
    name = f"unmapped-{own_mapping}"
    path = write_model(tmp_path, IMAGE + b"mem_unmapped\n")
    with ezrt.InferenceSession(path) as s:
        with pytest.raises(ezrt.EzrtError, match="RKNPU3 tensor memory is unmapped or too small"):
            ezrt.OrtValue.ortvalue_from_shape_and_type(
                [1, 1, 4, 5, 8], np.float16, "rknpu3", session=s, name="x", io_kind="input"
            )
        fd = os.memfd_create(name)
        os.ftruncate(fd, 640)
        mapping = mmap.mmap(fd, 640) if own_mapping else None
        virt = None
        if mapping is not None:
            virt = np.ctypeslib.ctypes.addressof(np.ctypeslib.ctypes.c_char.from_buffer(mapping))
        mine = memfd_holds(name)  # the caller's own (Python's mmap keeps a dup of its fd)
        with pytest.raises(ezrt.EzrtError, match="RKNPU3 tensor memory is unmapped or too small"):
            ezrt.OrtValue.ortvalue_from_dmabuf(
                fd, [1, 1, 4, 5, 8], np.float16, size=640, virt_addr=virt, session=s, name="x",
                io_kind="input",
            )  # fmt: skip
        assert memfd_holds(name) == mine
        assert npu3["mems_live"] == 0
        os.close(fd)
        del virt
        if mapping is not None:
            mapping.close()
    assert memfd_holds(name) == (0, 0)


@pytest.mark.parametrize(
    "kind, when",
    [
        ("allocate", "inside the runtime call"),
        ("import", "inside the runtime call"),
        ("import", "before the runtime call"),
    ],
)
def test_memory_made_while_the_session_closes_is_refused_and_freed(
    npu3, model_path, monkeypatch, kind, when
):
    """close() on another thread while a value is being made: the factory refuses it
    (SessionClosedError) and frees it while the context still exists, or close frees it;
    nothing is left on, or made on, the destroyed context."""
    from ezrt.backends.rknn.rknpu3 import backend as rknpu3_backend

    name = f"closing3-{kind}-{when[:6]}"
    s = ezrt.InferenceSession(model_path)
    backend = s._backend
    closer = threading.Thread(target=s.close)
    if when == "inside the runtime call":
        # close collects the memories to free, then waits for the context this thread holds
        probe = ContendedLock(backend._slot.lock)
        monkeypatch.setattr(backend._slot, "lock", probe)
        api = "rknn3_create_mem" if kind == "allocate" else "rknn3_create_mem_from_fd"
        real = getattr(backend.rt, api)

        def racing(*args):
            handle = real(*args)
            closer.start()
            assert probe.contended.wait(WAIT), "close never reached the context"
            return handle

        monkeypatch.setattr(backend.rt, api, racing)
    else:  # the whole close runs after the import found the session open
        real_hold = rknpu3_backend.hold_dmabuf

        def hold_then_close(*args):
            held = real_hold(*args)
            closer.start()
            closer.join(WAIT)
            return held

        monkeypatch.setattr(rknpu3_backend, "hold_dmabuf", hold_then_close)
    fd = os.memfd_create(name)
    os.ftruncate(fd, 640)
    with pytest.raises(ezrt.SessionClosedError, match="the session is closed"):
        if kind == "allocate":
            ezrt.OrtValue.ortvalue_from_shape_and_type(
                [1, 1, 4, 5, 8], np.float16, "rknpu3", session=s, name="x", io_kind="input"
            )
        else:
            ezrt.OrtValue.ortvalue_from_dmabuf(
                fd, [1, 1, 4, 5, 8], np.float16, size=640, session=s, name="x", io_kind="input"
            )
    closer.join(WAIT)
    assert not closer.is_alive()
    os.close(fd)
    gc.collect()
    npu3.assert_clean()
    assert memfd_holds(name) == (0, 0)


def test_bound_runs_beside_run_async_share_the_context_safely(npu3, tmp_path):
    path = write_model(tmp_path, IMAGE + b"latency_us 1000\n")
    errors = []
    with ezrt.InferenceSession(path, provider_options={"threads_per_core": 2}) as s:
        collector = Collector()
        for i in range(12):
            s.run_async(None, pack(x), collector, i)

        def bound(scale: int) -> None:
            try:
                binding = s.io_binding()
                frame = (x * scale).astype(np.float16)
                binding.bind_cpu_input("x", frame)
                for _ in range(5):
                    s.run_with_iobinding(binding)
                    got = nc1hwc2_to_nchw(binding.copy_outputs_to_cpu()[0], 3)
                    np.testing.assert_array_equal(got, 2 * frame + 1)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=bound, args=(i,)) for i in (1, 2, 3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert all(err == "" for _, _, err in collector.wait_for(12))
    assert errors == []


def test_internally_strided_tensors_are_refused_clearly(npu3, tmp_path):
    path = write_model(tmp_path, IMAGE + b"opaque_strides\n")
    with ezrt.InferenceSession(path) as s:
        value = ezrt.OrtValue.ortvalue_from_shape_and_type(
            [1, 1, 4, 5, 8], np.float16, "rknpu3", session=s, name="x", io_kind="input"
        )
        with pytest.raises(
            ezrt.EzrtError,
            match="numpy/copy for an internally-strided RKNPU3 tensor is not implemented",
        ):
            value.numpy()
        with pytest.raises(
            ezrt.EzrtError,
            match="update_inplace for an internally-strided RKNPU3 tensor is not implemented",
        ):
            value.update_inplace(np.zeros((1, 1, 4, 5, 8), np.float16))
        assert value.data_ptr() != 0


def test_close_frees_rknpu3_memory_once(npu3, model_path):
    s = ezrt.InferenceSession(model_path)
    value = ezrt.OrtValue.ortvalue_from_numpy(x, "rknpu3", session=s, name="x", io_kind="input")
    s.run(None, pack(x))  # the worker's own I/O memory
    s.close()
    assert npu3["mems_live"] == 0
    with pytest.raises(ezrt.SessionClosedError):
        value.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del value


def test_worker_memory_is_freed_by_close_even_when_a_worker_outlives_it(npu3, model_path):
    """At interpreter exit the engine may close the backend while workers still run (it
    gave up waiting for them): close frees the workers' I/O memory with the values', and a
    worker that stops later frees nothing twice nor on the destroyed context."""
    s = ezrt.InferenceSession(model_path)
    s.run(None, pack(x))  # the worker's own I/O memory
    s._backend.close()  # what the engine does when it abandons running tasks
    assert npu3["mems_live"] == 0 and npu3["live"] == 0
    with pytest.raises(ezrt.SessionClosedError):
        s.run(None, pack(x))
    s.close()  # now the workers stop and close
    assert npu3.violations() == ""
