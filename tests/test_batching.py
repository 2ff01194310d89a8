"""Dynamic batching (``max_batch_size``): queued tasks share one run and each still gets its
own result, in order, exactly once; a bad task fails only itself; cancel and deadlines hold
per task."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import ezrt

from .conftest import FLOAT, WAIT, Collector, build_model, tensor


@pytest.fixture(scope="module")
def free_add() -> bytes:
    """a, b: float [N, 4] -> sum = a + b (N free: batchable)."""
    return build_model(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        [tensor("a", FLOAT, ["N", 4]), tensor("b", FLOAT, ["N", 4])],
        [tensor("sum", FLOAT, ["N", 4])],
    )


@pytest.fixture(scope="module")
def free_conv() -> bytes:
    """image [N, 3, 8, 8] -> a 3x3 convolution with 4 filters (N free)."""
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    return build_model(
        [helper.make_node("Conv", ["image", "w"], ["out"], pads=[1, 1, 1, 1])],
        [tensor("image", FLOAT, ["N", 3, 8, 8])],
        [tensor("out", FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )


def _pair(value: float):
    return {"a": np.full((1, 4), value, np.float32), "b": np.ones((1, 4), np.float32)}


def batched(model: bytes, **options):
    options = {"max_batch_size": 8, "max_queue_size": 64, **options}
    return ezrt.InferenceSession(model, provider_options=options)


def test_each_task_gets_its_own_result_in_order(free_add, faults):
    collector = Collector()
    with batched(free_add) as session:
        faults.close_gate()  # hold the worker so that the queue fills: batches form
        for i in range(40):
            session.run_async(None, _pair(i), collector, i)
        faults.open_gate()
        calls = collector.wait_for(40)
        stats = session.stats()
    assert [u for _, u, _ in calls] == list(range(40))  # submission order
    assert [r[0][0, 0] for r, _, _ in calls] == [i + 1.0 for i in range(40)]
    assert stats.completed == 40 and max(stats.batch_sizes) == 8
    assert sum(size * runs for size, runs in stats.batch_sizes.items()) == 40


def test_results_equal_unbatched_ones(free_conv):
    rng = np.random.default_rng(1)
    images = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(24)]
    reference = ort.InferenceSession(free_conv, providers=["CPUExecutionProvider"])
    expected = [reference.run(None, {"image": image})[0] for image in images]
    with batched(free_conv, max_batch_size=6, batch_timeout_us=2000) as session:
        futures = [session.submit(None, {"image": image}) for image in images]
        outputs = [future.result(WAIT)[0] for future in futures]
        assert max(session.stats().batch_sizes) > 1
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape and got.flags.owndata
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_bad_task_fails_only_itself(free_add, faults):
    faults.should_fail = lambda inputs: bool((inputs[0] == -1).any())
    collector = Collector()
    with batched(free_add) as session:
        faults.close_gate()
        for i in range(16):
            session.run_async(None, _pair(-1 if i == 5 else i), collector, i)
        faults.open_gate()
        calls = collector.wait_for(16)
    for results, index, err in calls:
        if index == 5:
            assert results is None and "injected failure" in err
        else:
            assert err == "" and results[0][0, 0] == index + 1.0


def test_cancelled_and_expired_tasks_leave_their_batch(free_add, faults):
    with batched(free_add) as session:
        faults.close_gate()
        blocker = session.submit(None, _pair(0))
        faults.wait_started()
        futures = [session.submit(None, _pair(i), deadline=60) for i in range(1, 9)]
        expired = session.submit(None, _pair(99), deadline=0)
        assert futures[2].cancel() and futures[6].cancel()
        faults.open_gate()
        assert blocker.result(WAIT)[0][0, 0] == 1.0
        for i, future in enumerate(futures, start=1):
            if i in (3, 7):
                assert future.cancelled()
            else:
                assert future.result(WAIT)[0][0, 0] == i + 1.0
        with pytest.raises(ezrt.DeadlineExceededError):
            expired.result(WAIT)
        stats = session.stats()
    assert stats.completed == 7 and stats.cancelled == 2 and stats.expired == 1


def test_tasks_that_cannot_share_a_run_run_alone(free_add):
    options = ort.RunOptions()
    with batched(free_add, batch_timeout_us=1000) as session:
        futures = [
            session.submit(None, _pair(1)),
            session.submit(None, _pair(2), options),  # run options: alone
            session.submit(
                None, {"a": np.ones((3, 4), np.float32), "b": np.ones((3, 4), np.float32)}
            ),
            session.submit(["sum"], _pair(4)),  # other outputs asked for: its own batch
        ]
        outs = [future.result(WAIT)[0] for future in futures]
    assert [o.shape for o in outs] == [(1, 4), (1, 4), (3, 4), (1, 4)]
    assert [o[0, 0] for o in outs] == [2.0, 3.0, 2.0, 5.0]


def test_exactly_once_under_concurrent_producers(free_add):
    with batched(free_add, threads_per_core=2, max_batch_size=5) as session:

        def produce(base):
            futures = [session.submit(None, _pair(base + i)) for i in range(200)]
            return [future.result(WAIT)[0][0, 0] for future in futures]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(produce, (0, 1000, 2000, 3000)))
        stats = session.stats()
    for base, values in zip((0, 1000, 2000, 3000), results):
        assert values == [base + i + 1.0 for i in range(200)]
    assert stats.completed == 800 and stats.submitted == 800


def test_models_without_a_free_batch_axis_are_refused_at_construction(add_model):
    with pytest.raises(ezrt.InvalidArgumentError, match="free leading \\(batch\\) axis"):
        ezrt.InferenceSession(add_model, provider_options={"max_batch_size": 4})
    with ezrt.InferenceSession(add_model, provider_options={"max_batch_size": 1}) as session:
        assert session.stats().batch_sizes == {}  # 1 means off


def test_batch_options_have_ranges(free_add):
    for key, value in (("max_batch_size", 0), ("max_batch_size", 5000), ("batch_timeout_us", -1)):
        with pytest.raises(ezrt.InvalidArgumentError, match=key):
            ezrt.InferenceSession(free_add, provider_options={key: value})
    assert ezrt.make_provider_options(max_batch_size=8)["max_batch_size"] == 8


def test_a_lone_task_waits_for_company_only_with_a_timeout(free_add):
    # batch_timeout_us=0 (the default): a task with nothing queued behind it runs at once;
    # with a timeout the worker holds it that long, hoping for more. (A lone run() needs no
    # company: it runs on the caller's thread.)
    def lone_task(timeout_us):
        with batched(free_add, batch_timeout_us=timeout_us) as session:
            session.submit(None, _pair(0)).result(WAIT)  # warm up
            started = time.perf_counter()
            assert session.submit(None, _pair(1)).result(WAIT)[0][0, 0] == 2.0
            return time.perf_counter() - started

    waited = lone_task(300_000)
    assert waited >= 0.3
    assert lone_task(0) < waited / 3


def test_feed_batcher_joins_and_cuts_tasks_of_mixed_sizes():
    from ezrt.backends.base import Request
    from ezrt.io.batch import FeedBatcher

    batcher = FeedBatcher(["a", "b"], Request)
    rng = np.random.default_rng(2)
    sizes = [1, 3, 2]
    payloads = [
        Request({"a": rng.random((n, 4), np.float32), "b": rng.random((n, 4), np.float32)}, None)
        for n in sizes
    ]
    assert len({batcher.key(p) for p in payloads}) == 1
    assert [batcher.size(p) for p in payloads] == sizes
    joined = batcher.combine(payloads)
    assert joined.inputs["a"].shape == (6, 4)
    outputs = [joined.inputs["a"] + joined.inputs["b"], joined.inputs["a"] * 2]
    parts = batcher.split(outputs, sizes)
    for payload, (total, double) in zip(payloads, parts):
        np.testing.assert_array_equal(total, payload.inputs["a"] + payload.inputs["b"])
        np.testing.assert_array_equal(double, payload.inputs["a"] * 2)
        assert total.flags.owndata and double.flags.owndata  # as an unbatched run's
    with pytest.raises(ValueError):
        batcher.split([outputs[0][:5]], sizes)  # an output off the batch axis: rerun alone


def test_feed_batcher_keys_tell_apart_what_cannot_share_a_run():
    from ezrt.backends.base import Request
    from ezrt.io.batch import FeedBatcher

    batcher = FeedBatcher(["a"], Request)

    def key(value, fetch=None, options=None):
        return batcher.key(Request({"a": value}, fetch, options))

    base = key(np.zeros((1, 4), np.float32))
    assert key(np.zeros((5, 4), np.float32)) == base  # only axis 0 differs
    assert key(np.zeros((1, 4), np.float64)) != base  # dtype
    assert key(np.zeros((1, 4), ">f4")) != base  # byte order
    assert key(np.zeros((1, 5), np.float32)) != base  # a trailing dim
    assert key(np.zeros((1, 4), np.float32), ("sum",)) != base  # other outputs
    assert key(np.zeros((1, 4), np.float32), None, ort.RunOptions()) is None
    assert key(np.float32(1.0)) is None and key(np.array(1.0, np.float32)) is None
