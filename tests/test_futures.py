"""submit() futures, deadlines, asyncio (arun/aimap) and imap streams."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest

import ezrt

from .conftest import WAIT, ones


def feed(value=1.0):
    return [ones(value=value), ones()]


# ---------------------------------------------------------------- futures


def test_futures_resolve_exactly_once_with_their_own_result(add_model):
    calls = []
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 3}) as session:
        futures = [session.submit(["sum"], feed(i)) for i in range(200)]
        for future in futures:
            future.add_done_callback(calls.append)
        results = [future.result(WAIT)[0][0, 0] for future in futures]
    assert results == [i + 1.0 for i in range(200)]
    assert len(calls) == 200 and {id(f) for f in calls} == {id(f) for f in futures}


def test_future_carries_the_tasks_error(reshape_model):
    with ezrt.InferenceSession(reshape_model) as session:
        future = session.submit(None, {"x": np.ones((1, 6), np.float32), "shape": np.array([5, 5])})
        assert isinstance(future.exception(WAIT), ezrt.InferenceError)
        with pytest.raises(ezrt.InferenceError, match="while running Reshape node"):
            future.result()


def test_submit_validates_on_the_callers_thread(add_model):
    with ezrt.InferenceSession(add_model) as session:
        with pytest.raises(ezrt.InvalidArgumentError, match="Input list size mismatch"):
            session.submit(None, [ones()])
        with pytest.raises(
            ezrt.InvalidArgumentError, match="submit does not support ztu_modelrt_dispatch_batch"
        ):
            session.submit(None, feed(), {"ztu_modelrt_dispatch_batch": True})
        with pytest.raises(ezrt.InvalidTypeError, match="deadline must be a number of seconds"):
            session.submit(None, feed(), deadline="soon")


def test_cancel_withdraws_a_queued_task_and_frees_its_slot_at_once(add_model, faults):
    faults.close_gate()
    with ezrt.InferenceSession(
        add_model, provider_options={"max_queue_size": 2, "submit_timeout_ms": 5000}
    ) as session:
        running = session.submit(["sum"], feed(0))
        faults.wait_started()
        queued = [session.submit(["sum"], feed(i)) for i in (1, 2)]  # the queue is now full
        assert running.cancel() is False  # already running
        assert queued[0].cancel() is True and queued[0].cancelled()
        started = time.monotonic()
        extra = session.submit(["sum"], feed(3))  # admitted at once: the slot is free
        assert time.monotonic() - started < 1.0
        faults.open_gate()
        assert [f.result(WAIT)[0][0, 0] for f in (running, queued[1], extra)] == [1.0, 3.0, 4.0]
        stats = session.stats()
    assert faults.runs == 3  # the cancelled task never ran
    assert stats.cancelled == 1


def test_deadline_fires_on_time_under_a_saturated_queue(add_model, faults):
    faults.close_gate()
    with ezrt.InferenceSession(add_model, provider_options={"max_queue_size": 2}) as session:
        blocker = session.submit(None, feed())
        faults.wait_started()
        started = time.monotonic()
        late = session.submit(None, feed(), deadline=0.2)
        other = session.submit(None, feed())
        error = late.exception(WAIT)  # no worker frees meanwhile: the gate is still closed
        elapsed = time.monotonic() - started
        assert isinstance(error, ezrt.DeadlineExceededError) and isinstance(error, TimeoutError)
        assert "deadline exceeded" in str(error)
        assert 0.18 <= elapsed < 1.5, elapsed
        faults.open_gate()
        assert blocker.result(WAIT) and other.result(WAIT)
        assert session.stats().expired == 1
    assert faults.runs == 2


def test_deadline_also_bounds_the_admission_wait(add_model, faults):
    faults.close_gate()
    with ezrt.InferenceSession(
        add_model, provider_options={"max_queue_size": 1, "submit_timeout_ms": 10000}
    ) as session:
        session.submit(None, feed())
        faults.wait_started()
        session.submit(None, feed())  # fills the queue
        started = time.monotonic()
        future = session.submit(None, feed(), deadline=0.2)  # waits for room, at most 0.2 s
        assert time.monotonic() - started < 1.5
        assert isinstance(future.exception(WAIT), ezrt.DeadlineExceededError)
        faults.open_gate()


def test_a_deadline_met_changes_nothing(add_model):
    with ezrt.InferenceSession(add_model) as session:
        assert session.submit(["sum"], feed(2), deadline=5.0).result(WAIT)[0][0, 0] == 3.0
        assert session.stats().expired == 0


def test_close_cancel_fails_queued_futures(add_model, faults):
    faults.close_gate()
    session = ezrt.InferenceSession(add_model, provider_options={"max_queue_size": 4})
    running = session.submit(None, feed())
    faults.wait_started()
    queued = [session.submit(None, feed()) for _ in range(3)]
    closer = threading.Thread(target=session.close, kwargs={"cancel": True})
    closer.start()
    for future in queued:
        assert isinstance(future.exception(WAIT), ezrt.SessionClosedError)
    faults.open_gate()
    closer.join(WAIT)
    assert running.result(WAIT)


def test_future_done_callbacks_may_call_run(add_model):
    out = []
    done = threading.Event()
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:

        def chained(future):
            try:
                out.append(session.run(["sum"], feed(5))[0][0, 0])
            except ezrt.ReentrancyError as exc:  # done-callbacks run on a worker thread
                out.append(str(exc))
            done.set()

        session.submit(None, feed()).add_done_callback(chained)
        assert done.wait(WAIT)
    assert "cannot block on an ezrt worker thread" in out[0]


# ---------------------------------------------------------------- asyncio


def test_arun_returns_outputs(add_model):
    async def main(session):
        return await asyncio.gather(*(session.arun(["sum"], feed(i)) for i in range(50)))

    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:
        results = asyncio.run(main(session))
    assert [r[0][0, 0] for r in results] == [i + 1.0 for i in range(50)]


@pytest.fixture
def quiet_gc():
    """Freeze what earlier tests left on the heap: a full collection of it takes ~60 ms on the
    loop thread, which would be charged to ezrt. Collections of new objects still happen."""
    import gc

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


async def _ticker(stop, lateness, period=0.01):
    while not stop.is_set():
        expected = time.perf_counter() + period
        await asyncio.sleep(period)
        lateness.append(time.perf_counter() - expected)


class ControlTicker:
    """The same ticker on a plain thread. If ezrt blocked the event loop in a wait, the GIL
    is free and this thread stays on time; if the whole process stalls (a busy shared VM),
    both are late together. So the loop's lateness is judged against this one's."""

    def __init__(self, period=0.01):
        self.period, self.lateness = period, [0.0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            expected = time.perf_counter() + self.period
            time.sleep(self.period)
            self.lateness.append(time.perf_counter() - expected)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(WAIT)


async def _watched(calls, period=0.01):
    """Run the calls gathered at once beside a ticker: (results, the ticker's lateness)."""
    lateness = []
    stop = asyncio.Event()
    tick = asyncio.create_task(_ticker(stop, lateness, period))
    # The ticker must be running before the first call: run_in_executor submits as it is
    # called (inside gather's argument list), arun in the loop's next step. Started after
    # the calls, the ticker would miss the executor's burst and see ezrt's.
    await asyncio.sleep(2 * period)
    results = await asyncio.gather(*(call() for call in calls))
    stop.set()
    await tick
    return results, lateness


def _executor_lateness(run, feeds):
    """The baseline: the same calls through loop.run_in_executor, as asyncio code does it."""
    pool = concurrent.futures.ThreadPoolExecutor(2)

    async def main():
        loop = asyncio.get_running_loop()
        return await _watched([lambda f=f: loop.run_in_executor(pool, run, f) for f in feeds])

    try:
        with ControlTicker() as control:
            _, lateness = asyncio.run(main())
        return max(lateness), max(control.lateness)
    finally:
        pool.shutdown()


def _assert_loop_on_time(lateness, control, baseline):
    """ezrt's loop lateness is within twice the executor baseline's (each beyond what the
    whole process stalled during its own run), plus one ticker period."""
    base_late, base_stall = baseline
    allowed = 2 * max(0.0, base_late - base_stall) + max(control.lateness) + control.period
    assert max(lateness) <= allowed, (
        f"the event loop was late by {max(lateness):.3f} s; run_in_executor: "
        f"{base_late:.3f} s (process stalls: {max(control.lateness):.3f} / {base_stall:.3f} s)"
    )


def test_event_loop_stays_on_time_while_1000_inferences_run(add_model, faults, quiet_gc):
    # 5 ms tasks on 2 workers with room for 2 queued: 1000 requests arriving at once keep
    # the pipeline full for ~2.5 s, so almost every arun must wait for admission. Waiting on
    # the loop would hold it for seconds; ezrt waits on its admission thread instead.
    faults.delay = lambda inputs: 0.005
    feeds = [feed(i) for i in range(1000)]
    reference = ort.InferenceSession(add_model, providers=["CPUExecutionProvider"])

    def baseline_run(one):
        time.sleep(0.005)
        return reference.run(["sum"], dict(zip(("a", "b"), one)))

    baseline = _executor_lateness(baseline_run, feeds)
    options = {"threads_per_core": 2, "max_queue_size": 2}
    with (
        ezrt.InferenceSession(add_model, provider_options=options) as session,
        ControlTicker() as control,
    ):
        calls = [lambda f=f: session.arun(["sum"], f) for f in feeds]
        results, lateness = asyncio.run(_watched(calls))
        stats = session.stats()
    assert [r[0][0, 0] for r in results] == [i + 1.0 for i in range(1000)]
    assert stats.completed == 1000
    _assert_loop_on_time(lateness, control, baseline)
    assert len(lateness) >= 50  # the ticker really watched the whole run


def test_event_loop_stays_on_time_through_a_1000_item_aimap(matmul_model, quiet_gc):
    x = np.eye(256, dtype=np.float32)
    reference = ort.InferenceSession(matmul_model, providers=["CPUExecutionProvider"])
    baseline = _executor_lateness(lambda one: reference.run(None, one), [{"x": x}] * 1000)
    lateness = []

    async def main(session):
        stop = asyncio.Event()
        tick = asyncio.create_task(_ticker(stop, lateness))
        await asyncio.sleep(0.02)  # the ticker is running before the stream starts
        count = 0
        async for out in session.aimap(({"x": x} for _ in range(1000)), max_in_flight=8):
            count += out[0].shape == (256, 256)
        stop.set()
        await tick
        return count

    options = {"threads_per_core": 2, "max_queue_size": 2}
    with (
        ezrt.InferenceSession(matmul_model, provider_options=options) as session,
        ControlTicker() as control,
    ):
        assert asyncio.run(main(session)) == 1000
    assert len(lateness) >= 10
    _assert_loop_on_time(lateness, control, baseline)


def test_cancelling_the_awaiting_task_cancels_the_queued_inference(add_model, faults):
    faults.close_gate()

    async def main(session):
        blocker = session.submit(None, feed())
        await asyncio.get_running_loop().run_in_executor(None, faults.wait_started)
        waiting = asyncio.create_task(session.arun(None, feed()))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        faults.open_gate()
        await asyncio.wrap_future(blocker)

    with ezrt.InferenceSession(add_model) as session:
        asyncio.run(main(session))
        stats = session.stats()
    assert faults.runs == 1 and stats.cancelled == 1


def test_aimap_over_an_async_iterable_keeps_order(add_model):
    async def frames():
        for i in range(40):
            await asyncio.sleep(0)
            yield feed(i)

    async def main(session):
        return [out[0][0, 0] async for out in session.aimap(frames(), ["sum"])]

    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 3}) as session:
        assert asyncio.run(main(session)) == [i + 1.0 for i in range(40)]


