"""Throughput measurement: ezrt's call styles against the baselines of BENCHMARKS.md.

Every figure is a ratio against baselines run in the same process on the same model,
measured in short interleaved rounds (this kind of machine's speed drifts by 2x within
seconds); the reported figure is the median over rounds.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import platform
import random
import shlex
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Union,
)

import numpy as np

from .io import ONNX_TO_NUMPY
from .session import InferenceSession

__all__ = [
    "ARRIVALS",
    "SCHEMA_VERSION",
    "BenchResult",
    "Driver",
    "Measurement",
    "arrival_times",
    "cpu_model",
    "demo_model_path",
    "environment",
    "ezrt_contender",
    "load_inputs",
    "make_feed",
    "measure",
    "nearest_rank",
    "run_rounds",
    "standard_contenders",
    "trial_decision",
    "window_stability",
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

    def ratio_to(self, baseline: Measurement) -> float:
        """The median of the per-round ratios to ``baseline``. Rounds are interleaved, so
        each ratio compares two contenders measured moments apart: steadier than the ratio
        of the medians on a machine whose speed drifts from second to second."""
        ratios = [mine / theirs for mine, theirs in zip(self.per_round, baseline.per_round)]
        return statistics.median(ratios) if ratios else 0.0


# A contender runs for ``duration`` seconds and returns the number of samples completed.
Contender = Callable[[float], int]


def _loop(call: Callable[[], object], duration: float) -> int:
    count = 0
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        call()
        count += 1
    return count


def ort_sync(
    model: Union[str, bytes],
    feed: Dict[str, np.ndarray],
    threads: int,
    provider: str = "CPUExecutionProvider",
) -> Contender:
    """One plain onnxruntime session, ``run`` in a loop (``threads=0``: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=[provider])
    return lambda duration: _loop(lambda: session.run(None, feed), duration)


def naive_pool(
    model: Union[str, bytes],
    feed: Dict[str, np.ndarray],
    n: int,
    provider: str = "CPUExecutionProvider",
) -> Contender:
    """N one-thread sessions driven by N Python threads: the usual hand-made pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(model, options, providers=[provider]) for _ in range(n)]

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
    model: Union[str, bytes],
    feed: Dict[str, np.ndarray],
    in_flight: int,
    provider: str = "CPUExecutionProvider",
) -> Contender:
    """ORT's own ``run_async`` with a bounded number of tasks in flight."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=[provider])

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
#: Arrival processes of the open-loop load (``ezrt bench --rate R --arrival ...``).
ARRIVALS = ("poisson", "constant")
#: How often the bench samples the tasks in flight (seconds).
DEPTH_PERIOD = 0.05
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
#: A run is stable when its last STABLE_WINDOWS throughput windows lie within
#: STABILITY_THRESHOLD (a fraction of their mean) of each other.
STABLE_WINDOWS = 3
STABILITY_THRESHOLD = 0.10
#: The layout version of ``ezrt bench --json``: raised whenever a field changes meaning or
#: goes away (new fields may appear without it).
SCHEMA_VERSION = 1


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method (the value at rank ceil(q/100 * n))."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def window_stability(
    window_rates: Sequence[float], threshold: float = STABILITY_THRESHOLD
) -> Dict[str, Any]:
    """Whether the last :data:`STABLE_WINDOWS` window throughputs agree: ``stable``, and
    ``spread`` = (max - min) / mean of those windows (None when there are too few)."""
    last = list(window_rates[-STABLE_WINDOWS:])
    if len(last) < STABLE_WINDOWS:
        return {"stable": False, "spread": None, "reason": f"fewer than {STABLE_WINDOWS} windows"}
    mean = statistics.fmean(last)
    if mean <= 0:
        return {"stable": False, "spread": None, "reason": "no completions in the last windows"}
    spread = (max(last) - min(last)) / mean
    return {"stable": spread <= threshold, "spread": spread}


def trial_decision(
    trials: Sequence[Sequence[float]], max_trials: int, threshold: float = STABILITY_THRESHOLD
) -> str:
    """What to do after the measured trials so far (each its window throughputs), as
    perf_analyzer does: ``"stable"`` (the last trial settled: report it), ``"retry"`` (it
    did not and fewer than ``max_trials`` ran: measure again) or ``"unstable"`` (the
    trials are spent: report the last one, flagged)."""
    if max_trials < 1:
        raise ValueError(f"max_trials must be at least 1 (got {max_trials})")
    if not trials:
        return "retry"
    if window_stability(trials[-1], threshold)["stable"]:
        return "stable"
    return "retry" if len(trials) < max_trials else "unstable"


