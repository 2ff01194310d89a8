"""run_async and the engine underneath: delivery, order, back-pressure, lifetime, re-entrancy."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

import ezrt
from ezrt.backends.onnxruntime import allowed_cpus
from ezrt.engine import core as engine_core
from ezrt.engine import workers as engine_workers
from ezrt.engine.delivery import Delivery

from .conftest import WAIT, Collector, ones


def session_for(model, **options):
    return ezrt.InferenceSession(model, provider_options=options)


def user_data_of(calls):
    return [user_data for _, user_data, _ in calls]


# ---------------------------------------------------------------- delivery


def test_success_callback_shape(add_model, collector):
    with session_for(add_model) as session:
        assert (
            session.run_async(["prod"], [ones(value=2), ones(value=3)], collector, {"frame": 1})
            is None
        )
        ((results, user_data, err),) = collector.wait_for(1)
    assert err == "" and user_data == {"frame": 1}
    assert isinstance(results, list) and len(results) == 1 and results[0].tolist() == [[6.0] * 4]
    assert collector.threads == ["ezrt-callback"]


def test_user_data_defaults_to_none(add_model, collector):
    with session_for(add_model) as session:
        session.run_async(None, [ones(), ones()], collector)
        ((results, user_data, err),) = collector.wait_for(1)
    assert user_data is None and len(results) == 2 and err == ""


def test_failure_callback_gets_none_and_the_error(reshape_model, collector):
    good = {"x": np.ones((1, 6), np.float32), "shape": np.array([2, 3])}
    bad = {"x": np.ones((1, 6), np.float32), "shape": np.array([5, 5])}
    with session_for(reshape_model) as session:
        session.run_async(None, bad, collector, "bad")
        session.run_async(None, good, collector, "good")
        calls = collector.wait_for(2)
    (r0, u0, e0), (r1, u1, e1) = calls
    # err is onnxruntime's own message
    assert (r0, u0) == (None, "bad") and e0.startswith("[ONNXRuntimeError] : 1 : FAIL")
    assert (u1, e1) == ("good", "") and r1[0].shape == (2, 3)


def test_injected_worker_exception_is_delivered_as_err(add_model, collector, faults):
    faults.should_fail = lambda inputs: inputs[0][0, 0] == 13.0
    with session_for(add_model) as session:
        session.run_async(None, [ones(value=13), ones()], collector, 0)
        session.run_async(None, [ones(), ones()], collector, 1)
        calls = collector.wait_for(2)
    assert calls[0][0] is None and calls[0][2] == "ValueError: injected failure"
    assert calls[1][2] == ""


def test_run_async_argument_errors(add_model):
    with session_for(add_model) as session:
        with pytest.raises(ezrt.InvalidTypeError, match="callback must be callable"):
            session.run_async(None, [ones(), ones()], None)  # type: ignore[arg-type]
        with pytest.raises(
            ezrt.InvalidArgumentError,
            match="run_async does not support ztu_modelrt_dispatch_batch=True",
        ):
            session.run_async(
                None, [ones(), ones()], print, None, {"ztu_modelrt_dispatch_batch": True}
            )
        with pytest.raises(ezrt.InvalidArgumentError, match="Input list size mismatch"):
            session.run_async(None, [ones()], print)
        assert session.stats().submitted == 0


def test_inputs_are_copied_at_submission(add_model, collector, faults):
    a = ones(value=1)
    faults.close_gate()
    with session_for(add_model) as session:
        session.run_async(["sum"], {"a": a, "b": ones()}, collector)
        faults.wait_started()
        a[:] = 100.0  # the caller reuses its buffer while the task is still running
        faults.open_gate()
        ((results, _, _),) = collector.wait_for(1)
    assert results[0].tolist() == [[2.0] * 4]


@pytest.mark.parametrize("sequential", [True, False])
def test_every_task_is_delivered_exactly_once(add_model, sequential):
    collector = Collector()
    n = 300
    with session_for(
        add_model, threads_per_core=3, sequential_callbacks=sequential, max_queue_size=5
    ) as session:
        for i in range(n):
            session.run_async(["sum"], [ones(value=i), ones()], collector, i)
        calls = collector.wait_for(n)
    assert sorted(user_data_of(calls)) == list(range(n))
    for results, user_data, err in calls:
        assert err == "" and results[0][0, 0] == user_data + 1


def test_order_is_submission_order_under_uneven_costs(matmul_model):
    collector = Collector()
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.choice([2, 8, 160], size=60)]
    with session_for(matmul_model, threads_per_core=4, max_queue_size=6) as session:
        for i, n in enumerate(sizes):
            session.run_async(None, np.eye(n, dtype=np.float32) * i, collector, i)
        calls = collector.wait_for(len(sizes))
    assert user_data_of(calls) == list(range(len(sizes)))
    for results, i, err in calls:
        assert err == "" and results[0][0, 0] == i * i


def test_as_completed_mode_does_not_wait_for_a_slow_task(add_model, faults):
    collector = Collector()
    faults.delay = lambda inputs: 0.5 if inputs[0][0, 0] == 0 else 0.0
    with session_for(add_model, threads_per_core=3, sequential_callbacks=False) as session:
        for i in range(6):
            session.run_async(["sum"], [ones(value=i), ones()], collector, i)
        calls = collector.wait_for(6)
    assert user_data_of(calls)[-1] == 0  # the slow first task arrives last
    assert sorted(user_data_of(calls)) == list(range(6))


def test_in_order_mode_holds_later_results_for_a_slow_task(add_model, faults):
    collector = Collector()
    faults.delay = lambda inputs: 0.3 if inputs[0][0, 0] == 0 else 0.0
    with session_for(add_model, threads_per_core=3) as session:
        for i in range(6):
            session.run_async(["sum"], [ones(value=i), ones()], collector, i)
        calls = collector.wait_for(6)
    assert user_data_of(calls) == list(range(6))


# ---------------------------------------------------------------- back-pressure


def test_full_queue_times_out_at_the_deadline(add_model, collector, faults):
    faults.close_gate()
    with session_for(add_model, max_queue_size=2, submit_timeout_ms=300) as session:
        session.run_async(None, [ones(), ones()], collector, 0)
        faults.wait_started()  # task 0 runs (held at the gate); 1 and 2 fill the queue
        session.run_async(None, [ones(), ones()], collector, 1)
        session.run_async(None, [ones(), ones()], collector, 2)
        started = time.monotonic()
        with pytest.raises(
            ezrt.SubmitTimeoutError,
            match="run_async submit timed out: async queue/callback pipeline is saturated",
        ):
            session.run_async(None, [ones(), ones()], collector, 3)
        elapsed = time.monotonic() - started
        with pytest.raises(ezrt.SubmitTimeoutError, match="run submit timed out"):
            session.run(None, [ones(), ones()])
        assert session.stats().timed_out == 2
        faults.open_gate()
        calls = collector.wait_for(3)
    assert 0.28 <= elapsed < 2.0, elapsed
    assert user_data_of(calls) == [0, 1, 2]


def test_blocked_submitter_wakes_when_capacity_frees(add_model, collector, faults):
    faults.close_gate()
    with session_for(add_model, max_queue_size=1, submit_timeout_ms=10000) as session:
        session.run_async(None, [ones(), ones()], collector, 0)
        faults.wait_started()
        session.run_async(None, [ones(), ones()], collector, 1)
        opener = threading.Timer(0.2, faults.open_gate)
        opener.start()
        started = time.monotonic()
        session.run_async(None, [ones(), ones()], collector, 2)  # blocks until the gate opens
        elapsed = time.monotonic() - started
        opener.join()
        collector.wait_for(3)
    assert 0.15 <= elapsed < 3.0, elapsed


def test_one_freed_slot_admits_a_blocked_submitter_during_a_long_task(add_model, faults):
    # Regression: waking submitters only once the queue was half drained left this one
    # waiting for its whole deadline while task 1 ran, although a slot was free.
    first_done, second_done = threading.Event(), threading.Event()
    holds = {0.0: first_done, 1.0: second_done}

    def hold(inputs):
        event = holds.get(float(inputs[0][0, 0]))
        if event is not None:
            assert event.wait(WAIT)
        return 0.0

    faults.delay = hold
    collector = Collector()
    with session_for(add_model, max_queue_size=3, submit_timeout_ms=10000) as session:
        for i in range(4):  # task 0 runs, tasks 1-3 fill the queue
            session.run_async(None, [ones(value=i), ones()], collector, i)
        admitted = threading.Event()
        blocked = threading.Thread(
            target=lambda: (
                session.run_async(None, [ones(value=9), ones()], collector, 4),
                admitted.set(),
            )
        )
        blocked.start()
        time.sleep(0.05)
        assert not admitted.is_set()
        # task 0 ends; the worker takes task 1 (which then holds it): one slot frees
        first_done.set()
        assert admitted.wait(2.0), "the blocked submitter was not woken when a slot freed"
        second_done.set()
        blocked.join(WAIT)
        assert user_data_of(collector.wait_for(5)) == [0, 1, 2, 3, 4]


def test_at_most_eight_results_wait_for_the_callback(add_model):
    """With the queue full and the worker busy, at most 8 finished results wait: run_async
    tasks in flight never exceed max_queue_size + workers + 8."""
    release = threading.Event()
    calls = []

    def slow_callback(results, user_data, err):
        calls.append(user_data)
        release.wait(WAIT)

    accepted = 0
    with session_for(add_model, max_queue_size=1, submit_timeout_ms=200) as session:
        with pytest.raises(ezrt.SubmitTimeoutError):
            for i in range(100):
                session.run_async(None, [ones(), ones()], slow_callback, i)
                accepted += 1
        depths = session.stats()
        release.set()
    assert accepted == 1 + 1 + 8  # max_queue_size + workers + 8
    assert depths.undelivered == accepted and depths.queued == 0 and depths.running == 0
    assert calls == list(range(accepted))


class _CountingDelivery(Delivery):
    """The callback thread, counting the hand-overs it receives (tasks in each)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handovers = []
        put = self.put

        def counted(item):
            self.handovers.append(len(item) if type(item) is list else 1)
            put(item)

        self.put = counted


