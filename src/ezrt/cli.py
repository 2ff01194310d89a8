"""The ``ezrt`` command: ``ezrt bench [MODEL]`` and ``ezrt info MODEL``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__
from .backends.onnxruntime import allowed_cpus
from .errors import EzrtError

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    from .bench import demo_model_path, run_rounds, standard_contenders

    model = args.model or demo_model_path()
    workers = args.workers or len(allowed_cpus())
    print(f"ezrt {__version__} bench: {'demo model (embedded CNN)' if not args.model else model}")
    print(
        f"{workers} worker(s) on CPUs {allowed_cpus()[:workers]}; {args.rounds} interleaved rounds "
        f"of {args.seconds:g} s each; figures are medians"
    )
    contenders, sessions = standard_contenders(
        model, workers, batch=args.batch, max_queue_size=args.max_queue_size
    )
    try:
        progress = (lambda text: print(f"  {text}...", file=sys.stderr)) if args.verbose else None
        results = run_rounds(
            contenders, rounds=args.rounds, seconds=args.seconds, progress=progress
        )
    finally:
        for session in sessions:
            session.close()
    base = results["ort-sync-1t"].median
    pool = next(m.median for name, m in results.items() if name.startswith("naive-pool"))
    width = max(len(name) for name in results)
    print(
        f"\n{'contender':<{width}}  {'samples/s':>10}  {'x ort-sync-1t':>13}  {'x naive-pool':>12}"
    )
    for name, measurement in results.items():
        value = measurement.median
        print(f"{name:<{width}}  {value:>10.1f}  {value / base:>13.2f}  {value / pool:>12.2f}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .session import InferenceSession, is_rknn_model

    with open(args.model, "rb") as handle:
        head = handle.read(16)
    if is_rknn_model(head):
        from .backends.rknn import abi
        from .backends.rknn.container import parse_container

        with open(args.model, "rb") as handle:
            container = parse_container(handle.read(), args.model)
        print(f"{args.model}: " + "\n".join(container.describe()))
        try:
            runtime = abi.load_runtime()
        except EzrtError:
            print(f"  runtime: not found ({abi.INSTALL_HINT})")
        else:
            print(f"  runtime: {runtime.path} (version {runtime.file_version() or 'unknown'})")
        return 0
    with InferenceSession(args.model) as session:
        meta = session.get_modelmeta()
        print(f"{args.model}: ONNX model, providers {session.get_providers()}")
        print(f"  producer: {meta.producer_name or '-'}  graph: {meta.graph_name or '-'}")
        for label, args_ in (("input", session.get_inputs()), ("output", session.get_outputs())):
            for arg in args_:
                print(f"  {label} {arg.name}: {arg.type} {arg.shape}")
        for key, value in meta.custom_metadata_map.items():
            print(f"  metadata {key} = {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ezrt", description="ezrt: inference on every core")
    parser.add_argument("--version", action="version", version=f"ezrt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench", help="throughput of ezrt's call styles against plain ONNX Runtime"
    )
    bench.add_argument("model", nargs="?", help="ONNX model (default: the embedded demo CNN)")
    bench.add_argument("--workers", type=int, default=0, help="workers (default: one per CPU)")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    bench.add_argument("--seconds", type=float, default=0.5, help="seconds per round (0.5)")
    bench.add_argument("--batch", type=int, default=8, help="batch-dispatch size (default 8)")
    bench.add_argument("--max-queue-size", type=int, default=3, help="max_queue_size (3)")
    bench.add_argument("-v", "--verbose", action="store_true", help="show progress on stderr")
    bench.set_defaults(func=_bench)

    info = commands.add_parser("info", help="what a model file contains")
    info.add_argument("model")
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
