"""Where the time goes: CPU per task on each thread, the floor pipeline against ezrt.

    python benchmarks/thread_cpu.py [--model add|cnn] [--workers 1] [--queue 32]
                                    [--rounds 4] [--seconds 1.0]

Runs the floor pipeline of ``engine_floor.py`` and ezrt ``run_async`` in one process,
alternating round by round, both driven by the same loop and callback, and prints for each
the CPU time per task (from ``/proc/self/task/*/schedstat``) and the context switches per
task (voluntary and not, from ``/proc/self/task/*/status``) of each role: the submitting
thread, the workers, the callback thread and any other thread (ONNX Runtime's own pool).
Linux only.

A switch is a thread going to sleep or being put aside: waiting for a token, a task, a
result, or for the GIL. On a machine with several cores each one costs a few microseconds
that show as CPU on both sides, so the switch counts explain much of the gap between two
pipelines that run the same Python on one core (try ``taskset -c 0``). This is how the
hand-over coalescing of ``engine/workers.py`` (``HOLD_SECONDS``) was found and checked.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import sys
import threading
import time
from typing import Callable, Counter, Dict, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ezrt import InferenceSession
from ezrt.bench import demo_model_path, make_feed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_floor import FloorPipeline, one_thread_sessions, submit_loop
from throughput import add_model

ROLES = ("submitter", "workers", "callback", "other")


def per_thread() -> Dict[int, Tuple[int, int]]:
    """Thread id -> (CPU nanoseconds, context switches) so far, for this process."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as handle:
                cpu = int(handle.read().split()[0])
            with open(f"/proc/self/task/{tid}/status") as handle:
                status = handle.read()
        except OSError:  # the thread ended meanwhile
            continue
        switches = sum(int(n) for n in re.findall(r"voluntary_ctxt_switches:\s+(\d+)", status))
        found[int(tid)] = (cpu, switches)
    return found


def role_of(name: str) -> str:
    if name == "MainThread":
        return "submitter"
    if "_work" in name or "-worker-" in name:
        return "workers"
    if "_deliver" in name or name.endswith("-callback"):
        return "callback"
    return "other"


def measure(contender: Callable[[float], int], seconds: float, into: Counter[str]) -> int:
    """Run ``contender`` once; add each role's CPU (ns) and switches to ``into``."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    before = per_thread()
    tasks = contender(seconds)
    after = per_thread()
    for tid, (cpu, switches) in after.items():
        cpu0, switches0 = before.get(tid, (0, 0))
        role = role_of(names.get(tid, ""))
        into[role] += cpu - cpu0
        into[role + " switches"] += switches - switches0
    into["tasks"] += tasks
    return tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("add", "cnn"), default="add")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    if args.model == "add":
        model: object = add_model()
        feed = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}
    else:
        model = demo_model_path()
        feed = make_feed(InferenceSession(model).get_inputs())
    session = InferenceSession(
        model,
        provider_options={"schedule": list(range(args.workers)), "max_queue_size": args.queue},
    )
    floor = FloorPipeline(one_thread_sessions(model, args.workers), args.queue)
    contenders = {
        "floor": floor.contender(feed),
        "ezrt": submit_loop(functools.partial(session.run_async, None, feed)),
    }
    totals: Dict[str, Counter[str]] = {name: collections.Counter() for name in contenders}
    walls: Counter[str] = collections.Counter()
    for contender in contenders.values():
        contender(0.2)  # warm-up
    for _ in range(args.rounds):
        for name, contender in contenders.items():
            started = time.perf_counter()
            measure(contender, args.seconds, totals[name])
            walls[name] += time.perf_counter() - started
    session.close()
    print(
        f"{args.model} model, {args.workers} worker(s), queue {args.queue}, "
        f"{args.rounds} rounds x {args.seconds:g} s each, CPU us / switches per task"
    )
    for name, total in totals.items():
        tasks = total["tasks"]
        cells = "  ".join(
            f"{role} {total[role] / 1e3 / tasks:6.2f}/{total[role + ' switches'] / tasks:4.2f}"
            for role in ROLES
        )
        print(f"  {name:5s} {walls[name] / tasks * 1e6:7.2f} us wall per task  {cells}")


if __name__ == "__main__":
    main()
