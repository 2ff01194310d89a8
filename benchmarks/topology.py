"""Does a user ever lose by switching ezrt on? A lone caller against stock ONNX Runtime, busy
callers against a hand-made pool, and peak memory against both, on the same models.

    python benchmarks/topology.py [--rounds 7] [--seconds 0.4] [--parts lone busy memory]

ezrt runs with ``schedule`` over every CPU (the data-parallel setup; defaults otherwise:
``lone_run="auto"``, which is ``"all_cores"`` with ezrt's own session options, and
``share_weights=True``). Models, built here with onnx.helper:

* ``demo_cnn``: the embedded demo CNN (~1 ms, small weights);
* ``conv320``: a 320x320 conv net where intra-op threads help a lone call;
* ``act640``: an activation-heavy 640x640 detector-like conv net;
* ``weights128``: eight 2048x2048 MatMul layers, 128 MiB of weights, small activations.

Parts (contenders interleaved round by round; medians, and ratios as medians of the
per-round ratios):

* lone: one caller in a loop; stock ``onnxruntime.InferenceSession`` with its default
  threading against ezrt's ``run``, ``submit(...).result()`` and ``await arun`` loops
  (target: >= 1.0x stock);
* busy: as many callers as CPUs; naive-pool (one 1-thread session per caller) against ezrt
  ``run`` from the same callers and ``run_async`` (target: >= the floor's figure, ~0.9-1.0x);
* memory: peak resident memory (VmHWM) of a fresh process that builds the sessions and runs
  lone then busy calls, above the same process's footprint before any session; stock one
  session, naive-pool, ezrt (targets: weights128 <= 1.1x stock; act640 <= naive-pool), with
  ONNX Runtime's CPU arena on and off (off: ``enable_cpu_mem_arena=False`` in the caller's
  SessionOptions, which ezrt then uses as given: no shared weights).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import onnxruntime as ort

import ezrt
from ezrt.backends.onnxruntime import allowed_cpus
from ezrt.bench import demo_model_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_floor import submit_loop

RNG = np.random.default_rng(0)


def _save(graph: Any, directory: str, name: str) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = os.path.join(directory, f"{name}.onnx")
    onnx.save(model, path)
    return path


def weights128(directory: str) -> str:
    width, nodes, inits, x = 2048, [], [], "x"
    for i in range(8):
        w = (RNG.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(
            np.float32
        )
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(np.full(width, 0.01, np.float32), f"B{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        "weights128",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        inits,
    )
    return _save(graph, directory, "weights128")


def conv_net(directory: str, name: str, size: int, stages: List[tuple]) -> str:
    nodes, inits, x, cin = [], [], "image", 3
    for i, (cout, stride) in enumerate(stages):
        w = RNG.standard_normal((cout, cin, 3, 3), dtype=np.float32) * np.sqrt(2 / (cin * 9))
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
            numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [x, f"w{i}", f"b{i}"],
                [f"c{i}"],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        x, cin = f"r{i}", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["y"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cin, 1, 1])],
        inits,
    )
    return _save(graph, directory, name)


def build_models(directory: str) -> Dict[str, str]:
    return {
        "demo_cnn": demo_model_path(),
        "conv320": conv_net(
            directory, "conv320", 320, [(32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)]
        ),
        "act640": conv_net(
            directory,
            "act640",
            640,
            [(16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2)],
        ),
        "weights128": weights128(directory),
    }


def feed_of(path: str) -> Dict[str, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return {
        arg.name: RNG.random([d if isinstance(d, int) else 1 for d in arg.shape], np.float32)
        for arg in session.get_inputs()
    }


# ---------------------------------------------------------------------- speed


def _loop(call: Callable[[], Any], seconds: float) -> float:
    count, end = 0, time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < end:
        call()
        count += 1
    return count / (time.perf_counter() - started)


def _async_loop(session: Any, feed: Any, seconds: float) -> float:
    async def main() -> float:
        count, end = 0, time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < end:
            await session.arun(None, feed)
            count += 1
        return count / (time.perf_counter() - started)

    return asyncio.run(main())


def _callers(call: Callable[[], Any], n: int, seconds: float) -> float:
    counts = [0] * n

    def one(i: int) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            call(i)
            counts[i] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def _run_async_rate(session: Any, feed: Any, seconds: float) -> float:
    started = time.perf_counter()
    count = submit_loop(functools.partial(session.run_async, None, feed))(seconds)
    return count / (time.perf_counter() - started)


#: A pause between contenders: the intra-op threads of the one before (stock ONNX Runtime's
#: or ezrt's) may still spin for a moment after its last run, taking a core from the next.
QUIET = 0.05


def _rounds(contenders: Dict[str, Callable[[], float]], rounds: int) -> Dict[str, List[float]]:
    """Each contender's rate per round, the contenders interleaved round by round."""
    for contender in contenders.values():
        contender()  # warm-up
    rates: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, contender in contenders.items():
            time.sleep(QUIET)
            rates[name].append(contender())
    return rates


