"""Does ezrt ever stall the asyncio event loop? Lateness of a 10 ms ticker while N inference
calls are gathered at once, against the usual way to call ONNX Runtime from asyncio.

    python benchmarks/loop_lag.py [--rounds 5] [--calls 300 1000] [--sizes 128 224]

Contenders, same model, same inputs, same process, interleaved round by round:

* executor: ``loop.run_in_executor(ThreadPoolExecutor(workers), session.run, None, feed)``
  on one ONNX Runtime session per worker (the baseline: what asyncio code does today);
* ezrt: ``session.arun(None, feed)`` on an ezrt session with the same number of workers.

The figure is the ticker's worst lateness during the whole gather (median over rounds); the
target is ezrt <= 2 x the executor and <= 50 ms on a 2-core machine. The model is a small
CNN with free height and width, so both input sizes run on it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
from typing import Any, Awaitable, Callable, Dict, List

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ezrt import InferenceSession
from ezrt.backends.onnxruntime import allowed_cpus


def small_cnn() -> bytes:
    """image [1, 3, H, W] -> 8 channel means: conv 3x3 (stride 2), relu, global pool."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["means"]),
        ],
        "small_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("means", TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def _ticker(stop: asyncio.Event, lateness: List[float], period: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        expected = loop.time() + period
        await asyncio.sleep(period)
        lateness.append(loop.time() - expected)


async def _watch(calls: List[Callable[[], Awaitable[Any]]]) -> float:
    """The ticker's worst lateness while every call runs, gathered at once."""
    lateness: List[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(_ticker(stop, lateness))
    await asyncio.sleep(0.02)  # the ticker is running before the burst
    await asyncio.gather(*(call() for call in calls))
    stop.set()
    await tick
    return max(lateness)


def _executor_round(sessions: List[Any], feeds: List[Dict[str, np.ndarray]]) -> float:
    pool = concurrent.futures.ThreadPoolExecutor(len(sessions))

    async def main() -> float:
        loop = asyncio.get_running_loop()
        calls = [
            lambda i=i: loop.run_in_executor(
                pool, sessions[i % len(sessions)].run, None, feeds[i % len(feeds)]
            )
            for i in range(len(feeds))
        ]
        return await _watch(calls)

    try:
        return asyncio.run(main())
    finally:
        pool.shutdown()


def _ezrt_round(session: InferenceSession, feeds: List[Dict[str, np.ndarray]]) -> float:
    async def main() -> float:
        return await _watch([lambda f=f: session.arun(None, f) for f in feeds])

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    args = parser.parse_args()
    model = small_cnn()
    cpus = allowed_cpus()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]) for _ in cpus
    ]
    ezrt_options = {"schedule": cpus, "max_queue_size": 8}
    print(f"{len(cpus)} CPUs, {args.rounds} interleaved rounds, ticker worst lateness, medians")
    with InferenceSession(model, provider_options=ezrt_options) as session:
        for size in args.sizes:
            for count in args.calls:
                rng = np.random.default_rng(size)
                image = rng.random((1, 3, size, size), dtype=np.float32)
                feeds = [{"image": image.copy()} for _ in range(count)]
                runs: Dict[str, List[float]] = {"executor": [], "ezrt": []}
                for _ in range(args.rounds):
                    runs["executor"].append(_executor_round(sessions, feeds))
                    runs["ezrt"].append(_ezrt_round(session, feeds))
                base = statistics.median(runs["executor"])
                mine = statistics.median(runs["ezrt"])
                print(
                    f"  {count:5d} calls, {size}x{size}: executor {1000 * base:6.1f} ms, "
                    f"ezrt arun {1000 * mine:6.1f} ms  (x executor {mine / base:4.2f}; "
                    f"ezrt range {1000 * min(runs['ezrt']):.1f}-{1000 * max(runs['ezrt']):.1f})"
                )


if __name__ == "__main__":
    main()
