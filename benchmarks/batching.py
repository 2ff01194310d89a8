"""What does dynamic batching (``max_batch_size``) buy? ezrt with and without it, against the
hand-made pool, on models with a free batch axis.

    python benchmarks/batching.py [--rounds 5] [--seconds 0.5]

Two parts, each with its contenders interleaved round by round; a ratio is the median of
the per-round ratios (``Measurement.ratio_to``):

* the trivial Add model ([N, 4] + [N, 4]), every CPU, about 40 tasks in flight
  (``max_queue_size=32``): ezrt ``run_async`` unbatched and with ``max_batch_size`` 8 and
  32, as ratios to unbatched ezrt (target: >= 4x);
* the demo CNN with its batch axis freed, every CPU: naive-pool (one 1-thread session per
  CPU, batch 1 calls, and the same pool calling with batch 8 itself), ezrt ``run_async``
  unbatched and with ``max_batch_size=8``, as ratios to naive-pool (target: >= 1.0x).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ezrt import InferenceSession
from ezrt.backends.onnxruntime import allowed_cpus
from ezrt.bench import (
    Contender,
    Measurement,
    demo_model_path,
    ezrt_contender,
    naive_pool,
    run_rounds,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import add_model


def free_batch(model: bytes) -> bytes:
    """The model with dim 0 of every graph input and output made symbolic ("N")."""
    proto = onnx.load_from_string(model)
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        dims[0].ClearField("dim_value")
        dims[0].dim_param = "N"
    return proto.SerializeToString()


def _report(title: str, results: Dict[str, Measurement], baseline: str) -> None:
    print(title)
    base = results[baseline]
    for name, measurement in results.items():
        print(
            f"  {name:34s} {measurement.median:10.1f} samples/s"
            f"  x {baseline}  {measurement.ratio_to(base):5.2f}"
        )


def add_part(rounds: int, seconds: float) -> None:
    model = free_batch(add_model())
    cpus = allowed_cpus()
    feed = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}
    sessions = {
        size: InferenceSession(
            model,
            provider_options={"schedule": cpus, "max_queue_size": 32, "max_batch_size": size},
        )
        for size in (1, 8, 32)
    }
    contenders: Dict[str, Contender] = {
        f"ezrt run_async, batch <= {size}" if size > 1 else "ezrt run_async, unbatched": (
            ezrt_contender(session, feed)
        )
        for size, session in sessions.items()
    }
    results = run_rounds(contenders, rounds=rounds, seconds=seconds)
    _report(
        f"trivial Add model [N, 4], {len(cpus)} workers, ~40 in flight, {rounds} rounds",
        results,
        "ezrt run_async, unbatched",
    )
    for session in sessions.values():
        session.close()


def cnn_part(rounds: int, seconds: float) -> None:
    with open(demo_model_path(), "rb") as handle:
        model = free_batch(handle.read())
    cpus = allowed_cpus()
    image = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
    batch8 = {"image": np.repeat(image, 8, axis=0)}
    unbatched = InferenceSession(model, provider_options={"schedule": cpus, "max_queue_size": 8})
    batched = InferenceSession(
        model, provider_options={"schedule": cpus, "max_queue_size": 16, "max_batch_size": 8}
    )
    pool_batch8 = naive_pool(model, batch8, len(cpus))
    contenders: Dict[str, Contender] = {
        f"naive-pool ({len(cpus)})": naive_pool(model, {"image": image}, len(cpus)),
        f"naive-pool ({len(cpus)}), batch 8 calls": lambda s: 8 * pool_batch8(s),
        "ezrt run_async, unbatched": ezrt_contender(unbatched, {"image": image}),
        "ezrt run_async, batch <= 8": ezrt_contender(batched, {"image": image}),
    }
    results = run_rounds(contenders, rounds=rounds, seconds=seconds)
    _report(
        f"demo CNN, batch axis freed, {len(cpus)} workers, {rounds} rounds",
        results,
        f"naive-pool ({len(cpus)})",
    )
    print(f"  batch sizes of the batched session: {batched.stats().batch_sizes}")
    unbatched.close()
    batched.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    add_part(args.rounds, args.seconds)
    cnn_part(args.rounds, args.seconds)


if __name__ == "__main__":
    main()