def test_aimap_unordered_and_with_exceptions(add_model, faults):
    faults.should_fail = lambda inputs: inputs[0][0, 0] == 3.0

    async def main(session):
        return [
            out
            async for out in session.aimap(
                [feed(i) for i in range(8)], ["sum"], ordered=False, return_exceptions=True
            )
        ]

    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:
        outs = asyncio.run(main(session))
    errors = [o for o in outs if isinstance(o, Exception)]
    values = sorted(o[0][0, 0] for o in outs if not isinstance(o, Exception))
    assert len(errors) == 1 and values == [i + 1.0 for i in range(8) if i != 3]


# ---------------------------------------------------------------- imap


def test_imap_100000_items_in_order_with_bounded_memory(add_model):
    n = 100_000
    pulled = [0]

    def frames():
        for i in range(n):
            pulled[0] += 1
            yield {"a": np.full((1, 4), i, np.float32), "b": np.zeros((1, 4), np.float32)}

    options = {"threads_per_core": 2, "max_queue_size": 4}
    with ezrt.InferenceSession(add_model, provider_options=options) as session:
        window = 2 + 4
        expected = 0
        most_ahead = 0
        for out in session.imap(frames(), ["sum"]):
            assert out[0][0, 0] == expected
            expected += 1
            most_ahead = max(most_ahead, pulled[0] - expected)
    assert expected == n
    assert most_ahead <= window  # never more than the window in flight, however long the input


