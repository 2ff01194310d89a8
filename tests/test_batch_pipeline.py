"""Batch dispatch through run() and the run_pipeline sliding window."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

import ezrt

from .conftest import ones

BATCH = {"ztu_modelrt_dispatch_batch": True}


def frames(n, offset=0.0):
    return [np.full((1, 4), i + offset, np.float32) for i in range(n)]


# ---------------------------------------------------------------- batch dispatch


def test_batch_outputs_of_any_shape_join_along_axis0(batchy_model):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with ezrt.InferenceSession(batchy_model, provider_options={"threads_per_core": 3}) as session:
        pair, total = session.run(None, {"x": x}, BATCH)
    # each sample gives pair [2, 4] (dim 0 is 2, not 1) and a rank-0 total
    assert pair.shape == (6, 4) and total.shape == (3,)
    for b in range(3):
        np.testing.assert_array_equal(pair[2 * b], x[b])
        np.testing.assert_array_equal(pair[2 * b + 1], 2 * x[b])
    np.testing.assert_allclose(total, x.sum(axis=1))


def test_batch_matches_running_each_sample(add_model):
    rng = np.random.default_rng(3)
    a, b = rng.random((8, 4), dtype=np.float32), rng.random((8, 4), dtype=np.float32)
    with ezrt.InferenceSession(
        add_model, provider_options={"threads_per_core": 2, "max_queue_size": 2}
    ) as session:
        total, prod = session.run(None, {"a": a, "b": b}, BATCH)
        single = [session.run(None, {"a": a[i : i + 1], "b": b[i : i + 1]}) for i in range(8)]
    np.testing.assert_array_equal(total, np.concatenate([s[0] for s in single]))
    np.testing.assert_array_equal(prod, np.concatenate([s[1] for s in single]))


def test_batch_flag_via_onnxruntime_run_options_and_strings(add_model):
    options = ort.RunOptions()
    options.add_run_config_entry("ztu_modelrt_dispatch_batch", "1")
    a = np.ones((5, 4), np.float32)
    with ezrt.InferenceSession(add_model) as session:
        assert session.run(["sum"], [a, a], options)[0].shape == (5, 4)
        assert session.run(["sum"], [a, a], {"ztu_modelrt_dispatch_batch": "yes"})[0].shape == (
            5,
            4,
        )
        # flag off, or absent from RunOptions: an ordinary run, so the batch shape is rejected
        for off in ({"ztu_modelrt_dispatch_batch": False}, ort.RunOptions(), None):
            with pytest.raises(ezrt.InvalidArgumentError, match="Got invalid dimensions for input"):
                session.run(["sum"], [a, a], off)


def test_run_options_errors(add_model):
    with ezrt.InferenceSession(add_model) as session:
        with pytest.raises(RuntimeError, match="ztu_modelrt_dispatch_batch must be a boolean"):
            session.run(None, [ones(), ones()], {"ztu_modelrt_dispatch_batch": "perhaps"})
        with pytest.raises(ezrt.InvalidArgumentError, match="Unknown run_options key: 'batch'"):
            session.run(None, [ones(), ones()], {"batch": True})
        with pytest.raises(ezrt.InvalidTypeError, match="run_options must be a dict"):
            session.run(None, [ones(), ones()], 42)


@pytest.mark.parametrize(
    "feed, message",
    [
        (
            {"a": np.ones((3, 4), np.float32), "b": np.ones((2, 4), np.float32)},
            "Batch size mismatch across inputs: 'a' has 3, 'b' has 2",
        ),
        (
            {"a": np.ones((0, 4), np.float32), "b": np.ones((0, 4), np.float32)},
            "Batch size must be greater than 0",
        ),
        (
            {"a": np.ones((3, 5), np.float32), "b": np.ones((3, 5), np.float32)},
            r"Batch input 'a' shape mismatch: expected \[3, 4\], got \[3, 5\]",
        ),
        (
            {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)},
            "Input rank mismatch: expected 2, got 1",
        ),
    ],
)
def test_batch_input_errors(add_model, feed, message):
    with (
        ezrt.InferenceSession(add_model) as session,
        pytest.raises(ezrt.InvalidArgumentError, match=message),
    ):
        session.run(None, feed, BATCH)


def test_batch_needs_a_leading_dim_of_one(matmul_model, batchy_model):
    from onnx import helper

    from .conftest import FLOAT, build_model, tensor

    model = build_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor("x", FLOAT, [2, 3])],
        [tensor("y", FLOAT, [2, 3])],
    )
    with (
        ezrt.InferenceSession(model) as session,
        pytest.raises(
            ezrt.InvalidArgumentError,
            match=r"Batch mode requires model input batch dimension == 1 \(input 'x' has 2\)",
        ),
    ):
        session.run(None, np.ones((4, 3), np.float32), BATCH)


def test_every_failed_sample_is_reported(add_model, faults):
    faults.should_fail = lambda inputs: inputs[0][0, 0] in (1.0, 3.0)
    a = np.arange(5, dtype=np.float32)[:, None].repeat(4, axis=1)
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:
        with pytest.raises(ezrt.BatchInferenceError) as info:
            session.run(None, {"a": a, "b": np.ones_like(a)}, BATCH)
        faults.should_fail = lambda inputs: False  # the session keeps working after the failure
        np.testing.assert_array_equal(
            session.run(["sum"], {"a": a, "b": np.ones_like(a)}, BATCH)[0], a + 1
        )
    error = info.value
    assert error.errors == {1: "ValueError: injected failure", 3: "ValueError: injected failure"}
    assert error.batch_size == 5
    assert (
        "2 of 5 samples failed in batch mode: sample 1: ValueError: injected failure; sample 3:"
        in str(error)
    )
    assert isinstance(error, ezrt.InferenceError) and isinstance(error, RuntimeError)


def test_batch_spreads_samples_over_the_workers(add_model):
    seen = set()
    real = ezrt.backends.onnxruntime.OrtWorker.run
    barrier = threading.Barrier(2, timeout=20)

    def spy(self, request):
        seen.add(threading.current_thread().name)
        if len(seen) <= 2 and request.inputs["a"][0, 0] < 2:
            barrier.wait()  # the first two samples must be running at the same time
        return real(self, request)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ezrt.backends.onnxruntime.OrtWorker, "run", spy)
        a = np.arange(8, dtype=np.float32)[:, None].repeat(4, axis=1)
        with ezrt.InferenceSession(
            add_model, provider_options={"threads_per_core": 2, "max_queue_size": 4}
        ) as session:
            total = session.run(["sum"], [a, a], BATCH)[0]
    np.testing.assert_array_equal(total, 2 * a)
    assert len(seen) == 2


# ---------------------------------------------------------------- run_pipeline


def test_pipeline_returns_the_result_depth_calls_ago(add_model):
    with ezrt.InferenceSession(add_model) as session:
        outputs = [session.run_pipeline([f, ones()], depth=3) for f in frames(7)]
    assert outputs[:3] == [None, None, None]
    for k, out in enumerate(outputs[3:]):
        assert len(out) == 2 and out[0][0, 0] == k + 1.0  # frame k: k + 1


def test_pipeline_reset_and_depth_change_start_a_new_window(add_model):
    with ezrt.InferenceSession(add_model) as session:
        assert session.run_pipeline([ones(value=0), ones()], depth=2) is None
        assert session.run_pipeline([ones(value=1), ones()], depth=2) is None
        assert session.run_pipeline([ones(value=2), ones()], depth=2)[0][0, 0] == 1.0
        assert session.run_pipeline([ones(value=3), ones()], depth=2, reset=True) is None
        # a new depth starts a new window holding only frame 4 (frame 3's result is dropped)
        assert session.run_pipeline([ones(value=4), ones()], depth=1) is None
        assert session.run_pipeline([ones(value=5), ones()], depth=1)[0][0, 0] == 5.0


def test_flush_returns_what_is_left_in_order(add_model):
    with ezrt.InferenceSession(add_model) as session:
        for f in frames(5):
            session.run_pipeline([f, ones()], depth=3)
        rest = session.flush_pipeline()
        assert [r[0][0, 0] for r in rest] == [3.0, 4.0, 5.0]
        assert session.flush_pipeline() == []
        assert session.run_pipeline([ones(), ones()], depth=3) is None  # the window restarts


def test_pipeline_errors_surface_at_their_frame(add_model, faults):
    faults.should_fail = lambda inputs: inputs[0][0, 0] == 1.0
    with ezrt.InferenceSession(add_model) as session:
        assert session.run_pipeline([ones(value=0), ones()], depth=1) is None
        assert session.run_pipeline([ones(value=1), ones()], depth=1)[0][0, 0] == 1.0
        with pytest.raises(ValueError, match="injected failure"):
            session.run_pipeline([ones(value=2), ones()], depth=1)  # returns frame 1: failed
        assert session.run_pipeline([ones(value=3), ones()], depth=1)[0][0, 0] == 3.0
        session.run_pipeline([ones(value=1), ones()], depth=1)
        rest = session.flush_pipeline(return_exceptions=True)
        assert isinstance(rest[0], ValueError)


def test_pipeline_argument_errors(add_model):
    with ezrt.InferenceSession(add_model) as session:
        with pytest.raises(ezrt.InvalidArgumentError, match="pipeline depth must be > 0"):
            session.run_pipeline([ones(), ones()], depth=0)
        for bad in (1.5, "3", True):
            with pytest.raises(ezrt.InvalidTypeError, match="pipeline depth must be an integer"):
                session.run_pipeline([ones(), ones()], depth=bad)
        with pytest.raises(ezrt.InvalidArgumentError, match="Input list size mismatch"):
            session.run_pipeline([ones()])


def test_pipeline_from_several_threads_keeps_every_frame(add_model):
    results = []
    lock = threading.Lock()
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:

        def feed(offset):
            for f in frames(50, offset):
                out = session.run_pipeline([f, ones()], depth=4)
                if out is not None:
                    with lock:
                        results.append(float(out[0][0, 0]))

        threads = [threading.Thread(target=feed, args=(1000.0 * t,)) for t in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        results.extend(float(r[0][0, 0]) for r in session.flush_pipeline())
    expected = sorted(i + 1000.0 * t + 1 for t in range(3) for i in range(50))
    assert sorted(results) == expected
