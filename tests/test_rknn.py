"""The RKNN backend through the public API, against a C double of librknnrt.so.

The double (tests/rknn_double/fake_rknnrt.c) is compiled here with the system C compiler. It
checks the struct sizes and fields it receives, emulates RK3588/RK3576/RK3566 core masks,
computes y = a*x + b (optionally int8-quantised) with a per-core latency, and counts
contexts so every test can assert that nothing leaked.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import ezrt
from ezrt.backends.rknn import abi
from ezrt.backends.rknn.container import parse_container

from .conftest import WAIT, Collector
from .rknn_double.harness import Double, doubles, fake_model, needs_cc, npu

__all__ = ["doubles", "npu"]  # fixtures used here

SAMPLES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "rknn"

pytestmark = needs_cc

F32, U8, I8 = 0, 3, 2
NCHW, NHWC, UNDEF = 0, 1, 3


IMAGE = fake_model(
    "chip rk3588",
    "custom_string hello npu",
    f"input image {F32} {NHWC} 4 1 4 5 3",
    f"output y {F32} 0 0 1.0 2.0 1.0 4 1 4 5 3",
)
x_nchw = np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5)
expected_nhwc = 2 * x_nchw.transpose(0, 2, 3, 1) + 1


def session(model: bytes, **options) -> ezrt.InferenceSession:
    return ezrt.InferenceSession(model, provider_options=options)


# ---------------------------------------------------------------- recognition, info, loading


def test_unknown_keyword_arguments_are_a_type_error_on_rknn_too(npu):
    # Upstream 0.11 ignores them, so a misspelt keyword vanishes without a word.
    with pytest.raises(TypeError, match="unexpected keyword argument 'provider_option'"):
        ezrt.InferenceSession(IMAGE, provider_option={"schedule": [0]})
    # use_weight_from is the one keyword an RKNN session takes
    with session(IMAGE) as fine, ezrt.InferenceSession(IMAGE, use_weight_from=fine) as shared:
        assert shared.get_providers() == fine.get_providers()


def test_rknn_models_are_recognised_by_their_bytes(npu, tmp_path):
    path = tmp_path / "model.onnx"  # the name does not matter
    path.write_bytes(IMAGE)
    with ezrt.InferenceSession(path) as s:
        assert s.get_providers() == ["RKNPU2ExecutionProvider"]
        assert s.get_provider_options() == {"RKNPU2ExecutionProvider": {}}
        assert s._backend.runtime_path.endswith("librknnrt.so")


def test_importing_ezrt_does_not_load_the_runtime():
    code = (
        "import sys, ezrt; "
        "print('ezrt.backends.rknn.abi' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_missing_runtime_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv(abi.RUNTIME_ENV, str(tmp_path / "librknnrt.so"))
    with pytest.raises(
        ezrt.BackendUnavailableError,
        match=r"librknnrt\.so was not found \(from ZTU_RKNPU2_RUNTIME_LIBRARY\)\. Tried: "
        r".*librknnrt\.so: no such file.*Install Rockchip's NPU runtime",
    ):
        ezrt.InferenceSession(IMAGE)


def test_library_version_is_read_from_the_file(doubles):
    assert abi.library_version(doubles["current"]) == "0.0.0 (fake@2026-11-24T00:00:00)"
    assert abi.parse_version("2.3.2 (429f97ae6b@2025-04-09)") == (2, 3, 2)


def test_struct_sizes_match_the_abi():
    sizes = {s.__name__: ctypes.sizeof(s) for s in abi.STRUCT_SIZES}
    assert sizes["TensorAttr"] == 376 and sizes["InputRange"] == 33040 and sizes["Input"] == 32
    assert sizes["Output"] == 24 and sizes["InitExtend"] == 136 and sizes["TensorMem"] == 40
    assert ctypes.sizeof(abi.SdkVersion) == 512 and ctypes.sizeof(abi.CustomString) == 1024
    assert abi.TensorAttr.scale.offset == 356 and abi.TensorAttr.h_stride.offset == 372
    assert abi.Input.buf.offset == 8 and abi.Output.buf.offset == 8


@pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"place the sample .rknn files in {SAMPLES} (see docs/testing.md)"
)
def test_container_parsing_of_real_rockchip_samples():
    v6 = parse_container((SAMPLES / "dual_residual_custom_rk3588.rknn").read_bytes())
    assert v6.format_version == 6 and v6.target_platforms == ["rk3588"]
    assert v6.toolkit_version.startswith("1.6.1") and len(v6.inputs) == 2 and len(v6.outputs) == 2
    assert v6.inputs[0].shape == [1, 3, 10, 10]
    v2 = parse_container((SAMPLES / "multiple_input_demo_rk3588_v1.3.rknn").read_bytes())
    assert v2.format_version == 2 and v2.toolkit_version.startswith("1.3.4")
    assert [t.shape for t in v2.inputs] == [[1, 1, 128, 128], [1, 3, 128, 128]]
    assert v2.inputs[0].dtype == "int8" and v2.outputs[0].shape == [1, 8, 128, 128]
    rk3562 = parse_container((SAMPLES / "multiple_input_demo_rk3562.rknn").read_bytes())
    assert rk3562.target_platforms == ["rk3562"]
    assert parse_container(b"CYPTRKNN" + b"\0" * 64).encrypted
    with pytest.raises(ezrt.InvalidArgumentError, match="does not fit"):
        parse_container(b"RKNN\0\0\0\0" + (6).to_bytes(8, "little") + (10**6).to_bytes(8, "little"))


@pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"place the sample .rknn files in {SAMPLES} (see docs/testing.md)"
)
def test_ezrt_info_reads_an_rknn_file_without_any_runtime(monkeypatch):
    env = {**os.environ, abi.RUNTIME_ENV: "/nonexistent/librknnrt.so"}
    out = subprocess.run(
        [sys.executable, "-m", "ezrt", "info", str(SAMPLES / "multiple_input_demo_rk3562.rknn")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "RKNN model, container version 6" in out.stdout
    assert "target platform: rk3562" in out.stdout
    assert "input input.1: int8 [1, 1, 128, 128]" in out.stdout
    assert "runtime: not found" in out.stdout


# ---------------------------------------------------------------- running, layouts, dtypes


@pytest.mark.parametrize(
    "layout, shape, feed",
    [
        ("nchw", [1, 3, 4, 5], x_nchw),
        ("original", [1, 3, 4, 5], x_nchw),
        ("nchw_software", [1, 3, 4, 5], x_nchw),
        ("nhwc", [1, 4, 5, 3], x_nchw.transpose(0, 2, 3, 1)),
        ("any", [1, 4, 5, 3], x_nchw.transpose(0, 2, 3, 1)),
    ],
)
def test_layouts(npu, layout, shape, feed):
    with session(IMAGE, layout=layout) as s:
        assert s.get_inputs()[0].shape == shape
        (y,) = s.run(None, {"image": feed})
    np.testing.assert_allclose(y, expected_nhwc)
    assert y.dtype == np.float32 and y.shape == (1, 4, 5, 3)


def test_inputs_of_other_dtypes_are_converted_by_the_runtime(npu):
    with session(IMAGE) as s:
        (y,) = s.run(None, {"image": x_nchw.astype(np.uint8)})
        np.testing.assert_allclose(y, expected_nhwc)
        with pytest.raises(
            ezrt.InvalidTypeError,
            match="Input 'image' dtype complex64 is not supported by this backend",
        ):
            s.run(None, {"image": x_nchw.astype(np.complex64)})
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match=r"Input 'image' shape mismatch: expected \[1, 3, 4, 5\]",
        ):
            s.run(None, {"image": x_nchw.transpose(0, 2, 3, 1)})


QUANT = fake_model(
    "chip rk3588",
    f"input x {F32} {UNDEF} 2 1 6",
    f"output q {I8} 2 3 0.5 1.0 0.0 2 1 6",
)


def test_outputs_are_float32_by_default_and_native_on_request(npu):
    x = np.array([[0.0, 1.0, 2.2, -3.3, 100.0, -100.0]], np.float32)
    q = np.clip(np.round(x / 0.5 + 3), -128, 127)
    with session(QUANT) as s:
        assert s.get_outputs()[0].type == "tensor(float)"
        (y,) = s.run(None, x)
        np.testing.assert_allclose(y, (q - 3) * 0.5)  # dequantised by the runtime
    with session(QUANT, output_dtype="native") as s:
        assert s.get_outputs()[0].type == "tensor(int8)"
        (y,) = s.run(None, x)
        assert y.dtype == np.int8 and y.tolist() == q.astype(np.int8).tolist()


def test_metadata_and_custom_string(npu):
    with session(IMAGE) as s:
        assert s.get_modelmeta().custom_metadata_map == {"rknn_custom_string": "hello npu"}
        assert s.get_outputs()[0].shape == [1, 4, 5, 3]


def test_old_sdk_version_warns_like_upstream(npu):
    old = IMAGE + b"sdk_version 1.6.0 (fake)\n"
    with pytest.warns(
        UserWarning, match=r"RKNN API version 1.6.0 \(fake\) is likely outdated; .*2.4.1"
    ) as record:
        s = ezrt.InferenceSession(old)
    s.close()
    # a warning points at the line that built the session, not somewhere inside ezrt
    assert [w.filename for w in record] == [__file__]


# ---------------------------------------------------------------- contexts and cores


def test_schedule_makes_a_dup_context_per_worker_with_its_core_mask(npu):
    with session(IMAGE, schedule=[0, 1, 2], threads_per_core=2) as s:
        assert len(s.run(None, {"image": x_nchw})) == 1
    assert npu["inits"] == 1 and npu["dups"] == 5 and npu["mask_calls"] == 6
    assert npu["destroys"] == 6


def test_disable_dup_context_inits_each_worker(npu):
    with session(IMAGE, schedule=[0, 1], disable_dup_context=True):
        pass
    assert npu["inits"] == 2 and npu["dups"] == 0


@pytest.mark.parametrize(
    "chip, options, error",
    [
        ("rk3588", {"schedule": [0, 1, 2]}, None),
        ("rk3588", {"tp_mode": "0,1,2"}, None),
        ("rk3576", {"schedule": [0, 1]}, None),
        (
            "rk3576",
            {"schedule": [0, 2]},
            r"rknn_set_core_mask failed for thread 1 \(mask 0x4\): RKNN_ERR_PARAM_INVALID \(-5\)",
        ),
        ("rk3576", {"tp_mode": "0,1,2"}, r"mask 0x7\): RKNN_ERR_PARAM_INVALID"),
        ("rk3566", {}, None),  # AUTO: -13 tolerated on a single-core NPU
        ("rk3566", {"schedule": [0]}, None),  # core 0: tolerated too
        (
            "rk3566",
            {"schedule": [1]},
            r"RKNN_ERR_TARGET_PLATFORM_UNMATCH \(-13\).*not supported by the current platform",
        ),
    ],
)
def test_core_mask_rules_per_chip(npu, chip, options, error):
    model = IMAGE.replace(b"chip rk3588", f"chip {chip}".encode())
    if error is None:
        with session(model, **options) as s:
            np.testing.assert_allclose(s.run(None, {"image": x_nchw})[0], expected_nhwc)
    else:
        with pytest.raises(abi.RknnError, match=error):
            session(model, **options)
    # a failed construction destroyed every context it had made (checked by the fixture)


def test_schedule_core_beyond_a_mask_is_refused(npu):
    with pytest.raises(ezrt.InvalidArgumentError, match="schedule core 16 is not an NPU core"):
        session(IMAGE, schedule=[16])


def test_init_failure_is_a_formatted_rknn_error(npu):
    with pytest.raises(
        abi.RknnError,
        match=r"rknn_init failed: RKNN_ERR_MODEL_INVALID \(-6\): invalid or unsupported model\.",
    ):
        session(IMAGE + b"fail_init -6\n")
    with pytest.raises(ezrt.InvalidArgumentError, match="Unknown RKNN model magic: 4f 4e 4e 58"):
        ezrt.InferenceSession(b"ONNX-bytes, not rknn", providers=["RKNNExecutionProvider"])


def test_run_failure_mid_stream_is_delivered_as_err(npu):
    model = IMAGE + b"fail_run_value 7\n"
    collector = Collector()
    with session(model, schedule=[0, 1]) as s:
        for i in range(6):
            frame = np.full((1, 3, 4, 5), float(i) + 5, np.float32)  # the third frame starts with 7
            s.run_async(None, {"image": frame}, collector, i)
        calls = collector.wait_for(6)
        assert s.run(None, {"image": x_nchw})[0].shape == (1, 4, 5, 3)  # still healthy
    assert [u for _, u, _ in calls] == list(range(6))
    assert (
        calls[2][0] is None
        and calls[2][2] == "rknn_run failed: RKNN_ERR_FAIL (-1): execution failed."
    )
    assert all(err == "" for _, u, err in calls if u != 2)


def test_weight_sharing_keeps_the_master_alive_until_its_slaves_close(npu):
    master = session(IMAGE)
    slave = ezrt.InferenceSession(
        IMAGE, provider_options={"schedule": [0, 1]}, use_weight_from=master
    )
    assert npu["inits"] == 3 and npu["dups"] == 0  # every slave context borrows the weights
    master.close()
    assert npu["live"] == 3  # the master's context stays: the slave uses its weights
    np.testing.assert_allclose(slave.run(None, {"image": x_nchw})[0], expected_nhwc)
    slave.close()
    assert npu["live"] == 0


def test_dynamic_shapes_are_validated_against_the_allowed_ranges(npu):
    model = fake_model(
        f"input x {F32} {UNDEF} 2 1 4",
        f"output y {F32} 0 0 1.0 3.0 0.0 2 1 4",
        "range 0 2 1 4",
        "range 0 2 2 4",
        "range 0 2 3 4",
    )
    with session(model) as s:
        assert s.get_inputs()[0].shape == [None, 4]
        (y,) = s.run(None, np.ones((3, 4), np.float32))
        assert y.shape == (3, 4) and y.tolist() == [[3.0] * 4] * 3
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match=r"Input 'x' shape \[5, 4\] is not one the model allows: "
            r"\[1, 4\], \[2, 4\], \[3, 4\]",
        ):
            s.run(None, np.ones((5, 4), np.float32))
    assert npu["shape_calls"] == 1


def test_an_old_runtime_lacking_a_function_says_which_and_since_when(doubles, monkeypatch):
    monkeypatch.setenv(abi.RUNTIME_ENV, doubles["old"])
    double = Double(doubles["old"])
    double.reset()
    dynamic = fake_model(
        f"input x {F32} {UNDEF} 2 1 4", f"output y {F32} 0 0 1.0 1.0 0.0 2 1 4", "range 0 2 1 4"
    )
    with (
        session(dynamic) as s,
        pytest.raises(
            ezrt.BackendUnavailableError,
            match=r"rknn_set_input_shapes is missing from .* it needs librknnrt >= 1.5.2",
        ),
    ):
        s.run(None, np.ones((1, 4), np.float32))
    assert double["live"] == 0


def test_custom_op_plugins(npu, doubles, tmp_path):
    with pytest.warns(UserWarning, match="Custom op loading requested; dup_context is disabled"):
        s = session(IMAGE, schedule=[0, 1], custom_op_paths=[doubles["plugin"], doubles["plugin2"]])
    with s:
        np.testing.assert_allclose(s.run(None, {"image": x_nchw})[0], expected_nhwc)
    assert npu["dups"] == 0 and npu["inits"] == 2
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            ezrt.InvalidArgumentError, match="Duplicate custom op definition detected: MyOp"
        ),
    ):
        session(IMAGE, custom_op_paths=[doubles["plugin"], doubles["plugin"]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ezrt.InvalidArgumentError, match=r"dlopen .* fail"):
            session(IMAGE, custom_op_paths=[str(tmp_path / "librkcst_none.so")])
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("Custom op loading requested") for m in messages)
    assert any("could lead to a crash due to internal bugs of rknnrt" in m for m in messages)


def test_custom_ops_need_a_runtime_that_can_register_them(doubles, monkeypatch):
    monkeypatch.setenv(abi.RUNTIME_ENV, doubles["old"])
    with (
        pytest.warns(UserWarning),
        pytest.raises(ezrt.BackendUnavailableError, match="rknn_register_custom_ops is missing"),
    ):
        session(IMAGE, custom_op_paths=[doubles["plugin"]])
    assert Double(doubles["old"])["live"] == 0


def test_default_plugin_directory_missing_is_a_warning(npu, monkeypatch, tmp_path):
    from ezrt.backends.rknn import backend

    monkeypatch.setattr(backend, "DEFAULT_PLUGIN_DIR", str(tmp_path / "op_plugins"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session(IMAGE, custom_op_default_path=True).close()
    messages = [str(w.message) for w in caught]
    assert any("Default plugin directory does not exist" in m for m in messages)


def test_perf_log_goes_through_logging(npu, monkeypatch, caplog):
    monkeypatch.setenv("ZTU_EZRKNN_ASYNC_PRINT_PERF", "yes")
    with caplog.at_level("INFO", logger="ezrt.perf"), session(IMAGE, schedule=[1]) as s:
        s.run(None, {"image": x_nchw})
    lines = [r.getMessage() for r in caplog.records if r.name == "ezrt.perf"]
    assert len(lines) == 1 and lines[0].startswith(
        "[ztu_ez_rknn_async_perf] thread_id=0 core_id=1 "
    )
    assert "infer_us=" in lines[0] and "total_us=" in lines[0]


def test_three_cores_run_a_batch_at_least_2_7_times_faster_than_one(npu):
    model = IMAGE + b"latency_us 20000\n"
    frames = [np.full((1, 3, 4, 5), i, np.float32) for i in range(30)]

    def elapsed(schedule):
        with session(model, schedule=schedule, max_queue_size=6) as s:
            started = time.perf_counter()
            results = list(s.imap({"image": f} for f in frames))
            took = time.perf_counter() - started
        assert len(results) == 30
        return took

    one, three = elapsed([0]), elapsed([0, 1, 2])
    assert one / three >= 2.7, (
        f"speed-up {one / three:.2f} (1 core {one:.3f} s, 3 cores {three:.3f} s)"
    )


def test_close_releases_everything_while_tasks_run(npu):
    model = IMAGE + b"latency_us 2000\n"
    collector = Collector()
    s = session(model, schedule=[0, 1, 2], max_queue_size=8)
    for i in range(20):
        s.run_async(None, {"image": x_nchw}, collector, i)
    closer = threading.Thread(target=s.close, kwargs={"cancel": True})
    closer.start()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert len(collector.wait_for(20)) == 20


# ---------------------------------------------------------------- upstream 0.11's copy-path tests


def test_model_bytes_with_run_async_and_run_pipeline(npu):
    add = fake_model(
        f"input x {F32} {UNDEF} 2 1 4",
        f"input y {F32} {UNDEF} 2 1 4",
        f"output z {F32} 0 0 1.0 1.0 0.0 2 1 4",
        "mix 0 1 1.0",
    )
    x, y = np.arange(4, dtype=np.float32).reshape(1, 4), np.full((1, 4), 10, np.float32)
    collector = Collector()
    with ezrt.InferenceSession(add) as s:  # bytes, not a path
        s.run_async(None, {"x": x, "y": y}, collector, "tag")
        ((outputs, user, err),) = collector.wait_for(1)
        assert (user, err) == ("tag", "") and outputs[0].tolist() == (x + y).tolist()
        assert s.run_pipeline({"x": x, "y": y}, depth=1, reset=True) is None
        (z,) = s.run_pipeline({"x": x, "y": y}, depth=1)
        assert z.tolist() == (x + y).tolist()
        batch = {"x": np.concatenate([x, 2 * x]), "y": np.concatenate([y, y])}
        (joined,) = s.run(None, batch, {"ztu_modelrt_dispatch_batch": True})
        assert joined.tolist() == (batch["x"] + batch["y"]).tolist()


def test_a_worker_that_outlives_close_never_uses_the_destroyed_context(npu):
    """At interpreter exit the engine may close the backend while workers still run (it
    gave up waiting for them); a task such a worker takes next fails, it does not call the
    runtime on a destroyed context."""
    s = session(IMAGE)
    np.testing.assert_array_equal(s.run(None, {"image": x_nchw})[0], expected_nhwc)
    s._backend.close()  # what the engine does when it abandons running tasks
    assert npu["live"] == 0
    with pytest.raises(ezrt.SessionClosedError, match="its context 0 was destroyed"):
        s.run(None, {"image": x_nchw})
    s.close()
    assert npu.violations() == ""