@pytest.fixture
def handovers(monkeypatch):
    """Each new session's hand-overs to its callback thread, as [[tasks per hand-over]]."""
    made = []

    def make(*args, **kwargs):
        delivery = _CountingDelivery(*args, **kwargs)
        made.append(delivery.handovers)
        return delivery

    monkeypatch.setattr(engine_core, "Delivery", make)
    return made


def test_a_burst_of_tiny_tasks_reaches_the_callback_thread_in_few_hand_overs(
    add_model, faults, handovers, monkeypatch
):
    monkeypatch.setattr(engine_workers, "HOLD_SECONDS", 60.0)  # only the count bounds a hold
    collector = Collector()
    with session_for(add_model, max_queue_size=32) as session:
        faults.close_gate()
        for i in range(20):  # the first runs (held at the gate), 19 wait in the queue
            session.run_async(None, [ones(), ones()], collector, i)
        faults.open_gate()
        calls = collector.wait_for(20)
    assert [user_data for _, user_data, _ in calls] == list(range(20))
    # HOLD_MAX outcomes per hand-over, and the rest just before the worker waits.
    assert handovers[0] == [8, 8, 4]


def test_a_lone_result_is_handed_over_before_the_worker_waits(add_model, handovers, monkeypatch):
    monkeypatch.setattr(engine_workers, "HOLD_SECONDS", 60.0)
    collector = Collector()
    with session_for(add_model) as session:
        session.run_async(None, [ones(), ones()], collector, "alone")
        assert collector.wait_for(1)[0][1] == "alone"  # not held back for company
    assert handovers[0] == [1]


