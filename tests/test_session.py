"""InferenceSession on ONNX Runtime: construction, introspection, input feeds, outputs, layouts."""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import onnxruntime as ort
import pytest

import ezrt
from ezrt.backends.onnxruntime import allowed_cpus

from .conftest import WAIT, assert_same_error, ones


@pytest.fixture
def add_session(add_model):
    with ezrt.InferenceSession(add_model) as session:
        yield session


# ---------------------------------------------------------------- construction


def test_path_bytes_and_pathlike_all_work(add_model, tmp_path):
    path = tmp_path / "add.onnx"
    path.write_bytes(add_model)
    for source in (add_model, bytearray(add_model), str(path), path):
        with ezrt.InferenceSession(source) as session:
            assert session.run(None, [ones(), ones()])[0].tolist() == [[2.0] * 4]


def test_unknown_keyword_argument_is_a_type_error(add_model):
    with pytest.raises(TypeError, match="use_weight_frm"):
        ezrt.InferenceSession(add_model, use_weight_frm=None)  # type: ignore[call-arg]


def test_missing_file_fails_as_in_onnxruntime(tmp_path):
    missing = tmp_path / "nope.onnx"
    error = assert_same_error(
        lambda: ezrt.InferenceSession(missing), lambda: ort.InferenceSession(missing)
    )
    assert str(missing) in str(error) and isinstance(error, ezrt.InvalidArgumentError)


def test_not_a_model_fails_as_in_onnxruntime():
    error = assert_same_error(
        lambda: ezrt.InferenceSession(b"this is not an onnx model"),
        lambda: ort.InferenceSession(b"this is not an onnx model"),
    )
    assert isinstance(error, ezrt.EzrtError)
    error = assert_same_error(lambda: ezrt.InferenceSession(12), lambda: ort.InferenceSession(12))
    assert isinstance(error, ezrt.InvalidTypeError)


def test_option_errors_come_before_the_model_is_read(tmp_path):
    # The path does not exist: the option error must still win (upstream's order).
    with pytest.raises(ezrt.InvalidArgumentError, match="max_queue_size must be > 0"):
        ezrt.InferenceSession(tmp_path / "missing.onnx", provider_options={"max_queue_size": 0})


def test_rknn_bytes_are_recognised_whatever_the_name(tmp_path, monkeypatch):
    monkeypatch.setenv("EZRT_RKNN_LIBRARY", str(tmp_path / "no" / "librknnrt.so"))
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"RKNN\x00\x00\x00\x00" + b"\x00" * 64)
    # an RKNN file goes to the RKNN backend (not onnxruntime), which needs its runtime
    with pytest.raises(ezrt.BackendUnavailableError, match=r"librknnrt\.so was not found"):
        ezrt.InferenceSession(fake)


def test_use_weight_from_type_check(add_model):
    with pytest.raises(
        ezrt.InvalidTypeError, match="use_weight_from must be an InferenceSession or None"
    ):
        ezrt.InferenceSession(add_model, use_weight_from="master")  # type: ignore[arg-type]


def test_use_weight_from_shares_the_masters_session(add_model, relu_model):
    with ezrt.InferenceSession(add_model) as master:
        with ezrt.InferenceSession(
            add_model, use_weight_from=master, provider_options={"threads_per_core": 2}
        ) as slave:
            assert slave._backend.master is master._backend.master
            assert slave.run(["prod"], [ones(value=3), ones(value=2)])[0][0, 0] == 6.0
        with pytest.raises(ezrt.InvalidArgumentError, match="must open the same model"):
            ezrt.InferenceSession(relu_model, use_weight_from=master)
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match="use_weight_from cannot be combined with custom-op loading",
        ):
            ezrt.InferenceSession(
                add_model, use_weight_from=master, provider_options={"custom_op_paths": ["x.so"]}
            )


