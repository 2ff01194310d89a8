"""Throughput measurement: ezrt's call styles against the baselines of BENCHMARKS.md.

Every figure is a ratio against baselines run in the same process on the same model,
measured in short interleaved rounds (this kind of machine's speed drifts by 2x within
seconds); the reported figure is the median over rounds.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .io import ONNX_TO_NUMPY
from .session import InferenceSession

__all__ = [
    "Measurement",
    "demo_model_path",
    "make_feed",
    "run_rounds",
    "standard_contenders",
]


def demo_model_path() -> str:
    """The embedded demo model: a small CNN, ~1 ms per inference on one core."""
    return os.path.join(os.path.dirname(__file__), "data", "demo_cnn.onnx")


def make_feed(
    inputs: Sequence[Any], shapes: Optional[Mapping[str, Sequence[int]]] = None, seed: int = 0
) -> Dict[str, np.ndarray]:
    """Random inputs for NodeArg-like specs; symbolic dims are 1 unless ``shapes`` names them."""
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in inputs:
        if shapes and arg.name in shapes:
            shape = tuple(int(d) for d in shapes[arg.name])
        else:
            shape = tuple(d if isinstance(d, int) and d >= 0 else 1 for d in (arg.shape or ()))
        dtype = ONNX_TO_NUMPY.get(arg.type, np.dtype(np.float32))
        if dtype.kind == "f":
            feed[arg.name] = rng.random(shape, dtype=np.float64).astype(dtype)
        elif dtype.kind == "b":
            feed[arg.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feed[arg.name] = rng.integers(0, 10, shape).astype(dtype)
    return feed


@dataclass
class Measurement:
    """Samples per second of one contender, one entry per round."""

    name: str
    per_round: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_round) if self.per_round else 0.0


# A contender runs for ``duration`` seconds and returns the number of samples completed.
Contender = Callable[[float], int]


def _loop(call: Callable[[], object], duration: float) -> int:
    count = 0
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        call()
        count += 1
    return count


def ort_sync(model: Union[str, bytes], feed: Dict[str, np.ndarray], threads: int) -> Contender:
    """One plain onnxruntime session, ``run`` in a loop (``threads=0``: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda duration: _loop(lambda: session.run(None, feed), duration)


def naive_pool(model: Union[str, bytes], feed: Dict[str, np.ndarray], n: int) -> Contender:
    """N one-thread sessions driven by N Python threads: the usual hand-made pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]) for _ in range(n)
    ]

    def run(duration: float) -> int:
        counts = [0] * n
        threads = [
            threading.Thread(
                target=lambda i=i: counts.__setitem__(
                    i, _loop(lambda: sessions[i].run(None, feed), duration)
                )
            )
            for i in range(n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts)

    return run


def ort_run_async(
    model: Union[str, bytes], feed: Dict[str, np.ndarray], in_flight: int
) -> Contender:
    """ORT's own ``run_async`` with a bounded number of tasks in flight."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def run(duration: float) -> int:
        slots = threading.BoundedSemaphore(in_flight)
        done = [0]
        lock = threading.Lock()

        def callback(results: Any, user_data: Any, err: str) -> None:
            with lock:
                done[0] += 1
            slots.release()

        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            slots.acquire()
            session.run_async(None, feed, callback, None)
        for _ in range(in_flight):
            slots.acquire()
        return done[0]

    return run


def ezrt_run(session: InferenceSession, feed: Dict[str, np.ndarray]) -> Contender:
    return lambda duration: _loop(lambda: session.run(None, feed), duration)


def ezrt_run_async(session: InferenceSession, feed: Dict[str, np.ndarray]) -> Contender:
    """Submit as fast as admission allows; count completions (the in-flight wave finishes)."""

    def run(duration: float) -> int:
        done = [0]
        submitted = 0
        finished = threading.Event()

        def callback(results: Any, user_data: Any, err: str) -> None:
            done[0] += 1
            if done[0] == target[0]:
                finished.set()

        target = [-1]
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            session.run_async(None, feed, callback)
            submitted += 1
        target[0] = submitted
        if done[0] < submitted:
            finished.wait()
        return submitted

    return run


def ezrt_batch(session: InferenceSession, feed: Dict[str, np.ndarray], batch: int) -> Contender:
    """``run`` with batch dispatch: each call splits ``batch`` samples over the workers."""
    batched = {name: np.repeat(value, batch, axis=0) for name, value in feed.items()}
    options = {"ztu_modelrt_dispatch_batch": True}
    return lambda duration: batch * _loop(lambda: session.run(None, batched, options), duration)


def run_rounds(
    contenders: Mapping[str, Contender],
    *,
    rounds: int = 5,
    seconds: float = 0.5,
    warmup: float = 0.3,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Measurement]:
    """Interleave the contenders round by round; return samples/s per round for each."""
    for name, contender in contenders.items():
        if progress:
            progress(f"warming up {name}")
        contender(warmup)
    results = {name: Measurement(name) for name in contenders}
    for index in range(rounds):
        for name, contender in contenders.items():
            if progress:
                progress(f"round {index + 1}/{rounds}: {name}")
            started = time.perf_counter()
            count = contender(seconds)
            results[name].per_round.append(count / (time.perf_counter() - started))
    return results


def standard_contenders(
    model: Union[str, bytes],
    workers: int,
    feed: Optional[Dict[str, np.ndarray]] = None,
    batch: int = 8,
    max_queue_size: int = 3,
) -> tuple[Dict[str, Contender], List[InferenceSession]]:
    """The BENCHMARKS.md baselines and ezrt's call styles, on ``workers`` CPU cores.

    Returns the contenders and the ezrt sessions (close them when done).
    """
    cores = list(range(workers))
    async_session = InferenceSession(
        model, provider_options={"schedule": cores, "max_queue_size": max_queue_size}
    )
    sync_session = InferenceSession(model, provider_options={"schedule": [0]})
    if feed is None:
        feed = make_feed(async_session.get_inputs())
    contenders: Dict[str, Contender] = {
        "ort-sync-1t": ort_sync(model, feed, 1),
        "ort-sync-default": ort_sync(model, feed, 0),
        "ort-run_async": ort_run_async(model, feed, 2 * workers),
        f"naive-pool ({workers})": naive_pool(model, feed, workers),
        "ezrt run (1 worker)": ezrt_run(sync_session, feed),
        f"ezrt run_async ({workers} workers)": ezrt_run_async(async_session, feed),
        f"ezrt batch {batch} ({workers} workers)": ezrt_batch(async_session, feed, batch),
    }
    return contenders, [async_session, sync_session]
