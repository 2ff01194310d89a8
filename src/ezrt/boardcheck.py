"""A check to run on a Rockchip board: ``python -m ezrt.boardcheck MODEL``.

It opens the model on the NPU, runs it through the copy path and through zero copy (both
``zero_copy_layout`` modes on RKNPU2) with the same inputs, compares the outputs, then runs
bound inferences on every worker beside ``run_async`` traffic, and closes. Each step prints
one line; the last line is ``RESULT: PASS`` or ``RESULT: FAIL (<step>)``. Exit status 0 on
PASS. See the README section "Checking a board".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["main"]


def _inputs(session: Any, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Random inputs in each tensor's own zero-copy type (so both paths see the same bytes)."""
    feeds = {}
    zc = session._backend.zero_copy
    for spec in zc.inputs:
        dtype = spec.dtype
        if dtype.kind == "f":
            data = rng.uniform(-1, 1, spec.shape)
        elif dtype.kind == "b":
            data = rng.integers(0, 2, spec.shape)
        else:
            data = rng.integers(0, 20, spec.shape)
        feeds[spec.name] = data.astype(dtype)
    return feeds


def _bound(session: Any, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    from .ortvalue import OrtValue

    binding = session.io_binding()
    device = session._backend.zero_copy.family
    for name, array in feeds.items():
        value = OrtValue.ortvalue_from_numpy(
            array, device, session=session, name=name, io_kind="input"
        )
        binding.bind_ortvalue_input(name, value)
    session.run_with_iobinding(binding)
    return list(binding.copy_outputs_to_cpu())


def _difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def _copy_feeds(session: Any, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The same data as the copy path takes it (its shapes are the logical ones)."""
    return {arg.name: feeds[arg.name].reshape(arg.shape) for arg in session.get_inputs()}


def main(argv: Optional[List[str]] = None) -> int:
    """Run the board check; returns the exit status."""
    import ezrt

    parser = argparse.ArgumentParser(prog="python -m ezrt.boardcheck")
    parser.add_argument("model", help="an .rknn (RKNPU2) or RKNX (RKNPU3) model")
    parser.add_argument("--schedule", default="0,1,2", help="NPU cores for the worker step")
    parser.add_argument("--runs", type=int, default=30, help="inferences per step")
    parser.add_argument("--tolerance", type=float, default=1e-2, help="largest |difference|")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    step = "open"

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        with ezrt.InferenceSession(args.model, provider_options=_options(args.model)) as s:
            backend: Any = s._backend
            family = backend.zero_copy.family
            say(f"ezrt {ezrt.__version__} board check: {args.model}")
            say(f"runtime: {backend.runtime_path}")
            say(f"provider: {s.get_providers()[0]}")
            for label, args_ in (
                ("input", s.get_inputs()),
                ("native input", s.get_native_inputs()),
            ):
                for arg in args_:
                    say(f"{label}: {arg.name} {arg.type} {arg.shape} {arg.layout} {arg.strides}")
            feeds = _inputs(s, rng)
            step = "copy path"
            times = []
            for _ in range(3):
                started = time.perf_counter()
                copied = s.run(None, _copy_feeds(s, feeds))
                times.append(time.perf_counter() - started)
            say(f"copy path: ok ({1000 * statistics.median(times):.2f} ms median)")
            step = "zero copy"
            zero = _bound(s, feeds)
            difference = _difference(copied, zero)
            say(f"zero copy ({family}): max |copy - zero copy| = {difference:.3g}")
            if difference > args.tolerance:
                raise AssertionError(f"zero copy differs from the copy path by {difference}")
        if family == "rknpu2":
            step = "zero copy, native layout"
            native_options = {**_options(args.model), "zero_copy_layout": "native"}
            with ezrt.InferenceSession(args.model, provider_options=native_options) as s:
                difference = _difference(copied, _bound(s, feeds))
            say(f"zero copy, zero_copy_layout=native: max |copy - zero copy| = {difference:.3g}")
            if difference > args.tolerance:
                raise AssertionError(f"native zero copy differs by {difference}")
        step = "every worker"
        rate = _every_worker(args, feeds, copied, family)
        say(f"every worker: bound runs beside run_async agree, {rate:.1f} inferences/s")
        step = "close"
        say("close: every context and NPU buffer released")
    except Exception as exc:  # a board check reports, it does not trace back
        say(f"{step}: {type(exc).__name__}: {exc}")
        say(f"RESULT: FAIL ({step})")
        return 1
    say("RESULT: PASS")
    return 0


def _options(model: str) -> Dict[str, Any]:
    with open(model, "rb") as handle:
        head = handle.read(4)
    return {} if head == b"RKNX" else {"output_dtype": "native"}


def _every_worker(
    args: argparse.Namespace, feeds: Dict[str, np.ndarray], copied: List[np.ndarray], family: str
) -> float:
    import ezrt

    options = _options(args.model)
    if family == "rknpu2":
        options["schedule"] = args.schedule
    else:
        options["threads_per_core"] = 2
    failures: List[BaseException] = []
    done = threading.Semaphore(0)
    with ezrt.InferenceSession(args.model, provider_options=options) as s:
        copy_feeds = _copy_feeds(s, feeds)

        def check(outputs: Any, user: Any, err: str) -> None:
            if err or _difference(copied, outputs) > args.tolerance:
                failures.append(AssertionError(err or "run_async result differs"))
            done.release()

        def bound() -> None:
            try:
                for _ in range(args.runs):
                    if _difference(copied, _bound(s, feeds)) > args.tolerance:
                        raise AssertionError("a bound run differs")
            except BaseException as exc:
                failures.append(exc)

        started = time.perf_counter()
        threads = [threading.Thread(target=bound) for _ in range(3)]
        for thread in threads:
            thread.start()
        for _ in range(args.runs):
            s.run_async(None, copy_feeds, check)
        for thread in threads:
            thread.join()
        for _ in range(args.runs):
            done.acquire()
        elapsed = time.perf_counter() - started
    if failures:
        raise failures[0]
    return float(4 * args.runs / elapsed)


if __name__ == "__main__":  # pragma: no cover - run by hand on a board
    sys.exit(main())