def test_custom_op_library_errors(add_model, tmp_path):
    with pytest.raises(ezrt.InvalidArgumentError, match="custom_op_paths: library not found: "):
        ezrt.InferenceSession(
            add_model, provider_options={"custom_op_paths": [tmp_path / "none.so"]}
        )
    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_bytes(b"\x7fELF not really")
    with pytest.raises(ezrt.InvalidArgumentError, match="is not an ONNX Runtime custom-op library"):
        ezrt.InferenceSession(add_model, provider_options={"custom_op_paths": str(not_a_library)})


def test_options_that_do_not_apply_to_onnxruntime_say_why(add_model):
    with pytest.raises(
        ezrt.InvalidArgumentError, match="zero_copy_layout selects an RKNN NPU memory layout"
    ):
        ezrt.InferenceSession(add_model, provider_options={"zero_copy_layout": "native"})
    with pytest.raises(
        ezrt.InvalidArgumentError, match="custom_op_default_path loads RKNN plugins"
    ):
        ezrt.InferenceSession(add_model, provider_options={"custom_op_default_path": True})


def test_schedule_core_must_be_usable(add_model):
    too_big = max(allowed_cpus()) + 1
    with pytest.raises(
        ezrt.InvalidArgumentError,
        match=f"schedule core {too_big} is not a CPU this process may use",
    ):
        ezrt.InferenceSession(add_model, provider_options={"schedule": [0, too_big]})


def test_tp_mode_cores_must_be_usable(add_model):
    if len(allowed_cpus()) >= 3:
        pytest.skip("needs a machine with fewer than 3 CPUs")
    with pytest.raises(ezrt.InvalidArgumentError, match="tp_mode '0,1,2' needs CPUs"):
        ezrt.InferenceSession(add_model, provider_options={"tp_mode": "0,1,2"})


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux affinity")
def test_schedule_pins_each_worker_to_its_cpu(add_model):
    seen = {}
    worker = ezrt.backends.onnxruntime.OrtWorker

    def spy(real):
        def run(self, request):
            seen[threading.current_thread().name] = os.sched_getaffinity(0)
            return real(self, request)

        return run

    cores = allowed_cpus()[:2]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker, "run", spy(worker.run))  # a task among others
        patch.setattr(worker, "_alone", spy(worker._alone))  # a task finding the engine idle
        with ezrt.InferenceSession(
            add_model, provider_options={"schedule": cores, "max_queue_size": 8}
        ) as session:
            session.run(None, [ones(), ones()], {"ztu_modelrt_dispatch_batch": False})
            session.run(
                None,
                [np.ones((6, 4), np.float32), np.ones((6, 4), np.float32)],
                {"ztu_modelrt_dispatch_batch": True},
            )
    workers = {name: cpus for name, cpus in seen.items() if name.startswith("ezrt-worker")}
    for name, affinity in workers.items():
        core = int(name.rsplit("core", 1)[1])
        assert affinity == {core}, (name, affinity)
    assert len(workers) == len(cores)
    # the lone run() ran on the caller's own thread, which ezrt never pins
    assert seen[threading.current_thread().name] == set(allowed_cpus())


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or not {0, 1} <= set(allowed_cpus()),
    reason="needs Linux affinity and CPUs 0 and 1",
)
def test_tp_mode_pins_onnxruntime_pool_threads_to_the_cpus_it_names(add_model):
    # tp_mode "0,1": the worker runs on CPUs 0-1 and ORT's one pool thread on CPU 1 (ORT
    # numbers processors from 1: an id written 0-based would put it on CPU 0, beside the
    # worker's own share of the work).
    # ORT may pin a pool thread from inside it once it first runs: on a loaded machine that
    # can be after the session is built, so the check waits for it (up to WAIT).
    before = set(os.listdir("/proc/self/task"))
    with ezrt.InferenceSession(add_model, provider_options={"tp_mode": "0,1"}) as session:
        session.run(["sum"], [ones(), ones()])
        deadline = time.monotonic() + WAIT
        while True:
            started = set(os.listdir("/proc/self/task")) - before
            affinities = [os.sched_getaffinity(int(tid)) for tid in started]
            if {1} in affinities or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        workers = [t for t in threading.enumerate() if t.name.startswith("ezrt-worker")]
        worker_cpus = [os.sched_getaffinity(t.native_id) for t in workers]
    assert worker_cpus == [{0, 1}]
    assert affinities.count({1}) == 1 and {0} not in affinities, affinities