def _print(title: str, rates: Dict[str, List[float]], baseline: str) -> None:
    """Median rates, and ratios as the median of the per-round ratios to ``baseline``."""
    print(title)
    base = rates[baseline]
    for name, mine in rates.items():
        ratio = statistics.median(m / b for m, b in zip(mine, base))
        print(f"  {name:36s} {statistics.median(mine):9.1f}/s  x {baseline}  {ratio:4.2f}")


def _lone_contenders(path: str, seconds: float) -> Dict[str, Callable[[], float]]:
    feed = feed_of(path)
    stock = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    session = ezrt.InferenceSession(path, provider_options={"schedule": allowed_cpus()})
    return {
        "stock onnxruntime (default threads)": lambda: _loop(
            lambda: stock.run(None, feed), seconds
        ),
        "ezrt run": lambda: _loop(lambda: session.run(None, feed), seconds),
        "ezrt submit().result()": lambda: _loop(
            lambda: session.submit(None, feed).result(), seconds
        ),
        "ezrt await arun": lambda: _async_loop(session, feed, seconds),
    }


def lone(models: Dict[str, str], rounds: int, seconds: float) -> None:
    for name, path in models.items():
        _print(
            f"lone caller, {name}, ezrt schedule={allowed_cpus()}, {rounds} rounds",
            _rounds(_lone_contenders(path, seconds), rounds),
            "stock onnxruntime (default threads)",
        )


def _busy_contenders(path: str, seconds: float) -> Dict[str, Callable[[], float]]:
    cpus = allowed_cpus()
    feed = feed_of(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    pool = [ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]) for _ in cpus]
    session = ezrt.InferenceSession(path, provider_options={"schedule": cpus, "max_queue_size": 8})
    return {
        f"naive-pool ({len(cpus)} callers)": lambda: _callers(
            lambda i: pool[i].run(None, feed), len(cpus), seconds
        ),
        f"ezrt run ({len(cpus)} callers)": lambda: _callers(
            lambda i: session.run(None, feed), len(cpus), seconds
        ),
        "ezrt run_async (1 submitter)": lambda: _run_async_rate(session, feed, seconds),
    }


def busy(models: Dict[str, str], rounds: int, seconds: float) -> None:
    for name, path in models.items():
        rates = _rounds(_busy_contenders(path, seconds), rounds)
        _print(f"busy callers, {name}, {rounds} rounds", rates, next(iter(rates)))


# ---------------------------------------------------------------------- memory

CHILD = r"""
import json, sys, threading
import numpy as np, onnxruntime as ort, ezrt
from ezrt.backends.onnxruntime import allowed_cpus

def hwm():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

path, contender, arena = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
shapes = json.loads(sys.argv[4])  # from the parent: no session before the baseline
feed = {name: np.random.rand(*shape).astype(np.float32) for name, shape in shapes.items()}
base = hwm()
cpus = allowed_cpus()
options = None
if not arena:
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
if contender == "stock":
    sessions = [ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])]
    calls = [lambda: sessions[0].run(None, feed)] * len(cpus)
elif contender == "naive-pool":
    one = options or ort.SessionOptions()
    one.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(path, one, providers=["CPUExecutionProvider"]) for _ in cpus]
    calls = [lambda s=s: s.run(None, feed) for s in sessions]
else:
    session = ezrt.InferenceSession(path, options, provider_options={"schedule": cpus})
    calls = [lambda: session.run(None, feed)] * len(cpus)
for _ in range(5):
    calls[0]()  # lone calls
def caller(call):
    for _ in range(10):
        call()
threads = [threading.Thread(target=caller, args=(c,)) for c in calls]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"peak": hwm() - base}))
"""


def memory(models: Dict[str, str], rounds: int) -> None:
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))
    env = {**os.environ, "PYTHONPATH": src}
    for name in ("weights128", "act640"):
        shapes = json.dumps({k: list(v.shape) for k, v in feed_of(models[name]).items()})
        for arena in ("1", "0"):
            peaks: Dict[str, List[float]] = {c: [] for c in ("stock", "naive-pool", "ezrt")}
            for _ in range(rounds):
                for contender in peaks:
                    out = subprocess.run(
                        [sys.executable, "-c", CHILD, models[name], contender, arena, shapes],
                        capture_output=True,
                        text=True,
                        check=True,
                        env=env,
                    )
                    peaks[contender].append(json.loads(out.stdout.strip().splitlines()[-1])["peak"])
            medians = {c: statistics.median(v) for c, v in peaks.items()}
            print(
                f"peak memory above the process before any session, {name}, arena "
                f"{'on' if arena == '1' else 'off'}, {rounds} fresh processes each, medians"
            )
            for contender, peak in medians.items():
                print(
                    f"  {contender:12s} {peak:7.1f} MiB  x stock {peak / medians['stock']:4.2f}"
                    f"  x naive-pool {peak / medians['naive-pool']:4.2f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.4)
    parser.add_argument("--parts", nargs="+", default=["lone", "busy", "memory"])
    parser.add_argument(
        "--models", nargs="+", default=["demo_cnn", "conv320", "act640", "weights128"]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        models = build_models(directory)
        chosen = {name: models[name] for name in args.models}
        if "lone" in args.parts:
            lone(chosen, args.rounds, args.seconds)
        if "busy" in args.parts:
            busy(chosen, args.rounds, args.seconds)
        if "memory" in args.parts:
            memory(models, max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