def test_results_of_runs_longer_than_the_hold_are_never_held(add_model, faults, handovers):
    faults.delay = lambda inputs: 0.002  # each run outlasts HOLD_SECONDS many times over
    collector = Collector()
    with session_for(add_model, max_queue_size=8) as session:
        faults.close_gate()
        for i in range(6):
            session.run_async(None, [ones(), ones()], collector, i)
        faults.open_gate()
        collector.wait_for(6)
    assert handovers[0] == [1] * 6


# ---------------------------------------------------------------- exceptions, close, lifetime


def test_callback_exceptions_are_logged_and_delivery_continues(add_model, caplog):
    seen = []

    def flaky(results, user_data, err):
        seen.append(user_data)
        if user_data % 2:
            raise RuntimeError(f"callback {user_data} failed")

    with caplog.at_level(logging.ERROR, logger="ezrt"), session_for(add_model) as session:
        for i in range(20):
            session.run_async(None, [ones(), ones()], flaky, i)
        session.close()
        assert session.run is not None
    assert seen == list(range(20))
    assert sum("run_async callback raised" in r.getMessage() for r in caplog.records) == 10


def test_close_drains_every_accepted_task(add_model, faults):
    collector = Collector()
    faults.close_gate()
    session = session_for(add_model, max_queue_size=4, threads_per_core=2)
    for i in range(6):
        session.run_async(None, [ones(), ones()], collector, i)
    threading.Timer(0.1, faults.open_gate).start()
    assert session.close() is True
    assert [(u, e) for _, u, e in collector.calls] == [(i, "") for i in range(6)]
    assert session.close() is True  # idempotent
    with pytest.raises(ezrt.SessionClosedError, match="run_async rejected: the session is closed"):
        session.run_async(None, [ones(), ones()], collector)
    with pytest.raises(ezrt.SessionClosedError, match="run rejected: the session is closed"):
        session.run(None, [ones(), ones()])