def test_providers_onnxruntime_cannot_use_are_warned_about_and_dropped(add_model):
    with pytest.warns(UserWarning, match="Specified provider 'TensorrtExecutionProvider' is not"):
        session = ezrt.InferenceSession(add_model, providers=["TensorrtExecutionProvider"])
    with session:
        assert session.get_providers() == ["CPUExecutionProvider"]
    # ORT's own list of what it has always works (it includes AzureExecutionProvider).
    with ezrt.InferenceSession(add_model, providers=ort.get_available_providers()) as session:
        assert "CPUExecutionProvider" in session.get_providers()
        assert session.run(["sum"], [ones(), ones()])[0][0, 0] == 2.0


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA present")
def test_cuda_requested_without_cuda_falls_back_with_onnxruntimes_warning(add_model):
    with pytest.warns(UserWarning, match="'CUDAExecutionProvider' is not in available provider"):
        session = ezrt.InferenceSession(
            add_model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    with session:
        assert session.get_providers() == ["CPUExecutionProvider"]


def test_user_session_options_are_used_and_left_as_they_were(add_model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with ezrt.InferenceSession(add_model, options, provider_options={"schedule": [0]}) as session:
        assert session.run(["sum"], [ones(), ones()])[0][0, 0] == 2.0
    assert options.intra_op_num_threads == 3


# ---------------------------------------------------------------- introspection


def test_introspection_matches_onnxruntime(add_model):
    reference = ort.InferenceSession(add_model, providers=["CPUExecutionProvider"])
    with ezrt.InferenceSession(add_model) as session:
        for mine, theirs in zip(
            session.get_inputs() + session.get_outputs(),
            reference.get_inputs() + reference.get_outputs(),
        ):
            assert (mine.name, mine.shape, mine.type) == (theirs.name, theirs.shape, theirs.type)
        assert session.input_names == ["a", "b"] and session.output_names == ["sum", "prod"]
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert "CPUExecutionProvider" in session.get_provider_options()
        meta = session.get_modelmeta()
        assert meta.custom_metadata_map == {"author": "tests"}
        assert meta.version == reference.get_modelmeta().version
        assert "ezrt.InferenceSession open" in repr(session)
    assert "closed" in repr(session)


def test_symbolic_dims_are_reported_as_names(relu_model):
    with ezrt.InferenceSession(relu_model) as session:
        assert session.get_inputs()[0].shape == ["N", 3]


def test_nhwc_layout_reports_and_accepts_nhwc(conv_model):
    image = np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5)
    with ezrt.InferenceSession(conv_model, provider_options={"layout": "nhwc"}) as session:
        assert session.get_inputs()[0].shape == [1, 4, 5, 3]
        out = session.run(None, {"image": image.transpose(0, 2, 3, 1)})[0]
        np.testing.assert_array_equal(out[0, 0], image[0, 2])
        # The NHWC layout is ezrt's, so the check is ezrt's (ORT would take this NCHW feed).
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match=r"Input 'image' shape mismatch: expected \[1, 4, 5, 3\], got \[1, 3, 4, 5\]",
        ):
            session.run(None, {"image": image})


@pytest.mark.parametrize("layout", ["nchw", "original", "nchw_software", "any"])
def test_other_layouts_feed_the_models_own_layout(conv_model, layout):
    image = np.arange(60, dtype=np.float32).reshape(1, 3, 4, 5)
    with ezrt.InferenceSession(conv_model, provider_options={"layout": layout}) as session:
        assert session.get_inputs()[0].shape == [1, 3, 4, 5]
        np.testing.assert_array_equal(session.run(None, [image])[0][0, 0], image[0, 2])


# ---------------------------------------------------------------- input feeds


