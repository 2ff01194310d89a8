"""What a Python engine can reach: ezrt's run_async against a minimal C-queue pipeline.

    python benchmarks/engine_floor.py [--rounds 5] [--tasks 20000]

On a trivial Add model with one worker, three contenders, interleaved round by round:

* raw: one onnxruntime session, ``run`` in a loop (the baseline);
* floor: the smallest pipeline with the same guarantees on the hot path (bounded admission
  with prompt FIFO wake-ups, input copied at submission, a worker, a delivery thread calling
  the callback) built only from ``queue.SimpleQueue``, whose critical sections run in C
  and so cannot lose the GIL half-way. No ordering buffer, stats, cancel or deadlines;
* ezrt: ``InferenceSession.run_async`` with the same queue bound.

It prints microseconds per task above raw. The gap between ezrt and the floor is what
moving ezrt's hot path from a Python lock and conditions to C-level queues could recover.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import statistics
import sys
import threading
from typing import Any, Callable, Dict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ezrt import InferenceSession

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import add_model, per_call_us, per_task_us


class FloorPipeline:
    """Admission tokens, a task queue, one worker, one delivery thread: SimpleQueues only."""

    def __init__(self, session: Any, queue_size: int) -> None:
        self._run = session.run
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(queue_size):
            self._tokens.put(None)
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, daemon=True).start()
        threading.Thread(target=self._deliver, daemon=True).start()

    def submit(self, feed: Dict[str, np.ndarray], callback: Callable[..., None]) -> None:
        self._tokens.get(timeout=10)  # bounded admission; FIFO, woken as soon as a slot frees
        self._tasks.put(({name: value.copy() for name, value in feed.items()}, callback))

    def _work(self) -> None:
        while True:
            feed, callback = self._tasks.get()
            self._tokens.put(None)  # the slot frees as the task starts
            self._results.put((self._run(None, feed), callback))

    def _deliver(self) -> None:
        while True:
            outputs, callback = self._results.get()
            callback(outputs, None, "")


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20_000)
    args = parser.parse_args()
    model = add_model()
    feed = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    raw_session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rows: Dict[str, list] = {}
    for queue_size in (3, 32):
        floor = FloorPipeline(raw_session, queue_size)
        ezrt = InferenceSession(
            model, provider_options={"schedule": [0], "max_queue_size": queue_size}
        )
        for _ in range(args.rounds):
            raw = per_call_us(functools.partial(raw_session.run, None, feed), args.tasks)
            rows.setdefault("raw run", []).append(raw)
            floor_us = per_task_us(functools.partial(floor.submit, feed), args.tasks) - raw
            ezrt_us = per_task_us(functools.partial(ezrt.run_async, None, feed), args.tasks) - raw
            rows.setdefault(f"floor, queue {queue_size}", []).append(floor_us)
            rows.setdefault(f"ezrt, queue {queue_size}", []).append(ezrt_us)
        ezrt.close()
    print(f"trivial Add model, 1 worker, {args.rounds} rounds x {args.tasks} tasks, medians")
    for name, values in rows.items():
        unit = "us per call" if name == "raw run" else "us per task above raw"
        print(f"  {name:<16} {statistics.median(values):7.1f} {unit}")


if __name__ == "__main__":
    main()
