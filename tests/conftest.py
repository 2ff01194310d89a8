"""Shared test helpers: models built with onnx.helper, fault injection, thread hygiene."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ezrt.backends import onnxruntime as ort_backend

# The NPU doubles' fixtures, for every test file (a test's subprocess script that imports
# this file as a plain module does not need them).
with contextlib.suppress(ImportError):
    from .rknn_double.harness import doubles, npu, npu3  # noqa: F401

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64

#: Every wait in a test is bounded by this (seconds): a hang fails, it never blocks CI.
WAIT = 20.0


def build_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    metadata: Optional[dict] = None,
) -> bytes:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tensor(name: str, elem: int, shape: Optional[Sequence[Any]]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


@pytest.fixture(scope="session")
def add_model() -> bytes:
    """a, b: float [1, 4] -> sum = a + b, prod = a * b."""
    return build_model(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["prod"]),
        ],
        [tensor("a", FLOAT, [1, 4]), tensor("b", FLOAT, [1, 4])],
        [tensor("sum", FLOAT, [1, 4]), tensor("prod", FLOAT, [1, 4])],
        metadata={"author": "tests"},
    )


@pytest.fixture(scope="session")
def relu_model() -> bytes:
    """x: float [N, 3] (N symbolic) -> y = relu(x)."""
    return build_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [tensor("x", FLOAT, ["N", 3])],
        [tensor("y", FLOAT, ["N", 3])],
    )


@pytest.fixture(scope="session")
def matmul_model() -> bytes:
    """x: float [n, n] -> y = x @ x. Cost grows as n**3: uneven task costs on demand."""
    return build_model(
        [helper.make_node("MatMul", ["x", "x"], ["y"])],
        [tensor("x", FLOAT, ["n", "n"])],
        [tensor("y", FLOAT, ["n", "n"])],
    )


@pytest.fixture(scope="session")
def conv_model() -> bytes:
    """image: float [1, 3, 4, 5] (NCHW) -> out = 1x1 conv picking channel 2, [1, 1, 4, 5]."""
    weight = np.zeros((1, 3, 1, 1), np.float32)
    weight[0, 2, 0, 0] = 1.0
    return build_model(
        [helper.make_node("Conv", ["image", "w"], ["out"])],
        [tensor("image", FLOAT, [1, 3, 4, 5])],
        [tensor("out", FLOAT, [1, 1, 4, 5])],
        [numpy_helper.from_array(weight, "w")],
    )


@pytest.fixture(scope="session")
def reshape_model() -> bytes:
    """x: float [1, 6], shape: int64 [2] -> y = reshape(x, shape). Bad shapes fail at run time."""
    return build_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [tensor("x", FLOAT, [1, 6]), tensor("shape", INT64, [2])],
        [tensor("y", FLOAT, ["r0", "r1"])],
    )


@pytest.fixture(scope="session")
def batchy_model() -> bytes:
    """x: float [1, 4] -> pair = [x; 2x] ([2, 4], dim 0 is not 1), total = sum(x) (rank 0)."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    return build_model(
        [
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Concat", ["x", "x2"], ["pair"], axis=0),
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        ],
        [tensor("x", FLOAT, [1, 4])],
        [tensor("pair", FLOAT, [2, 4]), tensor("total", FLOAT, [])],
        [two],
    )


class Faults:
    """Fault injection on ORT workers: gate (block until opened), fail or delay chosen tasks.

    ``should_fail(inputs)`` / ``delay(inputs)`` decide per task from its input arrays.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)  # released as each task starts running
        self.should_fail: Callable[[Any], bool] = lambda inputs: False
        self.delay: Callable[[Any], float] = lambda inputs: 0.0
        self.runs = 0

    def close_gate(self) -> None:
        self.gate.clear()

    def open_gate(self) -> None:
        self.gate.set()

    def wait_started(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.started.acquire(timeout=WAIT), "a task never started"


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    controller = Faults()
    real_run, real_alone = ort_backend.OrtWorker.run, ort_backend.OrtWorker._alone

    def faulty(self: Any, request: Any, real: Any) -> List[Any]:
        controller.runs += 1
        controller.started.release()
        assert controller.gate.wait(WAIT), "test gate never opened"
        # The decisions see the input arrays in model order (ORT requests carry a dict).
        inputs = request.inputs
        if isinstance(inputs, dict):
            inputs = tuple(inputs[arg.name] for arg in self._session.get_inputs())
        pause = controller.delay(inputs)
        if pause:
            time.sleep(pause)
        if controller.should_fail(inputs):
            raise ValueError("injected failure")
        return real(self, request)

    # every way a task runs: on a worker, alone on the wide session, inline on the caller
    monkeypatch.setattr(ort_backend.OrtWorker, "run", lambda w, r: faulty(w, r, real_run))
    monkeypatch.setattr(ort_backend.OrtWorker, "_alone", lambda w, r: faulty(w, r, real_alone))
    yield controller
    controller.open_gate()


def ezrt_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ezrt-")]


@pytest.fixture(autouse=True)
def no_thread_left_behind() -> Iterator[None]:
    """Every test must leave no ezrt thread running (sessions closed, nothing leaked)."""
    before = set(ezrt_threads())
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        left = [t for t in ezrt_threads() if t not in before]
        if not left:
            return
        time.sleep(0.01)
    pytest.fail(f"ezrt threads still alive after the test: {[t.name for t in left]}")


class Collector:
    """A run_async callback that records every call and lets a test wait for N of them."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.threads: List[str] = []
        self._cv = threading.Condition()

    def __call__(self, results: Any, user_data: Any, err: str) -> None:
        with self._cv:
            self.calls.append((results, user_data, err))
            self.threads.append(threading.current_thread().name)
            self._cv.notify_all()

    def wait_for(self, n: int, timeout: float = WAIT) -> List[tuple]:
        with self._cv:
            assert self._cv.wait_for(lambda: len(self.calls) >= n, timeout), (
                f"only {len(self.calls)} of {n} callbacks arrived"
            )
            return list(self.calls)


@pytest.fixture
def collector() -> Collector:
    return Collector()


def ones(shape: Sequence[int] = (1, 4), value: float = 1.0) -> np.ndarray:
    return np.full(shape, value, np.float32)


def _without_addresses(error: BaseException) -> str:
    """An error's text without object addresses (pybind quotes the session it was given)."""
    return re.sub(r"0x[0-9a-fA-F]+", "0x?", str(error))


def outcome_of(call: Callable[[], Any]) -> Any:
    """What ``call`` returns, or the exception it raises."""
    try:
        return call()
    except Exception as error:
        return error


def assert_same_error(ezrt_call: Callable[[], Any], ort_call: Callable[[], Any]) -> BaseException:
    """ezrt fails as onnxruntime itself does: same text, an instance of ORT's class, and
    (DESIGN invariant 6) a RuntimeError, ValueError or TypeError."""
    expected = outcome_of(ort_call)
    assert isinstance(expected, Exception), f"onnxruntime accepted the call: {expected!r}"
    actual = outcome_of(ezrt_call)
    assert isinstance(actual, Exception), f"ezrt accepted what onnxruntime refused: {expected!r}"
    assert _without_addresses(actual) == _without_addresses(expected)
    assert isinstance(actual, type(expected)), (type(actual).__mro__, type(expected))
    assert isinstance(actual, (RuntimeError, ValueError, TypeError))
    return actual