def test_every_feed_form(add_session):
    a, b = ones(value=2), ones(value=5)
    expected = [[7.0] * 4]
    assert add_session.run(None, {"a": a, "b": b})[0].tolist() == expected
    assert add_session.run(None, [a, b])[0].tolist() == expected
    assert add_session.run(None, (a, b))[0].tolist() == expected
    # plain Python values take the model's dtype
    assert add_session.run(None, {"a": [[2, 2, 2, 2]], "b": [[5.0] * 4]})[0].tolist() == expected


def test_single_array_feed(relu_model):
    with ezrt.InferenceSession(relu_model) as session:
        x = np.array([[-1.0, 0.0, 2.0]], np.float32)
        assert session.run(None, x)[0].tolist() == [[0.0, 0.0, 2.0]]
        assert session.run(input_feed=x, output_names=None)[0].shape == (1, 3)


@pytest.mark.parametrize(
    "feed, error, message",
    [
        (
            np.ones((1, 4), np.float32),
            ezrt.InvalidArgumentError,
            "Model expects 2 inputs, but a single array was given",
        ),
        ([ones()], ezrt.InvalidArgumentError, "Input list size mismatch: expected 2, got 1"),
        ("ab", ezrt.InvalidTypeError, "input_feed must be a numpy array, list/tuple, or dict"),
        (None, ezrt.InvalidTypeError, "input_feed must be a numpy array, list/tuple, or dict"),
        (
            {"a": ones(), "b": np.float32(1)},
            ezrt.InvalidArgumentError,
            "Input rank mismatch: expected 2, got 0",
        ),
    ],
)
def test_errors_of_ezrts_own_feed_forms(add_session, feed, error, message):
    # ezrt's additions to ORT's feeds (one array, a list, numpy scalars) check themselves.
    with pytest.raises(error, match=message):
        add_session.run(None, feed)
    assert add_session.run(["sum"], [ones(), ones()])[0][0, 0] == 2.0


@pytest.mark.parametrize(
    "feed",
    [
        {"a": ones()},
        {"a": ones(), "b": ones(), "c": ones()},
        {"a": ones(), "c": ones()},
        {"a": ones(), "b": None},
        {"a": ones(), "b": np.ones((1, 4))},
        {"a": ones(), "b": np.ones((1, 4), np.int32)},
        {"a": ones(), "b": np.ones((1, 4), object)},
        {"a": ones(), "b": [["x"] * 4]},
        {"a": ones(), "b": [[1.5], [2, 3]]},
        {"a": ones(), "b": np.ones((4,), np.float32)},
        {"a": ones(), "b": np.ones((1, 5), np.float32)},
        {"a": ones(), "b": np.ones((1, 4, 1), np.float32)},
    ],
    ids=lambda feed: ",".join(f"{k}={type(v).__name__}" for k, v in feed.items()),
)
def test_feeds_onnxruntime_refuses_fail_as_in_onnxruntime(add_model, add_session, feed):
    reference = ort.InferenceSession(add_model, providers=["CPUExecutionProvider"])
    assert_same_error(lambda: add_session.run(None, feed), lambda: reference.run(None, feed))
    # submit refuses it at once, or its future holds the same error
    assert_same_error(
        lambda: add_session.submit(None, feed).result(timeout=20),
        lambda: reference.run(None, feed),
    )
    # the session keeps working
    assert add_session.run(["sum"], [ones(), ones()])[0][0, 0] == 2.0


def test_python_values_convert_as_in_onnxruntime(reshape_model):
    # ORT converts a list with the input's dtype (here it truncates 2.5 to 2): so does ezrt.
    reference = ort.InferenceSession(reshape_model, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((1, 6), np.float32), "shape": [2.5, 3]}
    with ezrt.InferenceSession(reshape_model) as session:
        assert session.run(None, feed)[0].shape == reference.run(None, feed)[0].shape == (2, 3)


def test_symbolic_dims_accept_any_size(relu_model):
    reference = ort.InferenceSession(relu_model, providers=["CPUExecutionProvider"])
    with ezrt.InferenceSession(relu_model) as session:
        for n in (0, 1, 7):
            assert session.run(None, np.ones((n, 3), np.float32))[0].shape == (n, 3)
        bad = {"x": np.ones((2, 4), np.float32)}
        assert_same_error(lambda: session.run(None, bad), lambda: reference.run(None, bad))


