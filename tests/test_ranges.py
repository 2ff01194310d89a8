"""Every option and call argument has a documented range: extreme values are accepted and
work, or raise an ezrt error naming the option, promptly (never an overflow, a hang or a
construction cost that grows with a bound)."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from typing import Any, Callable, List

import numpy as np
import pytest

import ezrt
from ezrt.options import SUPPORTED_KEYS

from .conftest import WAIT, Collector, ones

EXTREMES: List[Any] = [
    math.inf,
    -math.inf,
    math.nan,
    -1,
    0,
    1,
    2**31 - 1,
    2**31,
    2**63,
    -(2**63),
    1e300,
    True,
    False,
    "3",
    " 2 ",
    "",
    "inf",
    None,
    [],
    [0],
    [2**63],
    {},
    b"1",
    object(),
]


def _timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _baseline(add_model: bytes) -> float:
    """What a plain session costs to build, run once and close, here and now."""

    def plain() -> None:
        with ezrt.InferenceSession(add_model) as session:
            session.run(None, [ones(), ones()])

    return statistics.median(_timed(plain) for _ in range(3))


#: Upstream's alternative spellings, and the key their messages name.
ALIASES = {
    "custom_op_path": "custom_op_paths",
    "load_custom_ops_from_default_path": "custom_op_default_path",
}


def _accepted_or_named(add_model: bytes, key: str, value: Any) -> None:
    try:
        session = ezrt.InferenceSession(add_model, provider_options={key: value})
    except ezrt.EzrtError as error:
        assert isinstance(error, (ValueError, TypeError)), (key, value, error)
        named = (key, ALIASES.get(key, key), "provider_options")
        assert any(name in str(error) for name in named), (key, value, error)
        return
    with session:  # accepted: it must work
        collector = Collector()
        session.run_async(None, [ones(), ones()], collector)
        assert collector.wait_for(1)[0][2] == ""
        assert session.run(["sum"], [ones(), ones()])[0][0, 0] == 2.0


def test_every_option_takes_extreme_values_or_names_itself_promptly(add_model):
    bound = 20 * _baseline(add_model)
    slow = []
    for key in (*SUPPORTED_KEYS, "bogus_key"):
        for value in EXTREMES:
            case = lambda k=key, v=value: _accepted_or_named(add_model, k, v)  # noqa: E731
            elapsed = _timed(case)
            if elapsed > bound:  # a busy machine, or slow by nature? the best of three says
                elapsed = min(elapsed, _timed(case), _timed(case))
            if elapsed > bound:
                slow.append((key, value, round(elapsed, 3)))
    assert not slow, f"slower than 20 x a plain session ({bound:.3f} s): {slow}"


def test_a_huge_queue_bound_costs_nothing_to_build(add_model):
    small = min(
        _timed(lambda: ezrt.InferenceSession(add_model, provider_options={"max_queue_size": 3}))
        for _ in range(3)
    )
    huge = min(
        _timed(
            lambda: ezrt.InferenceSession(add_model, provider_options={"max_queue_size": 2**31 - 1})
        )
        for _ in range(3)
    )
    assert huge < 5 * small + 0.05, (small, huge)


def _call_outcome(call: Callable[[], Any]) -> Any:
    """What the call returns, or the ezrt error it raises: a bad argument (ValueError or
    TypeError), or a deadline that passed."""
    try:
        return call()
    except ezrt.EzrtError as error:
        expected = (ValueError, TypeError, ezrt.DeadlineExceededError)
        assert isinstance(error, expected), repr(error)
        return error


@pytest.fixture
def session(add_model):
    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as live:
        yield live


def test_every_call_argument_takes_extreme_values_or_names_itself(session):
    feed = [ones(), ones()]
    for value in EXTREMES:
        # deadline (seconds from now; inf: none): run to the end, expire, or refuse by name
        outcome = _call_outcome(lambda v=value: session.submit(None, feed, deadline=v))
        if isinstance(outcome, Exception):
            assert "deadline" in str(outcome)
        else:
            error = outcome.exception(WAIT)
            assert error is None or isinstance(error, ezrt.DeadlineExceededError), error
        arun = _call_outcome(lambda v=value: asyncio.run(session.arun(None, feed, deadline=v)))
        assert isinstance(arun, (list, ezrt.DeadlineExceededError)) or "deadline" in str(arun)
        # the run_pipeline depth
        outcome = _call_outcome(lambda v=value: session.run_pipeline(feed, depth=v, reset=True))
        assert outcome is None or "depth" in str(outcome), outcome
        session.flush_pipeline(return_exceptions=True)
        # imap's window
        outcome = _call_outcome(lambda v=value: list(session.imap([feed], max_in_flight=v)))
        assert isinstance(outcome, list) or "max_in_flight" in str(outcome), outcome
        # run_options, output_names and user_data: refused by name, ORT's, or carried as is
        outcome = _call_outcome(
            lambda v=value: session.run(None, feed, {"ztu_modelrt_dispatch_batch": v})
        )
        assert isinstance(outcome, list) or "ztu_modelrt_dispatch_batch" in str(outcome)
        collector = Collector()
        session.run_async(None, feed, collector, value)
        assert collector.wait_for(1)[0][1] is value
    # wrong types where a callable or the run options are expected
    for value in EXTREMES:
        assert "callback" in str(_call_outcome(lambda v=value: session.run_async(None, feed, v)))
        if value not in (None, {}):
            assert "run_options" in str(_call_outcome(lambda v=value: session.run(None, feed, v)))


def test_close_timeout_takes_extreme_values_or_names_itself(add_model):
    for value in EXTREMES:
        session = ezrt.InferenceSession(add_model)
        outcome = _call_outcome(lambda v=value, s=session: s.close(timeout=v))
        assert outcome in (True, False) or "timeout" in str(outcome), (value, outcome)
        session.close()


def test_wrong_sess_options_is_a_type_error_naming_it(add_model):
    for value in ("x", 3, {}, object()):
        with pytest.raises(ezrt.InvalidTypeError, match="sess_options must be"):
            ezrt.InferenceSession(add_model, sess_options=value)


def test_schedule_entries_have_a_range(add_model):
    for value in ([-1], [2**31], [2**63], ["x"], [0.5]):
        with pytest.raises(ezrt.EzrtError, match="schedule"):
            ezrt.InferenceSession(add_model, provider_options={"schedule": value})
    arrays = np.ones((3, 4), np.float32)
    with ezrt.InferenceSession(add_model, provider_options={"schedule": [0, 0, 0]}) as session:
        assert session.run(["sum"], [arrays[:1], arrays[:1]])[0].shape == (1, 4)
