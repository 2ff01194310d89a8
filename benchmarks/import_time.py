"""Is ``import ezrt`` as cheap as ``import onnxruntime``? Fresh interpreters, interleaved.

    python benchmarks/import_time.py [--rounds 15]

Each round starts one interpreter per statement and times only the statement inside it
(``time.perf_counter`` around it), in alternating order; medians and ratios. ``import ezrt``
loads neither numpy nor onnxruntime (target: <= 1.0 x ``import onnxruntime``);
``from ezrt import InferenceSession`` loads the session's modules and numpy (onnxruntime
itself loads when the first session opens).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Dict, List

CODE = "import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
STATEMENTS = (
    "import onnxruntime",
    "import ezrt",
    "from ezrt import InferenceSession",
    "import numpy",
)


def _environment() -> Dict[str, str]:
    """ezrt from this checkout, with bytecode caching on, as for an installed package (pip
    compiles it at install): a shell with PYTHONDONTWRITEBYTECODE would time the compiler."""
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _time(statement: str) -> float:
    env = _environment()
    done = subprocess.run(
        [sys.executable, "-c", CODE.format(statement=statement)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    for statement in STATEMENTS:  # writes the bytecode caches, and warms the disk cache
        _time(statement)
    times: Dict[str, List[float]] = {statement: [] for statement in STATEMENTS}
    for index in range(args.rounds):
        order = STATEMENTS if index % 2 == 0 else tuple(reversed(STATEMENTS))
        for statement in order:
            times[statement].append(_time(statement))
    medians = {statement: statistics.median(values) for statement, values in times.items()}
    base = medians["import onnxruntime"]
    for statement, median in medians.items():
        print(
            f"  {statement:36s} {1000 * median:6.1f} ms  x import onnxruntime "
            f"{median / base:4.2f}  (median of {args.rounds})"
        )


if __name__ == "__main__":
    main()
