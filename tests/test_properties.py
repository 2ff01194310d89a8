"""Property tests: arbitrary input feeds give ONNX Runtime's own outcome (dict feeds) or
work correctly or fail naming the input (ezrt's forms); arbitrary provider options work or
fail naming the option; the session keeps working afterwards. Together they generate well
over 5,000 cases."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ezrt

from .conftest import FLOAT, INT64, build_model, outcome_of, tensor

SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same cases on every run: a failure is reproducible in CI
)


def _mixed_model() -> bytes:
    """a: float [1, 4], n: int64 [N] (N symbolic) -> s = a + a, m = n * n."""
    from onnx import helper

    return build_model(
        [helper.make_node("Add", ["a", "a"], ["s"]), helper.make_node("Mul", ["n", "n"], ["m"])],
        [tensor("a", FLOAT, [1, 4]), tensor("n", INT64, ["N"])],
        [tensor("s", FLOAT, [1, 4]), tensor("m", INT64, ["N"])],
    )


MODEL = _mixed_model()
NAMES = ("a", "n")

dtypes = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int64, np.int32, np.uint8, np.bool_, object]
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def arrays(draw):
    dtype = draw(dtypes)
    shape = draw(shapes)
    if dtype is object:
        array = np.empty(shape, dtype=object)
        array.fill(draw(st.sampled_from([1, "x", None, 2.5])))
    else:
        array = np.ones(shape, dtype=dtype)
    if draw(st.booleans()) and array.ndim >= 1 and array.shape[-1] > 1:
        array = np.repeat(array, 2, axis=-1)[..., ::2]  # non-contiguous view, same shape
    return array


values = st.one_of(
    arrays(),
    st.none(),
    st.integers(-3, 3),
    st.floats(allow_nan=False, width=32),
    st.text(max_size=3),
    st.lists(st.floats(-2, 2, width=32), max_size=5),
    st.lists(st.lists(st.integers(-2, 2), min_size=4, max_size=4), min_size=1, max_size=1),
    st.just(np.ones((1, 4), np.float32)),  # the right thing for "a"
    st.just(np.arange(3, dtype=np.int64)),  # the right thing for "n"
)
a_values = st.one_of(
    st.just(np.ones((1, 4), np.float32)),
    st.lists(st.lists(st.floats(-9, 9, width=32), min_size=4, max_size=4), min_size=1, max_size=1),
    st.builds(lambda k: np.full((1, 4), k, np.float32), st.floats(-9, 9, width=32)),
    st.builds(lambda: np.ones((1, 4))),  # float64 array: refused
    st.builds(lambda: np.ones((1, 8), np.float32)[:, ::2]),  # non-contiguous, fine
    st.builds(lambda: np.ones((2, 4), np.float32)),  # wrong shape
)
n_values = st.one_of(
    st.integers(0, 6).map(lambda k: np.arange(k, dtype=np.int64)),
    st.lists(st.integers(-5, 5), max_size=5),  # plain ints take the model's int64
    st.lists(st.floats(-5, 5), min_size=1, max_size=3),  # floats never become ints: refused
    st.integers(0, 4).map(lambda k: np.arange(k, dtype=np.int32)),  # int32 array: refused
)
near_valid = st.one_of(
    st.fixed_dictionaries({"a": a_values, "n": n_values}),
    st.tuples(a_values, n_values),
)
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=2))
feeds = st.one_of(
    near_valid,
    near_valid,
    st.dictionaries(keys, values, max_size=3),
    st.lists(values, max_size=3),
    st.tuples(values, values),
    arrays(),
    values,
)


@pytest.fixture(scope="module")
def session():
    with ezrt.InferenceSession(MODEL, provider_options={"threads_per_core": 2}) as live:
        yield live


@pytest.fixture(scope="module")
def reference():
    return ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])


def _check_still_works(session):
    s, m = session.run(None, {"a": np.ones((1, 4), np.float32), "n": np.arange(3)})
    assert s.tolist() == [[2.0] * 4] and m.tolist() == [0, 1, 4]


MENTIONS = ("'a'", "'n'", "input", "Input")


def _ezrt_extension(feed):
    """A dict feed holding a value ORT cannot read but ezrt converts (a numpy or Python
    scalar): ezrt may answer where ORT refuses."""
    return any(isinstance(v, (np.generic, int, float)) for v in feed.values())


def _same_outcome(actual, expected, feed):
    if isinstance(expected, Exception):
        if not isinstance(actual, Exception) and _ezrt_extension(feed):
            event("ezrt converted what ORT refuses")
            return
        assert isinstance(actual, Exception), f"ezrt ran a feed ORT refuses: {expected!r}"
        event(f"refused as ORT: {type(expected).__name__}")
        if _ezrt_extension(feed) and isinstance(actual, ezrt.EzrtError):
            assert any(word in str(actual) for word in MENTIONS), str(actual)
            return
        assert str(actual) == str(expected)
        assert isinstance(actual, type(expected))
        assert isinstance(actual, (RuntimeError, ValueError, TypeError))
    else:
        assert not isinstance(actual, Exception), f"ORT ran it, ezrt raised {actual!r}"
        event("ran as ORT")
        for got, want in zip(actual, expected):
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype


@settings(max_examples=3000, **SETTINGS)
@given(feed=feeds)
def test_any_feed_gives_onnxruntimes_outcome(session, reference, feed):
    # A dict is ONNX Runtime's feed: ezrt answers what ORT answers. ezrt's positional form
    # (a list or tuple in input order) answers as the same values in a dict; any other
    # feed ezrt refuses, naming what it expected.
    actual = outcome_of(lambda: session.run(None, feed))
    as_dict = dict(zip(NAMES, feed)) if isinstance(feed, (list, tuple)) else feed
    if isinstance(as_dict, dict) and (as_dict is feed or len(feed) == len(NAMES)):
        _same_outcome(actual, outcome_of(lambda: reference.run(None, as_dict)), as_dict)
    else:
        event(f"rejected: {type(actual).__name__}")
        assert isinstance(actual, ezrt.EzrtError), repr(actual)
        assert isinstance(actual, (ValueError, TypeError)), type(actual)
        assert any(word in str(actual) for word in MENTIONS), str(actual)
    _check_still_works(session)


@settings(max_examples=1000, **SETTINGS)
@given(feed=feeds)
def test_any_feed_through_submit_gives_the_same_outcome_as_run(session, feed):
    expected = outcome_of(lambda: session.run(None, feed))
    actual = outcome_of(lambda: session.submit(None, feed).result(timeout=20))
    if isinstance(expected, Exception):
        event("refused")
        assert isinstance(actual, Exception), "submit ran a feed run refuses"
        assert str(actual) == str(expected) and type(actual) is type(expected)
    else:
        event("ran")
        assert not isinstance(actual, Exception), repr(actual)
        for got, want in zip(actual, expected):
            np.testing.assert_array_equal(got, want)


option_keys = st.sampled_from(
    [
        "layout",
        "max_queue_size",
        "threads_per_core",
        "submit_timeout_ms",
        "sequential_callbacks",
        "schedule",
        "tp_mode",
        "enable_pacing",
        "disable_dup_context",
        "custom_op_paths",
        "dispatch_policy",
        "zero_copy_layout",
        "bogus_key",
    ]
)
option_values = st.one_of(
    st.integers(-2, 4),
    st.sampled_from([10**9, True, False, None, 1.5, [], [0], [0, 0], [0, -1], {}, b"1"]),
    st.sampled_from(["", "0", "1", " 2 ", "yes", "off", "nchw", "NHWC", "any", "auto", "all"]),
    st.sampled_from(["0,1", "[0]", "round_robin", "least_loaded", "native", "x", "-1", "3.0"]),
    st.text(max_size=4),
)


plausible_options = st.fixed_dictionaries(
    {},
    optional={
        "max_queue_size": st.sampled_from([1, 2, "3", np.int64(4), 0]),
        "threads_per_core": st.sampled_from([1, 2, " 2", 0]),
        "submit_timeout_ms": st.sampled_from([1, 500, "10000"]),
        "sequential_callbacks": st.sampled_from([True, "no", 0, "maybe"]),
        "layout": st.sampled_from(["nchw", "NHWC", "any", "original", "planar"]),
        "schedule": st.sampled_from([[0], "0", 0, "[0, 0]", [9999]]),
        "enable_pacing": st.booleans(),
        "disable_dup_context": st.sampled_from([True, False, "on"]),
        "dispatch_policy": st.sampled_from(["round_robin", "least_loaded", "LEAST_LOADED"]),
    },
)


@settings(max_examples=1200, **SETTINGS)
@given(
    options=st.one_of(plausible_options, st.dictionaries(option_keys, option_values, max_size=3))
)
def test_any_provider_options_work_or_fail_naming_the_option(options):
    try:
        session = ezrt.InferenceSession(MODEL, provider_options=options)
    except ezrt.EzrtError as error:
        event("rejected")
        assert isinstance(error, (ValueError, TypeError)), (type(error), str(error))
        text = str(error)
        assert any(key in text for key in options) or "provider_options" in text, text
        return
    event("accepted")
    with session:
        _check_still_works(session)
        assert session.run_async(None, [np.ones((1, 4), np.float32), np.arange(2)], _noop) is None


def _noop(results, user_data, err):
    assert err == ""
