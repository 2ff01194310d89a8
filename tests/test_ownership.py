"""DESIGN invariant 4: the caller owns its arrays. Every call that returns before its task
has run copies (or converts) what it was given, whatever kind of value it is, so changing
the caller's buffer right after the call never changes the result. Only the explicit
zero-copy API (``OrtValue``) shares memory, and ``arun``/``aimap`` borrow their inputs until
they return, as ``run`` does."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Tuple

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ezrt
from ezrt.io import FeedParser, OrtFeed, TensorSpec

from .conftest import WAIT, Collector


class OwnBuffer:
    """An image wrapper whose ``__array__`` hands out its own buffer (no copy)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.array


class NewBuffer(OwnBuffer):
    """A wrapper whose ``__array__`` makes a new array each time."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.array.copy()


class Interface:
    """Exposes a buffer through ``__array_interface__`` only."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.__array_interface__ = array.__array_interface__


def _kinds(base: np.ndarray) -> dict[str, Tuple[Any, np.ndarray]]:
    """value -> the buffer a caller would later change, for every kind of feed value."""
    wide = np.repeat(base, 2, axis=-1)
    view = wide[..., ::2]  # non-contiguous view of `wide`
    masked = np.ma.masked_array(base.copy(), mask=False)
    return {
        "ndarray": (base, base),
        "view": (view, wide),
        "subclass": (masked, masked.data),
        "memoryview": (memoryview(base), base),
        "__array_interface__": (Interface(base), base),
        "__array__ own buffer": (OwnBuffer(base), base),
        "__array__ new buffer": (NewBuffer(base), base),
        "list": (base.tolist(), base),
    }


KINDS = list(_kinds(np.ones((1, 4), np.float32)))


def _spec() -> TensorSpec:
    return TensorSpec("a", (1, 4), "tensor(float)", np.dtype(np.float32))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(kind=st.sampled_from(KINDS), fill=st.floats(-5, 5, width=32), strict=st.booleans())
def test_a_copied_feed_shares_no_memory_with_any_value_it_was_given(kind, fill, strict):
    base = np.full((1, 4), fill, np.float32)
    value, buffer = _kinds(base)[kind]
    if strict:
        (array,) = FeedParser([_spec()], ["y"], "nchw").parse({"a": value}, copy=True)
    else:
        parsed = OrtFeed([_spec()], ["y"], "nchw", _never).parse({"a": value}, copy=True)
        array = np.asarray(parsed["a"])
    assert not np.shares_memory(array, buffer)
    before = array.copy()
    buffer[...] = 1000.0  # the caller reuses its buffer
    np.testing.assert_array_equal(array, before)


def _never(feed: Any, names: Any) -> None:
    raise AssertionError("these feeds are all valid")


# ---------------------------------------------------------------- end to end


def _run_async(session: Any, feed: Any) -> Callable[[], Any]:
    collector = Collector()
    session.run_async(None, feed, collector)
    return lambda: collector.wait_for(1)[0][0]


def _submit(session: Any, feed: Any) -> Callable[[], Any]:
    future = session.submit(None, feed)
    return lambda: future.result(WAIT)


def _pipeline(session: Any, feed: Any) -> Callable[[], Any]:
    assert session.run_pipeline(feed, depth=1, reset=True) is None
    return lambda: session.flush_pipeline()[0]


PATHS = {"run_async": _run_async, "submit": _submit, "run_pipeline": _pipeline}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", KINDS)
def test_changing_a_buffer_right_after_an_async_call_never_changes_the_result(
    add_model, faults, path, kind
):
    base = np.ones((1, 4), np.float32)
    value, buffer = _kinds(base)[kind]
    with ezrt.InferenceSession(add_model) as session:
        faults.close_gate()  # the task cannot run before the buffer changes
        result = PATHS[path](session, {"a": value, "b": np.ones((1, 4), np.float32)})
        buffer[...] = 100.0
        faults.open_gate()
        outputs = result()
    assert outputs[0].tolist() == [[2.0] * 4]  # 1 + 1, never 100 + 1


def test_imap_feeds_may_reuse_one_buffer(add_model):
    buffer = np.zeros((1, 4), np.float32)

    def frames():
        for i in range(6):
            buffer[...] = i  # one buffer, refilled per frame (a camera loop)
            yield {"a": buffer, "b": np.zeros((1, 4), np.float32)}

    with ezrt.InferenceSession(add_model, provider_options={"threads_per_core": 2}) as session:
        sums = [out[0][0, 0] for out in session.imap(frames(), max_in_flight=4)]
    assert sums == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_ortvalues_are_shared_on_purpose(add_model, faults):
    base = np.ones((1, 4), np.float32)
    value = ort.OrtValue.ortvalue_from_numpy(base)
    with ezrt.InferenceSession(add_model) as session:
        faults.close_gate()
        future = session.submit(None, {"a": value, "b": np.ones((1, 4), np.float32)})
        base[...] = 100.0  # the zero-copy API: the task reads the caller's memory
        faults.open_gate()
        assert future.result(WAIT)[0].tolist() == [[101.0] * 4]


def test_arun_borrows_its_inputs_until_it_returns(add_model):
    buffer = np.ones((1, 4), np.float32)

    async def main() -> Any:
        outputs = await session.arun(None, {"a": buffer, "b": buffer})
        buffer[...] = 100.0  # after the await: the result is already the caller's own
        return outputs

    with ezrt.InferenceSession(add_model) as session:
        outputs = asyncio.run(main())
    assert outputs[0].tolist() == [[2.0] * 4] and not np.shares_memory(outputs[0], buffer)