def test_imap_errors_surface_at_their_item_or_are_yielded(add_model, faults):
    faults.should_fail = lambda inputs: inputs[0][0, 0] == 2.0
    with ezrt.InferenceSession(add_model) as session:
        seen = []
        with pytest.raises(ValueError, match="injected failure"):
            for out in session.imap((feed(i) for i in range(5)), ["sum"]):
                seen.append(out[0][0, 0])
        assert seen == [1.0, 2.0]
        outs = list(session.imap((feed(i) for i in range(5)), ["sum"], return_exceptions=True))
        assert isinstance(outs[2], ValueError) and [
            o[0][0, 0] for i, o in enumerate(outs) if i != 2
        ] == [1.0, 2.0, 4.0, 5.0]


def test_imap_unordered_yields_everything(add_model, faults):
    faults.delay = lambda inputs: 0.2 if inputs[0][0, 0] == 0 else 0.0
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 3}) as session:
        outs = [
            o[0][0, 0] for o in session.imap((feed(i) for i in range(12)), ["sum"], ordered=False)
        ]
    assert sorted(outs) == [i + 1.0 for i in range(12)]
    assert outs[0] != 1.0  # the slow first item did not hold the others back


def test_leaving_imap_early_cancels_what_is_queued(add_model, faults):
    faults.close_gate()
    with ezrt.InferenceSession(add_model, provider_options={"max_queue_size": 4}) as session:
        stream = session.imap((feed(i) for i in range(100)), ["sum"], max_in_flight=4)
        threading.Timer(0.1, faults.open_gate).start()
        first = next(stream)
        stream.close()
        stats = session.stats()
    assert first[0][0, 0] == 1.0
    assert faults.runs < 100 and stats.submitted <= 5


def test_imap_window_validation(add_model):
    with ezrt.InferenceSession(add_model) as session:
        with pytest.raises(ezrt.InvalidArgumentError, match="max_in_flight must be >= 1"):
            session.imap([], max_in_flight=0)
        with pytest.raises(ezrt.InvalidTypeError, match="max_in_flight must be an integer"):
            session.imap([], max_in_flight=2.0)
