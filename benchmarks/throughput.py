"""ezrt against the baselines of shared/BENCHMARKS.md, on this machine, in one run.

    python benchmarks/throughput.py [--rounds 9] [--seconds 0.5]

Part 1 (scaling): the embedded demo CNN (~1 ms per inference) with one worker per CPU:
ezrt run_async and batch dispatch against ort-sync-1t, ort-sync-default, ort-run_async
and naive-pool (N one-thread sessions on N Python threads), in short interleaved rounds.
Targets: ezrt >= 0.95 x naive-pool.

Part 2 (engine overhead): a trivial two-input Add model, one worker; microseconds per task
above raw onnxruntime run (a one-thread session in a loop), for streamed run_async at
several queue bounds and for synchronous run. Target: <= 20 us per task for streaming.

Every figure is the median over rounds; a ratio is the median of the per-round ratios
(contenders measured moments apart), because the speed of this kind of machine drifts by
up to 2x within seconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ezrt import InferenceSession
from ezrt.backends.onnxruntime import allowed_cpus
from ezrt.bench import demo_model_path, run_rounds, standard_contenders


def add_model() -> bytes:
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "aby"]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "add", spec[:2], spec[2:]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def per_call_us(call: Callable[[], object], n: int) -> float:
    """Microseconds per call of ``call``, over ``n`` calls."""
    started = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - started) / n * 1e6


def per_task_us(submit: Callable[[Callable[..., None]], None], n: int) -> float:
    """Microseconds per task for ``n`` tasks handed to ``submit(callback)``, until the last
    callback has run."""
    done = threading.Event()
    count = [0]

    def callback(results: Any, user_data: Any, err: str) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    started = time.perf_counter()
    for _ in range(n):
        submit(callback)
    done.wait()
    return (time.perf_counter() - started) / n * 1e6


def scaling(rounds: int, seconds: float) -> None:
    workers = len(allowed_cpus())
    print(f"== scaling: demo CNN, {workers} workers, {rounds} rounds x {seconds:g} s, medians")
    contenders, sessions = standard_contenders(demo_model_path(), workers, max_queue_size=8)
    try:
        results = run_rounds(contenders, rounds=rounds, seconds=seconds)
    finally:
        for session in sessions:
            session.close()
    base = results["ort-sync-1t"]
    pool = results[f"naive-pool ({workers})"]
    for name, m in results.items():
        spread = f"[{min(m.per_round):.0f}..{max(m.per_round):.0f}]"
        print(
            f"  {name:<30} {m.median:8.1f}/s {spread:>14}"
            f"  x1t {m.ratio_to(base):5.2f}  xpool {m.ratio_to(pool):5.2f}"
        )


def streaming(rounds: int, seconds: float) -> None:
    """imap (futures) against run_async with callbacks: the same model, workers and window."""
    from ezrt.bench import ezrt_contender, make_feed

    workers = len(allowed_cpus())
    session = InferenceSession(
        demo_model_path(), provider_options={"schedule": list(range(workers)), "max_queue_size": 8}
    )
    feed = make_feed(session.get_inputs())

    def imap(duration: float) -> int:
        end = time.perf_counter() + duration

        def feeds():  # stop producing at the deadline; the in-flight wave finishes
            while time.perf_counter() < end:
                yield feed

        return sum(1 for _ in session.imap(feeds()))

    print(f"== streaming: demo CNN, {workers} workers, {rounds} rounds x {seconds:g} s, medians")
    try:
        results = run_rounds(
            {"run_async + callback": ezrt_contender(session, feed), "imap": imap},
            rounds=rounds,
            seconds=seconds,
        )
    finally:
        session.close()
    base = results["run_async + callback"]
    for name, m in results.items():
        print(f"  {name:<22} {m.median:8.1f}/s  x run_async {m.ratio_to(base):5.2f}")


def overhead(rounds: int, n: int) -> None:
    import onnxruntime as ort

    model = add_model()
    a = np.ones((1, 4), np.float32)
    feed = {"a": a, "b": a}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    raw = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    sessions = {
        q: InferenceSession(model, provider_options={"schedule": [0], "max_queue_size": q})
        for q in (3, 8, 32)
    }

    rows: dict = {"raw": [], **{f"run_async q={q}": [] for q in sessions}, "run (sync)": []}
    for _ in range(rounds):
        base = per_call_us(functools.partial(raw.run, None, feed), n)
        rows["raw"].append(base)
        for q, session in sessions.items():
            async_us = per_task_us(functools.partial(session.run_async, None, feed), n)
            rows[f"run_async q={q}"].append(async_us - base)
        sync_us = per_call_us(functools.partial(sessions[3].run, None, feed), n // 4)
        rows["run (sync)"].append(sync_us - base)
    for session in sessions.values():
        session.close()
    print(f"== engine overhead: trivial Add model, 1 worker, {rounds} rounds x {n} tasks, medians")
    for name, values in rows.items():
        values.sort()
        label = "us per raw run" if name == "raw" else "us per task above raw"
        print(
            f"  {name:<16} {values[len(values) // 2]:7.1f} {label}"
            f"  [{values[0]:.1f}..{values[-1]:.1f}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--tasks", type=int, default=10000, help="tasks per overhead round")
    args = parser.parse_args()
    scaling(args.rounds, args.seconds)
    streaming(args.rounds, args.seconds)
    overhead(args.rounds, args.tasks)


if __name__ == "__main__":
    main()