def test_close_cancel_completes_queued_tasks_with_an_error(add_model, faults):
    collector = Collector()
    faults.close_gate()
    session = session_for(add_model, max_queue_size=3)
    for i in range(4):
        session.run_async(None, [ones(), ones()], collector, i)
    faults.wait_started()
    closer = threading.Thread(target=session.close, kwargs={"cancel": True})
    closer.start()
    time.sleep(0.1)
    faults.open_gate()
    closer.join(WAIT)
    assert not closer.is_alive()
    calls = collector.calls
    assert user_data_of(calls) == [0, 1, 2, 3]
    assert calls[0][2] == ""
    for results, _, err in calls[1:]:
        assert results is None and "cancelled" in err and "closed" in err
    assert session.stats().cancelled == 3


def test_close_with_timeout_reports_threads_still_busy(add_model, faults):
    faults.close_gate()
    session = session_for(add_model)
    session.run_async(None, [ones(), ones()], lambda *args: None)
    faults.wait_started()
    assert session.close(timeout=0.1) is False
    faults.open_gate()
    assert session.close() is True


def test_context_manager_and_thread_names(add_model):
    cores = allowed_cpus()[:2]
    with session_for(add_model, schedule=cores, threads_per_core=2) as session:
        names = sorted(t.name for t in session._engine.threads())
        assert all(t.daemon for t in session._engine.threads())
    expected = sorted(
        [f"ezrt-worker-{i}-core{cores[i % len(cores)]}" for i in range(2 * len(cores))]
        + ["ezrt-callback"]
    )
    assert names == expected
    assert session.closed


def test_default_topology_is_one_unpinned_worker(add_model):
    with session_for(add_model) as session:
        assert [t.name for t in session._engine.threads()] == [
            "ezrt-worker-0-auto",
            "ezrt-callback",
        ]


def test_garbage_collected_session_drains_and_stops(add_model):
    collector = Collector()
    session = session_for(add_model)
    for i in range(5):
        session.run_async(None, [ones(), ones()], collector, i)
    del session  # no close(): the finaliser stops it without blocking
    assert user_data_of(collector.wait_for(5)) == [0, 1, 2, 3, 4]


def test_failed_construction_leaves_no_threads(add_model, monkeypatch):
    from ezrt.backends import onnxruntime as backend

    real = backend.OrtBackend.make_worker
    made = []

    def fail_third(self, core, slot):
        if slot == 2:
            raise RuntimeError("worker 2 could not start")
        made.append(slot)
        return real(self, core, slot)

    monkeypatch.setattr(backend.OrtBackend, "make_worker", fail_third)
    with pytest.raises(RuntimeError, match="worker 2 could not start"):
        session_for(add_model, threads_per_core=4)


# ---------------------------------------------------------------- re-entrancy


