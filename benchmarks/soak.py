"""Soak: 200,000 run_async tasks of mixed sizes with 1 % real failures, accounted one by one.

    python benchmarks/soak.py [--tasks 200000] [--workers 2]

The model reshapes its input to a shape given per task; 1 % of tasks ask for an impossible
shape, so ONNX Runtime itself fails them (no fakes). Input sizes vary per task (1, 16 or
256 rows). Printed at the end: resident memory growth after warm-up (target < 5 MB), thread
count and open file descriptors before and after (unchanged), and the accounting (every task
delivered exactly once, successes and failures as planned).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import threading
import time
from typing import Any, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ezrt import InferenceSession


def model() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Reshape", ["r", "shape"], ["y"]),
        ],
        "soak",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return bytes(proto.SerializeToString())


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20_000)
    args = parser.parse_args()

    rng = random.Random(7)
    inputs = {rows: np.ones((rows, 4), np.float32) for rows in (1, 16, 256)}
    plan: List[Any] = []  # per task: (rows, fails)
    for _ in range(args.tasks):
        plan.append((rng.choice((1, 16, 256)), rng.random() < 0.01))

    delivered = bytearray(args.tasks)  # per task: how many times its callback ran
    outcome = {"ok": 0, "failed": 0, "wrong": 0}
    lock = threading.Lock()
    finished = threading.Event()

    def callback(results: Any, task: int, err: str) -> None:
        rows, fails = plan[task]
        with lock:
            delivered[task] += 1
            if fails:
                outcome["failed" if err and results is None else "wrong"] += 1
            elif err == "" and results[0].shape == (rows * 2, 2):
                outcome["ok"] += 1
            else:
                outcome["wrong"] += 1
            if sum(outcome.values()) == args.tasks:
                finished.set()

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the 1 % planned failures would each log an error line
    onnx_model = model()
    InferenceSession(onnx_model).close()  # runtime-wide state (loaded libraries) comes first
    threads_before, fds_before = threading.active_count(), open_fds()
    session = InferenceSession(
        onnx_model,
        options,
        provider_options={"schedule": list(range(args.workers)), "max_queue_size": 8},
    )
    started = time.perf_counter()
    rss_after_warmup = 0.0
    for task, (rows, fails) in enumerate(plan):
        if task == args.warmup:
            gc.collect()
            rss_after_warmup = rss_mb()
        shape = np.array([3, 5] if fails else [rows * 2, 2], np.int64)
        session.run_async(None, {"x": inputs[rows], "shape": shape}, callback, task)
    finished.wait(600)
    elapsed = time.perf_counter() - started
    gc.collect()
    rss_end = rss_mb()
    stats = session.stats()
    session.close()
    threads_after, fds_after = threading.active_count(), open_fds()

    counts = {n: delivered.count(n) for n in set(delivered)}
    planned_failures = sum(1 for _, fails in plan if fails)
    print(
        f"tasks             {args.tasks} in {elapsed:.1f} s ({args.tasks / elapsed:.0f}/s), "
        f"{args.workers} workers"
    )
    print(
        f"delivered         exactly once: {counts.get(1, 0)}; never: {counts.get(0, 0)}; "
        f"more than once: {sum(v for k, v in counts.items() if k > 1)}"
    )
    print(
        f"outcomes          ok {outcome['ok']}, failed {outcome['failed']} "
        f"(planned {planned_failures}), "
        f"wrong {outcome['wrong']}"
    )
    counts = {k: v for k, v in stats.as_dict().items() if isinstance(v, int)}
    print(f"session stats     {counts}")
    print(
        f"resident memory   {rss_after_warmup:.1f} MB after {args.warmup} tasks -> "
        f"{rss_end:.1f} MB "
        f"at the end: growth {rss_end - rss_after_warmup:+.2f} MB (target < 5)"
    )
    print(f"threads           {threads_before} before the session, {threads_after} after close")
    print(f"open descriptors  {fds_before} before the session, {fds_after} after close")
    ok = (
        counts.get(1, 0) == args.tasks
        and outcome["wrong"] == 0
        and outcome["failed"] == planned_failures
        and rss_end - rss_after_warmup < 5
        and threads_after == threads_before
        and fds_after == fds_before
    )
    print("verdict           " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