def test_non_contiguous_and_byte_swapped_arrays(add_session):
    wide = np.arange(8, dtype=np.float32).reshape(1, 8)
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    swapped = np.ones((1, 4), dtype=">f4")
    result = add_session.run(["sum"], {"a": strided, "b": swapped})[0]
    assert result.tolist() == [[1.0, 3.0, 5.0, 7.0]]


def test_run_error_from_onnxruntime_is_onnxruntimes_and_an_inference_error(reshape_model):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    reference = ort.InferenceSession(reshape_model, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((1, 6), np.float32), "shape": np.array([4, 4])}
    with ezrt.InferenceSession(reshape_model) as session:
        error = assert_same_error(
            lambda: session.run(None, feed), lambda: reference.run(None, feed)
        )
        assert isinstance(error, Fail) and isinstance(error, ezrt.InferenceError)
        assert isinstance(error.__cause__, Fail)


# ---------------------------------------------------------------- outputs


def test_output_filtering_order_and_duplicates(add_session):
    a, b = ones(value=2), ones(value=3)
    prod, total = add_session.run(["prod", "sum"], [a, b])
    assert prod[0, 0] == 6.0 and total[0, 0] == 5.0
    first, second = add_session.run(["sum", "sum"], [a, b])
    assert first.tolist() == second.tolist()
    assert len(add_session.run([], [a, b])) == 2  # empty means all, as in onnxruntime


@pytest.mark.parametrize("names", [["nope"], "sum", [1], 3, ["sum", None]])
def test_output_name_errors_are_onnxruntimes(add_model, add_session, names):
    reference = ort.InferenceSession(add_model, providers=["CPUExecutionProvider"])
    feed = {"a": ones(), "b": ones()}
    assert_same_error(lambda: add_session.run(names, feed), lambda: reference.run(names, feed))
    # the asynchronous paths refuse them before queueing, with the same error
    assert_same_error(lambda: add_session.submit(names, feed), lambda: reference.run(names, feed))


def test_outputs_keep_onnxruntime_dtypes(reshape_model):
    with ezrt.InferenceSession(reshape_model) as session:
        out = session.run(None, {"x": np.ones((1, 6), np.float32), "shape": np.array([3, 2])})[0]
        assert out.dtype == np.float32 and out.shape == (3, 2)


def test_results_match_plain_onnxruntime(add_model):
    rng = np.random.default_rng(1)
    a, b = rng.random((1, 4), dtype=np.float32), rng.random((1, 4), dtype=np.float32)
    reference = ort.InferenceSession(add_model, providers=["CPUExecutionProvider"]).run(
        None, {"a": a, "b": b}
    )
    with ezrt.InferenceSession(
        add_model, provider_options={"schedule": [0], "threads_per_core": 2}
    ) as session:
        for mine, theirs in zip(session.run(None, {"a": a, "b": b}), reference):
            np.testing.assert_array_equal(mine, theirs)


def test_no_warnings_on_a_plain_session(add_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ezrt.InferenceSession(add_model) as session:
            session.run(None, [ones(), ones()])


def test_cuda_backend_checks_without_a_gpu(add_model):
    from ezrt.backends.onnxruntime import CUDA

    with ezrt.InferenceSession(add_model, provider_options={"tp_mode": "all"}) as session:
        backend = session._backend
        backend.device = CUDA  # as if the session had said CUDA is in use
        with pytest.raises(
            ezrt.InvalidArgumentError, match=r"tp_mode .* not meaningful for CUDAExecutionProvider"
        ):
            backend._check_device()
        if CUDA in ort.get_available_providers():
            pytest.skip("a CUDA onnxruntime is installed: the fallback check does not apply")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnxruntime's own fallback warning
            with pytest.raises(
                ezrt.BackendUnavailableError,
                match="CUDAExecutionProvider could not be initialised for device 0",
            ):
                backend._cuda_session(0)
