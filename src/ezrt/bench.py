"""Throughput measurement: ezrt's call styles against the baselines of BENCHMARKS.md.

Every figure is a ratio against baselines run in the same process on the same model,
measured in short interleaved rounds (this kind of machine's speed drifts by 2x within
seconds); the reported figure is the median over rounds.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .io import ONNX_TO_NUMPY
from .session import InferenceSession

__all__ = [
    "BenchResult",
    "Driver",
    "Measurement",
    "demo_model_path",
    "ezrt_contender",
    "load_inputs",
    "make_feed",
    "measure",
    "nearest_rank",
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


def ezrt_contender(
    session: InferenceSession,
    feed: Dict[str, np.ndarray],
    mode: str = "run_async",
    batch: int = 8,
    depth: int = 3,
) -> Contender:
    """ezrt in one call style, as a contender: samples completed in ``duration`` seconds
    (submission stops at the deadline; the in-flight wave finishes)."""

    def run(duration: float) -> int:
        driver = Driver(session, feed, mode, batch, depth)
        end = time.perf_counter() + duration
        driver.drive(lambda tasks: time.perf_counter() < end)
        return len(driver.completions) * driver.samples_per_task

    return run


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
        "ezrt run (1 worker)": ezrt_contender(sync_session, feed, "run"),
        f"ezrt run_async ({workers} workers)": ezrt_contender(async_session, feed),
        f"ezrt batch {batch} ({workers} workers)": ezrt_contender(
            async_session, feed, "batch", batch
        ),
    }
    return contenders, [async_session, sync_session]


# ---------------------------------------------------------------------------- ezrt bench

MODES = ("run", "run_async", "pipeline", "batch")
#: How often the bench samples the tasks in flight (seconds).
DEPTH_PERIOD = 0.05
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method (the value at rank ceil(q/100 * n))."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class BenchResult:
    """One measured configuration; ``as_dict`` is what ``--json`` prints."""

    mode: str
    options: Dict[str, Any]
    samples: int
    tasks: int
    seconds: float
    first_run_ms: float
    warmup_tasks: int
    latencies_ms: List[float]
    completion_times: List[float]  # seconds since the first measured submit, per task
    samples_per_task: int
    stats_delta: Dict[str, Any]
    worker_utilisation: Dict[str, float]
    queue_depths: List[int]
    window_rates: List[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def latency_summary(self) -> Dict[str, float]:
        values = sorted(self.latencies_ms)
        if not values:
            return {}
        summary = {
            "min": values[0],
            "mean": statistics.fmean(values),
            "median": nearest_rank(values, 50),
        }
        summary.update({f"p{q:g}": nearest_rank(values, q) for q in PERCENTILES[1:]})
        summary["max"] = values[-1]
        return summary

    def stability(self) -> Dict[str, Any]:
        """Stable when the last 3 windows' throughputs are within 10 % of their mean."""
        last = self.window_rates[-3:]
        if len(last) < 3 or not statistics.fmean(last):
            return {"stable": False, "spread": None, "reason": "fewer than 3 windows"}
        spread = (max(last) - min(last)) / statistics.fmean(last)
        return {"stable": spread <= 0.10, "spread": spread}

    def as_dict(self) -> Dict[str, Any]:
        return {
            "mode": self.mode,
            "options": self.options,
            "samples": self.samples,
            "tasks": self.tasks,
            "measured_seconds": self.seconds,
            "throughput_samples_per_s": self.throughput,
            "first_run_ms": self.first_run_ms,
            "warmup_tasks": self.warmup_tasks,
            "latency_ms": self.latency_summary(),
            "latency_method": "nearest rank, per task (per call for batch), submit to result",
            "windows_samples_per_s": self.window_rates,
            "stability": self.stability(),
            "breakdown": self.stats_delta,
            "worker_utilisation": self.worker_utilisation,
            "queue_depth": {
                "mean": statistics.fmean(self.queue_depths) if self.queue_depths else 0.0,
                "max": max(self.queue_depths) if self.queue_depths else 0,
                "period_s": DEPTH_PERIOD,
                "series": list(self.queue_depths),  # tasks queued + running + awaiting callback
            },
        }