def test_callbacks_may_call_run_run_async_and_run_pipeline(add_model):
    out = {}
    done = threading.Event()
    with session_for(add_model) as session:

        def inner(results, user_data, err):
            out["inner"] = (results[0][0, 0], err)
            done.set()

        def outer(results, user_data, err):
            out["run"] = session.run(["sum"], [ones(value=5), ones()])[0][0, 0]
            out["pipeline"] = [session.run_pipeline([ones(), ones()], depth=1) for _ in range(2)]
            session.run_async(["sum"], [ones(value=7), ones()], inner)

        session.run_async(None, [ones(), ones()], outer)
        assert done.wait(WAIT)
    assert out["run"] == 6.0 and out["inner"] == (8.0, "")
    assert out["pipeline"][0] is None and out["pipeline"][1][0][0, 0] == 2.0


def test_run_async_from_a_callback_fails_fast_when_the_callback_stage_is_full(add_model):
    outcome = {}
    # 2 queued + 1 worker + 8: the 11 run_async tasks below fill the callback stage.
    with session_for(add_model, max_queue_size=2) as session:

        def first(results, user_data, err):
            deadline = time.monotonic() + WAIT
            while session.stats().undelivered < 11 and time.monotonic() < deadline:
                time.sleep(0.005)
            started = time.monotonic()
            try:
                session.run_async(None, [ones(), ones()], lambda *a: None)
            except ezrt.ReentrancyError as exc:
                outcome["error"] = str(exc)
            outcome["elapsed"] = time.monotonic() - started
            finished.set()

        finished = threading.Event()
        session.run_async(None, [ones(), ones()], first)
        for _ in range(10):
            session.run_async(None, [ones(), ones()], lambda *a: None)
        assert finished.wait(WAIT)
    assert "called from an ezrt callback thread while the pipeline is full" in outcome["error"]
    assert outcome["elapsed"] < 1.0


def test_blocking_from_a_worker_thread_is_refused(add_model, collector, faults):
    with session_for(add_model) as session:
        faults.delay = lambda inputs: session.run(None, [ones(), ones()]) and 0.0
        session.run_async(None, [ones(), ones()], collector)
        ((results, _, err),) = collector.wait_for(1)
    assert results is None and "run cannot block on an ezrt worker thread" in err


# ---------------------------------------------------------------- pacing


def test_pacing_drops_and_says_so(add_model, faults):
    collector = Collector()
    faults.delay = lambda inputs: 0.1
    with session_for(add_model, enable_pacing=True, max_queue_size=8) as session:
        session.run(None, [ones(), ones()])  # first completion teaches pacing the task time
        session.run_async(None, [ones(), ones()], collector, "kept")
        session.run_async(None, [ones(), ones()], collector, "dropped")
        with pytest.raises(ezrt.PacingDropError, match="dropped by pacing"):
            session.run(None, [ones(), ones()])
        calls = collector.wait_for(2)
        stats = session.stats()
    assert calls[0][1:] == ("kept", "")
    assert calls[1][1] == "dropped" and calls[1][0] is None and "dropped by pacing" in calls[1][2]
    assert stats.dropped == 2 and stats.completed == 2


def test_without_pacing_nothing_is_dropped(add_model, faults):
    faults.delay = lambda inputs: 0.02
    with session_for(add_model, max_queue_size=8) as session:
        collector = Collector()
        for i in range(5):
            session.run_async(None, [ones(), ones()], collector, i)
        assert all(err == "" for _, _, err in collector.wait_for(5))


# ---------------------------------------------------------------- dispatch


two_cpus = pytest.mark.skipif(len(allowed_cpus()) < 2, reason="needs 2 CPUs")


def _block_core(faults, release, core):
    """Hold every task that runs on ``core``'s workers until ``release`` is set."""
    suffix = f"-core{core}"
    faults.delay = lambda inputs: (
        release.wait(WAIT) and 0.0 if threading.current_thread().name.endswith(suffix) else 0.0
    )


