"""What a Python engine can reach: ezrt's run_async against a minimal C-queue pipeline.

    python benchmarks/engine_floor.py [--rounds 5] [--tasks 20000] [--seconds 0.5]

The "floor" is the smallest pipeline with the thread structure ezrt's contract requires
(bounded admission with prompt wake-ups, input copied at submission, worker threads, one
delivery thread calling the callback), built only from ``queue.SimpleQueue``: no feed
validation, no ordering buffer, no statistics, cancel or deadlines. Two parts, each with
its contenders interleaved round by round:

* overhead: a trivial Add model, one worker; microseconds per task above raw onnxruntime
  ``run`` for the floor and for ``InferenceSession.run_async``, at queue bounds 3 and 32;
* scaling: the demo CNN on every CPU; naive-pool (one thread per CPU calling its own
  session, nothing copied, nothing handed over), the floor and ezrt run_async.

Ratios are medians of per-round ratios (each round runs every contender once, moments
apart), and the floor and ezrt are driven by one identical loop and callback.

ezrt's engine is built from the same C-level queues, so its gap to the floor is the Python
it runs per task on top (validating the feed, ordering, statistics). The floor's gap to
naive-pool is the price of the structure itself: on a machine whose every core runs a
worker, each hand-off to the submitting or delivery thread preempts a worker.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ezrt import InferenceSession
from ezrt.backends.onnxruntime import allowed_cpus
from ezrt.bench import demo_model_path, make_feed, naive_pool, run_rounds

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import add_model, per_call_us, per_task_us


class FloorPipeline:
    """Admission tokens, a task queue, workers, one delivery thread: SimpleQueues only.

    Each worker runs its own session from ``sessions`` (one thread each).
    """

    def __init__(self, sessions: List[Any], queue_size: int) -> None:
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(queue_size):
            self._tokens.put(None)
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        for session in sessions:
            threading.Thread(target=self._work, args=(session.run,), daemon=True).start()
        threading.Thread(target=self._deliver, daemon=True).start()

    def submit(self, feed: Dict[str, np.ndarray], callback: Callable[..., None]) -> None:
        self._tokens.get(timeout=10)  # bounded admission, woken as soon as a slot frees
        self._tasks.put(({name: value.copy() for name, value in feed.items()}, callback))

    def _work(self, run: Callable[..., Any]) -> None:
        while True:
            feed, callback = self._tasks.get()
            self._tokens.put(None)  # the slot frees as the task starts
            self._results.put((run(None, feed), callback))

    def _deliver(self) -> None:
        while True:
            outputs, callback = self._results.get()
            callback(outputs, None, "")

    def contender(self, feed: Dict[str, np.ndarray]) -> Callable[[float], int]:
        """Submit for ``duration`` seconds, wait for the last callback; return the count."""
        return submit_loop(lambda callback: self.submit(feed, callback))


def submit_loop(submit: Callable[[Callable[..., None]], None]) -> Callable[[float], int]:
    """A contender that calls ``submit(callback)`` for ``duration`` seconds and waits for the
    last callback. The floor and ezrt are driven by this same loop and callback, so the
    harness costs both the same."""

    def run(duration: float) -> int:
        lock, finished = threading.Lock(), threading.Event()
        state = {"done": 0, "sent": -1}

        def callback(outputs: Any, user_data: Any, err: str) -> None:
            with lock:
                state["done"] += 1
                if state["done"] == state["sent"]:
                    finished.set()

        sent = 0
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            submit(callback)
            sent += 1
        with lock:
            state["sent"] = sent
            if state["done"] == sent:
                finished.set()
        finished.wait()
        return sent

    return run


def one_thread_sessions(model: Any, n: int) -> List[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return [
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]) for _ in range(n)
    ]


def scaling(rounds: int, seconds: float) -> None:
    """The demo CNN on every CPU: naive-pool, the floor and ezrt run_async, interleaved."""
    workers = len(allowed_cpus())
    model = demo_model_path()
    session = InferenceSession(
        model, provider_options={"schedule": list(range(workers)), "max_queue_size": 8}
    )
    feed = make_feed(session.get_inputs())
    floor = FloorPipeline(one_thread_sessions(model, workers), 8)
    try:
        results = run_rounds(
            {
                f"naive-pool ({workers})": naive_pool(model, feed, workers),
                f"floor ({workers} workers)": floor.contender(feed),
                f"ezrt run_async ({workers} workers)": submit_loop(
                    functools.partial(session.run_async, None, feed)
                ),
            },
            rounds=rounds,
            seconds=seconds,
        )
    finally:
        session.close()
    pool = results[f"naive-pool ({workers})"]
    floor_m = results[f"floor ({workers} workers)"]
    print(f"demo CNN, {workers} workers, queue 8, {rounds} rounds x {seconds:g} s, medians")
    for name, m in results.items():
        print(f"  {name:<28} {m.median:8.1f}/s  x naive-pool {m.ratio_to(pool):5.2f}")
    ezrt_m = results[f"ezrt run_async ({workers} workers)"]
    print(f"  ezrt x floor {ezrt_m.ratio_to(floor_m):5.2f} (target >= 0.97)")


def overhead(rounds: int, tasks: int) -> None:
    """Microseconds per task above raw run on a trivial Add model, one worker."""
    model = add_model()
    feed = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}
    raw_session, floor_session = one_thread_sessions(model, 2)
    rows: Dict[str, list] = {}
    for queue_size in (3, 32):
        floor = FloorPipeline([floor_session], queue_size)
        ezrt = InferenceSession(
            model, provider_options={"schedule": [0], "max_queue_size": queue_size}
        )
        for _ in range(rounds):
            raw = per_call_us(functools.partial(raw_session.run, None, feed), tasks)
            rows.setdefault("raw run", []).append(raw)
            floor_us = per_task_us(functools.partial(floor.submit, feed), tasks) - raw
            ezrt_us = per_task_us(functools.partial(ezrt.run_async, None, feed), tasks) - raw
            rows.setdefault(f"floor, queue {queue_size}", []).append(floor_us)
            rows.setdefault(f"ezrt, queue {queue_size}", []).append(ezrt_us)
        ezrt.close()
    print(f"trivial Add model, 1 worker, {rounds} rounds x {tasks} tasks, medians")
    for name, values in rows.items():
        unit = "us per call" if name == "raw run" else "us per task above raw"
        print(f"  {name:<16} {statistics.median(values):7.1f} {unit}")
    for queue_size in (3, 32):
        mine, floor_us = rows[f"ezrt, queue {queue_size}"], rows[f"floor, queue {queue_size}"]
        ratio = statistics.median(e / f for e, f in zip(mine, floor_us))
        print(f"  ezrt x floor, queue {queue_size}: {ratio:4.2f} (target <= 1.1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=0.5, help="per CNN round")
    args = parser.parse_args()
    overhead(args.rounds, args.tasks)
    scaling(args.rounds, args.seconds)


if __name__ == "__main__":
    main()