def arrival_times(
    rate: float, arrival: str = "poisson", start: float = 0.0, seed: int = 0
) -> Iterator[float]:
    """Scheduled arrival times (seconds, from ``start``) of an open-loop load of ``rate``
    requests per second: evenly spaced (``constant``) or a Poisson process (independent
    exponential gaps, reproducible from ``seed``)."""
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive number of requests per second (got {rate})")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)} (got {arrival!r})")
    if arrival == "constant":
        for index in itertools.count():
            yield start + index / rate
    rng = random.Random(seed)
    due = start
    while True:
        due += rng.expovariate(rate)
        yield due


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU's model name from ``cpuinfo`` (x86 "model name", Arm boards' "Model" or
    "Hardware"), else what ``platform.processor()`` says, else None."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            fields = dict(
                (key.strip().lower(), value.strip())
                for key, sep, value in (line.partition(":") for line in handle)
                if sep and value.strip()
            )
    except OSError:
        fields = {}
    for key in ("model name", "model", "hardware", "cpu model", "processor"):
        if key in fields and not fields[key].isdigit():
            return fields[key]
    return platform.processor() or None


def environment(command: Sequence[str]) -> Dict[str, Any]:
    """Where a bench ran: versions (ezrt, onnxruntime, numpy, Python), the providers this
    onnxruntime offers, the CPU model and counts, the command line and the UTC time."""
    from . import __version__
    from .backends.onnxruntime import allowed_cpus, available_providers

    try:
        import onnxruntime

        ort_version: Optional[str] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - a dependency of ezrt
        ort_version = None
    return {
        "ezrt": __version__,
        "onnxruntime": ort_version,
        "numpy": np.__version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "onnxruntime_providers": available_providers() if ort_version else [],
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_allowed": len(allowed_cpus()),
        "command": shlex.join(command),
        "utc_time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


@dataclass
class BenchResult:
    """One measured configuration; ``as_dict`` is one entry of ``--json``'s ``runs``."""

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
    #: ``{"kind": "closed loop"}`` or the open loop's rate, arrivals and submitter lag.
    load: Dict[str, Any] = field(default_factory=lambda: {"kind": "closed loop"})
    #: Every measured trial (the last one is this result): windows, spread, verdict.
    trials: List[Dict[str, Any]] = field(default_factory=list)
    threshold: float = STABILITY_THRESHOLD
    provider: str = ""
    #: Dynamic batching: runs per batch size during the measurement ({} without it).
    batch_sizes: Dict[int, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def open_loop(self) -> bool:
        return self.load.get("kind") == "open loop"

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
        """Stable when the last 3 windows' throughputs are within the threshold (10 %) of
        their mean; also how many trials it took and the threshold."""
        verdict = window_stability(self.window_rates, self.threshold)
        return {**verdict, "threshold": self.threshold, "trials": max(1, len(self.trials))}

    def as_dict(self) -> Dict[str, Any]:
        origin = "scheduled arrival" if self.open_loop else "submit"
        return {
            "mode": self.mode,
            "provider": self.provider,
            "options": self.options,
            "load": self.load,
            "samples": self.samples,
            "tasks": self.tasks,
            "measured_seconds": self.seconds,
            "throughput_samples_per_s": self.throughput,
            "first_run_ms": self.first_run_ms,
            "warmup_tasks": self.warmup_tasks,
            "latency_ms": self.latency_summary(),
            "latency_method": f"nearest rank, per task (per call for batch), {origin} to result",
            "windows_samples_per_s": self.window_rates,
            "stability": self.stability(),
            "trials": self.trials,
            "breakdown": self.stats_delta,
            "worker_utilisation": self.worker_utilisation,
            "batch_sizes": {str(size): runs for size, runs in self.batch_sizes.items()},
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
        self.lags: List[float] = []  # open loop: how late each submission was, in seconds
        self._finished = threading.Event()
        self._expected = -1

    def _done(self, started: float) -> None:
        now = time.perf_counter()
        with self.lock:
            self.latencies.append(now - started)
            self.completions.append(now)

    def _callback(self, results: Any, started: float, err: str) -> None:
        self._done(started)
        if len(self.completions) >= self._expected >= 0:
            self._finished.set()

    def _wait_async(self, expected: int) -> None:
        """Wait until ``expected`` run_async tasks have had their callbacks."""
        self._expected = expected
        if len(self.completions) < expected:
            self._finished.wait()
        self._finished.clear()
        self._expected = -1

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
            count_before = len(self.completions)
            while keep_going(tasks):
                session.run_async(None, feed, self._callback, time.perf_counter())
                tasks += 1
            self._wait_async(count_before + tasks)
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

    def drive_open(
        self, arrivals: Iterator[float], keep_going: Callable[[int, float], bool]
    ) -> int:
        """Open loop: ``run_async`` each task at its scheduled arrival (perf_counter seconds)
        while ``keep_going(tasks so far, next arrival)``. Latency counts from the scheduled
        arrival, so a submission held up by back-pressure shows as queueing."""
        session, feed, tasks = self.session, self.feed, 0
        count_before = len(self.completions)
        for due in arrivals:
            if not keep_going(tasks, due):
                break
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self.lags.append(max(0.0, time.perf_counter() - due))
            session.run_async(None, feed, self._callback, due)
            tasks += 1
        self._wait_async(count_before + tasks)
        return tasks


class _Sampler:
    """A thread that samples the tasks in flight every DEPTH_PERIOD and reports progress."""

    def __init__(
        self,
        session: InferenceSession,
        driver: Driver,
        progress: Optional[Callable[[float, int], None]],
        depths: Optional[List[int]] = None,
    ) -> None:
        self.session, self.driver, self.progress, self.depths = session, driver, progress, depths
        self.begin = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ezrt-bench-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(DEPTH_PERIOD):
            if self.depths is not None:
                snapshot = self.session.stats()
                self.depths.append(snapshot.queued + snapshot.running + snapshot.undelivered)
            if self.progress is not None:
                self.progress(time.perf_counter() - self.begin, len(self.driver.completions))

    def __enter__(self) -> _Sampler:
        self.begin = time.perf_counter()
        if self.depths is not None or self.progress is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@dataclass
class _Load:
    """How tasks are submitted: closed loop (as fast as admitted) or open loop at ``rate``."""

    rate: Optional[float] = None
    arrival: str = "poisson"
    seed: int = 0

    def drive(self, driver: Driver, seconds: float, min_count: int, trial: int = 0) -> int:
        begin = time.perf_counter()
        end = begin + seconds
        if self.rate is None:
            return driver.drive(lambda n: n < min_count or time.perf_counter() < end)
        arrivals = arrival_times(self.rate, self.arrival, begin, self.seed + trial)
        return driver.drive_open(arrivals, lambda n, due: n < min_count or due < end)

    def describe(self, driver: Driver, seconds: float) -> Dict[str, Any]:
        if self.rate is None:
            return {"kind": "closed loop"}
        lags = sorted(driver.lags)
        return {
            "kind": "open loop",
            "arrival": self.arrival,
            "rate_per_s": self.rate,
            "submitted_per_s": len(lags) / seconds if seconds > 0 else 0.0,
            "submit_lag_ms": {
                "p50": nearest_rank(lags, 50) * 1e3,
                "p99": nearest_rank(lags, 99) * 1e3,
                "max": (lags[-1] if lags else 0.0) * 1e3,
            },
        }


def _breakdown(before: Any, after: Any) -> Dict[str, Any]:
    return {
        name: {
            "count": h.count,
            "mean_ms": h.mean * 1e3,
            "p50_ms_est": h.percentile(50) * 1e3,
            "p99_ms_est": h.percentile(99) * 1e3,
        }
        for name in ("queue_wait", "compute", "delivery")
        for h in [getattr(after, name).since(getattr(before, name))]
    }


def _windows(
    completions: Sequence[float], seconds: float, per_task: int, count: int
) -> List[float]:
    if seconds <= 0:
        return []
    width = seconds / count
    counts = [0] * count
    for t in completions:
        counts[min(int(t / width), count - 1)] += per_task
    return [c / width for c in counts]


def _measure_trial(
    session: InferenceSession,
    driver: Driver,
    load: _Load,
    duration: float,
    min_count: int,
    windows: int,
    progress: Optional[Callable[[float, int], None]],
    trial: int,
) -> BenchResult:
    before = session.stats()
    depths: List[int] = []
    with _Sampler(session, driver, progress, depths) as sampler:
        tasks = load.drive(driver, duration, min_count, trial)
    begin = sampler.begin
    last = max(driver.completions) if driver.completions else begin
    seconds = last - begin
    after = session.stats()
    utilisation = {
        worker: (busy - before.worker_busy_seconds.get(worker, 0.0)) / seconds if seconds else 0.0
        for worker, busy in after.worker_busy_seconds.items()
    }
    completions = sorted(t - begin for t in driver.completions)
    return BenchResult(
        mode=driver.mode,
        options={},
        samples=len(completions) * driver.samples_per_task,
        tasks=tasks,
        seconds=seconds,
        first_run_ms=0.0,
        warmup_tasks=0,
        latencies_ms=[lat * 1e3 for lat in driver.latencies],
        completion_times=completions,
        samples_per_task=driver.samples_per_task,
        stats_delta=_breakdown(before, after),
        worker_utilisation=utilisation,
        queue_depths=depths,
        window_rates=_windows(completions, seconds, driver.samples_per_task, windows),
        load=load.describe(driver, seconds),
        batch_sizes={
            size: runs - before.batch_sizes.get(size, 0)
            for size, runs in after.batch_sizes.items()
            if runs > before.batch_sizes.get(size, 0)
        },
    )


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
    rate: Optional[float] = None,
    arrival: str = "poisson",
    seed: int = 0,
    max_trials: int = 1,
    threshold: float = STABILITY_THRESHOLD,
    phase: Optional[Callable[[str, float], None]] = None,
) -> BenchResult:
    """Measure one session in one call style, trtexec-style (see docs/benchmarks.md).

    One first run (timed on its own), ``warmup`` seconds of warm-up, then trials of
    ``duration`` seconds and at least ``min_count`` tasks until the last windows of a trial
    agree within ``threshold``, at most ``max_trials`` (see :func:`trial_decision`).
    ``rate`` (requests per second, ``run_async`` only) makes the load an open loop with
    ``arrival`` ("poisson" or "constant") arrivals; latency then counts from each task's
    scheduled arrival. ``phase(name, seconds)`` announces each phase and
    ``progress(elapsed, completed)`` reports on it every 50 ms.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    if rate is not None and mode != "run_async":
        raise ValueError(f"an open-loop rate drives run_async; mode {mode!r} is a closed loop")
    load = _Load(rate, arrival, seed)
    if rate is not None:
        next(arrival_times(rate, arrival))  # checks rate and arrival before any work
    announce = phase or (lambda name, seconds: None)
    started = time.perf_counter()
    session.run(None, feed)
    first_run_ms = (time.perf_counter() - started) * 1e3
    announce("warm-up", warmup)
    warm = Driver(session, feed, mode, batch, depth)
    with _Sampler(session, warm, progress):
        warmup_tasks = load.drive(warm, warmup, 0, trial=-1)

    def trial(index: int) -> BenchResult:
        label = "measure" if max_trials == 1 else f"measure, trial {index + 1}/{max_trials}"
        announce(label, duration)
        driver = Driver(session, feed, mode, batch, depth)
        return _measure_trial(session, driver, load, duration, min_count, windows, progress, index)

    trials = _until_stable(trial, max_trials, threshold)
    result = trials[-1]
    result.first_run_ms, result.warmup_tasks, result.threshold = (
        first_run_ms,
        warmup_tasks,
        threshold,
    )
    result.provider = session.get_providers()[0]
    result.trials = [
        {
            "throughput_samples_per_s": t.throughput,
            "windows_samples_per_s": t.window_rates,
            **window_stability(t.window_rates, threshold),
        }
        for t in trials
    ]
    return result


def _until_stable(
    trial: Callable[[int], BenchResult], max_trials: int, threshold: float
) -> List[BenchResult]:
    """Run ``trial(0)``, ``trial(1)``, ... until :func:`trial_decision` stops retrying."""
    trials: List[BenchResult] = []
    while (
        not trials
        or trial_decision([t.window_rates for t in trials], max_trials, threshold) == "retry"
    ):
        trials.append(trial(len(trials)))
    return trials


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