@two_cpus
def test_an_idle_core_never_waits_behind_a_busy_one(add_model, faults):
    collector = Collector()
    release = threading.Event()
    cores = allowed_cpus()[:2]
    _block_core(faults, release, cores[0])
    with session_for(
        add_model, schedule=cores, sequential_callbacks=False, max_queue_size=4
    ) as session:
        for i in range(6):  # round robin: even tasks to the blocked core, odd to the free one
            session.run_async(None, [ones(), ones()], collector, i)
        calls = collector.wait_for(3)
        assert sorted(user_data_of(calls)) == [1, 3, 5]
        release.set()
        collector.wait_for(6)


@two_cpus
def test_a_lone_caller_stays_on_one_worker_and_a_burst_still_spreads(add_model, faults):
    # Round robin starts from the first core whenever the engine is idle: a submit-and-wait
    # loop keeps one worker (its lone runs use every core; alternating workers would wake
    # each on a core the last run's threads still hold), and a burst uses every core.
    where: list = []
    faults.delay = lambda inputs: where.append(threading.current_thread().name) and 0.0
    cores = allowed_cpus()[:2]
    with session_for(add_model, schedule=cores) as session:
        for _ in range(6):
            session.submit(None, [ones(), ones()]).result(WAIT)
        assert where == [where[0]] * 6 and where[0].endswith(f"-core{cores[0]}"), where
        where.clear()
        faults.close_gate()
        burst = [session.submit(None, [ones(), ones()]) for _ in range(2)]
        faults.wait_started(6 + 1)  # the six before, and the first of the burst
        faults.open_gate()
        for future in burst:
            future.result(WAIT)
    assert sorted(name.rsplit("-", 1)[1] for name in where) == sorted(f"core{c}" for c in cores)


def test_run_callers_take_free_worker_places_on_their_own_threads(add_model, faults):
    # Like a pool of sessions: as many run() callers as workers run on their own threads,
    # with no hand-off; one more caller queues for a worker, which runs it.
    where: list = []
    faults.delay = lambda inputs: where.append(threading.current_thread().name) and 0.0
    faults.close_gate()
    results: list = []
    with session_for(add_model, threads_per_core=2) as session:

        def caller(i):
            out = session.run(["sum"], [np.full((1, 4), i, np.float32), ones()])
            results.append(out[0][0, 0])

        callers = [threading.Thread(target=caller, args=(i,), name=f"caller-{i}") for i in range(3)]
        for thread in callers[:2]:
            thread.start()
        faults.wait_started(2)  # both run now, each on its own thread
        callers[2].start()
        faults.wait_started(1)  # the third found both places taken: a worker runs it
        stats = session.stats()
        faults.open_gate()
        for thread in callers:
            thread.join(WAIT)
    assert sorted(results) == [1.0, 2.0, 3.0]
    callers_ran, workers_ran = sorted(where)[:2], sorted(where)[2:]
    assert callers_ran == ["caller-0", "caller-1"], where
    assert len(workers_ran) == 1 and workers_ran[0].startswith("ezrt-worker"), where
    assert stats.running == 3


@two_cpus
def test_least_loaded_policy_routes_around_a_busy_core(add_model, faults):
    collector = Collector()
    release = threading.Event()
    cores = allowed_cpus()[:2]
    _block_core(faults, release, cores[0])
    with session_for(
        add_model,
        schedule=cores,
        dispatch_policy="least_loaded",
        sequential_callbacks=False,
        max_queue_size=2,
    ) as session:
        session.run_async(None, [ones(), ones()], collector, 0)  # goes to the first core and sticks
        faults.wait_started()
        for i in range(1, 11):  # core 1 is idle at each submission: it must get every task
            session.run_async(None, [ones(), ones()], collector, i)
            collector.wait_for(i)
        assert sorted(user_data_of(collector.calls)) == list(range(1, 11))
        release.set()
        collector.wait_for(11)


def test_stats_count_outcomes(reshape_model):
    good = {"x": np.ones((1, 6), np.float32), "shape": np.array([2, 3])}
    bad = {"x": np.ones((1, 6), np.float32), "shape": np.array([5, 5])}
    with session_for(reshape_model) as session:
        collector = Collector()
        for feed in (good, bad, good):
            session.run_async(None, feed, collector)
        collector.wait_for(3)
        session.run(None, good)
        stats = session.stats()
    assert stats.submitted == 4 and stats.completed == 3 and stats.failed == 1
    assert stats.queued == 0