class Driver:
    """Runs one call style for a while and records each task's latency and completion."""

    def __init__(
        self,
        session: InferenceSession,
        feed: Dict[str, np.ndarray],
        mode: str,
        batch: int,
        depth: int,
    ) -> None:
        self.session, self.mode, self.depth = session, mode, depth
        self.feed = feed
        if mode == "batch":
            self.feed = {name: np.repeat(value, batch, axis=0) for name, value in feed.items()}
        self.samples_per_task = batch if mode == "batch" else 1
        self.lock = threading.Lock()
        self.latencies: List[float] = []
        self.completions: List[float] = []

    def _done(self, started: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.latencies.append(now - started)
            self.completions.append(now)

    def drive(self, keep_going: Callable[[int], bool]) -> int:
        """Submit while ``keep_going(tasks so far)``; return once every task completed."""
        session, feed, tasks = self.session, self.feed, 0
        if self.mode in ("run", "batch"):
            options = {"ztu_modelrt_dispatch_batch": True} if self.mode == "batch" else None
            while keep_going(tasks):
                started = time.perf_counter()
                session.run(None, feed, options)
                self._done(started)
                tasks += 1
        elif self.mode == "run_async":
            finished = threading.Event()
            expected = [-1]

            def callback(results: Any, started: float, err: str) -> None:
                self._done(started)
                if len(self.completions) >= expected[0] >= 0:
                    finished.set()

            count_before = len(self.completions)
            while keep_going(tasks):
                session.run_async(None, feed, callback, time.perf_counter())
                tasks += 1
            expected[0] = count_before + tasks
            if len(self.completions) < expected[0]:
                finished.wait()
        else:  # pipeline
            pending: Deque[float] = deque()
            while keep_going(tasks):
                pending.append(time.perf_counter())
                if session.run_pipeline(feed, self.depth) is not None:
                    self._done(pending.popleft())
                tasks += 1
            for _ in session.flush_pipeline(return_exceptions=True):
                self._done(pending.popleft())
        return tasks


def measure(
    session: InferenceSession,
    feed: Dict[str, np.ndarray],
    *,
    mode: str = "run_async",
    duration: float = 3.0,
    min_count: int = 100,
    warmup: float = 1.0,
    batch: int = 8,
    depth: int = 3,
    windows: int = 6,
    progress: Optional[Callable[[float, int], None]] = None,
) -> BenchResult:
    """Measure one session in one call style, trtexec-style (see BENCHMARKS.md)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    started = time.perf_counter()
    session.run(None, feed)
    first_run_ms = (time.perf_counter() - started) * 1e3
    warm = Driver(session, feed, mode, batch, depth)
    warm_end = time.perf_counter() + warmup
    warmup_tasks = warm.drive(lambda n: time.perf_counter() < warm_end)

    driver = Driver(session, feed, mode, batch, depth)
    before = session.stats()
    depths: List[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:  # queue depth over time, and the progress display
        while not stop_sampling.wait(DEPTH_PERIOD):
            snapshot = session.stats()
            depths.append(snapshot.queued + snapshot.running + snapshot.undelivered)
            if progress is not None:
                progress(time.perf_counter() - begin, len(driver.completions))

    begin = time.perf_counter()
    end = begin + duration
    sampler = threading.Thread(target=sample, name="ezrt-bench-sampler", daemon=True)
    sampler.start()
    try:
        tasks = driver.drive(lambda n: n < min_count or time.perf_counter() < end)
    finally:
        stop_sampling.set()
        sampler.join()
    last = max(driver.completions) if driver.completions else begin
    seconds = last - begin
    after = session.stats()
    delta = {
        name: {
            "count": h.count,
            "mean_ms": h.mean * 1e3,
            "p50_ms_est": h.percentile(50) * 1e3,
            "p99_ms_est": h.percentile(99) * 1e3,
        }
        for name in ("queue_wait", "compute", "delivery")
        for h in [getattr(after, name).since(getattr(before, name))]
    }
    utilisation = {
        worker: (busy - before.worker_busy_seconds.get(worker, 0.0)) / seconds if seconds else 0.0
        for worker, busy in after.worker_busy_seconds.items()
    }
    completions = sorted(t - begin for t in driver.completions)
    result = BenchResult(
        mode=mode,
        options={},
        samples=len(completions) * driver.samples_per_task,
        tasks=tasks,
        seconds=seconds,
        first_run_ms=first_run_ms,
        warmup_tasks=warmup_tasks,
        latencies_ms=[lat * 1e3 for lat in driver.latencies],
        completion_times=completions,
        samples_per_task=driver.samples_per_task,
        stats_delta=delta,
        worker_utilisation=utilisation,
        queue_depths=depths,
    )
    if seconds > 0:
        width = seconds / windows
        counts = [0] * windows
        for t in completions:
            counts[min(int(t / width), windows - 1)] += driver.samples_per_task
        result.window_rates = [c / width for c in counts]
    return result


def load_inputs(path: str, inputs: Sequence[Any]) -> Dict[str, np.ndarray]:
    """Inputs from a .npy (the first input) or .npz (by input name) file."""
    loaded = np.load(path)
    if isinstance(loaded, np.ndarray):
        return {inputs[0].name: loaded}
    missing = [arg.name for arg in inputs if arg.name not in loaded.files]
    if missing:
        raise ValueError(
            f"{path} has no array for input(s) {', '.join(missing)} (has {loaded.files})"
        )
    return {arg.name: loaded[arg.name] for arg in inputs}
