"""The ``ezrt`` command: ``ezrt bench [MODEL]`` and ``ezrt info MODEL``."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Callable, Dict, List, Optional, TextIO

from . import __version__
from .backends.onnxruntime import allowed_cpus
from .errors import EzrtError

__all__ = ["main"]

SWEEPABLE = ("workers", "threads_per_core", "max_queue_size", "depth", "batch")


def _shape_arg(text: str) -> tuple[str, List[int]]:
    name, _, dims = text.partition("=")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=1x3x224x224 (got {text!r})") from None
    if not name or not dims or any(d < 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--shape wants NAME=1x3x224x224 (got {text!r})")
    return name, shape


def _sweep_arg(text: str) -> tuple[str, List[int]]:
    name, _, values = text.partition("=")
    if name not in SWEEPABLE:
        raise argparse.ArgumentTypeError(f"--sweep parameter must be one of {', '.join(SWEEPABLE)}")
    try:
        return name, [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep wants NAME=1,2,4 (got {text!r})") from None


def _provider_options(args: argparse.Namespace, workers: Optional[int] = None) -> Dict[str, Any]:
    options: Dict[str, Any] = {"max_queue_size": args.max_queue_size}
    if args.threads_per_core:
        options["threads_per_core"] = args.threads_per_core
    if args.sequential is not None:
        options["sequential_callbacks"] = args.sequential
    if args.tp_mode:
        options["tp_mode"] = args.tp_mode
    elif args.schedule and workers is None:
        options["schedule"] = args.schedule
    else:
        count = workers or args.workers or len(allowed_cpus())
        options["schedule"] = (
            allowed_cpus()[:count] if count <= len(allowed_cpus()) else list(range(count))
        )
    return options


def _progress(
    enabled: bool, duration: float
) -> tuple[Optional[Callable[[float, int], None]], Callable[[], None]]:
    """A tqdm bar over the measured seconds, or nothing (not a terminal, or tqdm missing)."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        print('(install "ezrt[bench]" for a live progress bar)', file=sys.stderr)
        return None, lambda: None
    bar = tqdm(
        total=round(duration, 1),
        unit="s",
        leave=False,
        bar_format="{l_bar}{bar}| {n:.1f}/{total} s {postfix}",
    )

    def update(elapsed: float, done: int) -> None:
        bar.n = min(round(elapsed, 1), bar.total)
        bar.set_postfix_str(f"{done} done, {done / max(elapsed, 1e-9):.0f}/s", refresh=True)

    return update, bar.close


def _report(result: Any, out: TextIO) -> None:
    data = result.as_dict()
    lat = data["latency_ms"]
    stable = data["stability"]
    print(f"--- {data['mode']}  options {data['options']}", file=out)
    print(
        f"first run latency   {data['first_run_ms']:.2f} ms   warm-up tasks {data['warmup_tasks']}",
        file=out,
    )
    print(
        f"throughput          {data['throughput_samples_per_s']:.1f} samples/s "
        f"({data['samples']} samples in {data['measured_seconds']:.2f} s)",
        file=out,
    )
    windows = ", ".join(f"{rate:.0f}" for rate in data["windows_samples_per_s"])
    verdict = "stable" if stable["stable"] else "UNSTABLE"
    spread = f"{stable['spread'] * 100:.1f} %" if stable.get("spread") is not None else "n/a"
    print(f"windows             {windows} samples/s; {verdict} (last 3 within {spread})", file=out)
    if lat:
        print(
            "latency (ms)        "
            + "  ".join(f"{key} {value:.3f}" for key, value in lat.items())
            + "   [nearest rank]",
            file=out,
        )
    parts = [
        f"{name.replace('_', ' ')} {b['mean_ms']:.3f}/{b['p99_ms_est']:.3f}"
        for name, b in data["breakdown"].items()
        if b["count"]
    ]
    print("breakdown (ms)      " + "  ".join(parts) + "   [mean/p99 est.]", file=out)
    busy = "  ".join(f"{w} {u * 100:.0f} %" for w, u in data["worker_utilisation"].items())
    print(f"worker utilisation  {busy}", file=out)
    depth = data["queue_depth"]
    print(
        f"tasks in flight     mean {depth['mean']:.1f}, max {depth['max']} "
        f"(sampled every {depth['period_s'] * 1000:.0f} ms)",
        file=out,
    )


def _plot(results: List[Any], path: str) -> None:
    import matplotlib

    from .bench import DEPTH_PERIOD

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right, depth) = plt.subplots(1, 3, figsize=(15, 4))
    for result in results:
        label = f"{result.mode} {result.options}"
        left.hist(result.latencies_ms, bins=60, alpha=0.6, label=label)
        times = result.completion_times
        if times and result.seconds > 0:
            bins = 40  # equal bins over the measured time, plotted at their centres
            width = result.seconds / bins
            counts = [0] * bins
            for t in times:
                counts[min(int(t / width), bins - 1)] += result.samples_per_task
            right.plot(
                [(i + 0.5) * width for i in range(bins)], [c / width for c in counts], label=label
            )
        series = result.queue_depths
        depth.plot([(i + 1) * DEPTH_PERIOD for i in range(len(series))], series, label=label)
    left.set(title="latency", xlabel="ms", ylabel="tasks")
    right.set(title="throughput over time", xlabel="s", ylabel="samples/s")
    depth.set(title="tasks in flight", xlabel="s", ylabel="queued + running + awaiting callback")
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _compare(
    args: argparse.Namespace, model: str, session: Any, feed: Dict[str, Any], out: TextIO
) -> Dict[str, Any]:
    from .bench import ezrt_contender, naive_pool, ort_run_async, ort_sync, run_rounds

    workers = session._live_engine().worker_count
    contenders = {
        "ort-sync-1t": ort_sync(model, feed, 1),
        "ort-sync-default": ort_sync(model, feed, 0),
        "ort-run_async": ort_run_async(model, feed, 2 * workers),
        f"naive-pool ({workers})": naive_pool(model, feed, workers),
        f"ezrt {args.mode} ({workers} workers)": ezrt_contender(
            session, feed, args.mode, args.batch, args.depth
        ),
    }
    results = run_rounds(contenders, rounds=args.rounds, seconds=min(args.duration, 0.5))
    base = results["ort-sync-1t"].median
    pool = results[f"naive-pool ({workers})"].median
    ezrt = results[f"ezrt {args.mode} ({workers} workers)"].median
    width = max(len(name) for name in results)
    print(f"\n--- compare ({args.rounds} interleaved rounds, medians)", file=out)
    print(f"{'contender':<{width}}  {'samples/s':>10}  {'ezrt is x':>9}", file=out)
    for name, m in results.items():
        ratio = ezrt / m.median if m.median else float("nan")
        print(f"{name:<{width}}  {m.median:>10.1f}  {ratio:>9.2f}", file=out)
    print(f"(ezrt vs naive-pool: {ezrt / pool:.2f}; vs ort-sync-1t: {ezrt / base:.2f})", file=out)
    return {name: m.median for name, m in results.items()}


def _bench(args: argparse.Namespace) -> int:
    from .bench import demo_model_path, load_inputs, make_feed, measure
    from .session import InferenceSession

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print('--plot needs matplotlib: pip install "ezrt[plot]"', file=sys.stderr)
            return 2
    model = args.model or demo_model_path()
    compare = args.compare or args.model is None
    out = sys.stderr if args.json == "-" else sys.stdout
    print(
        f"ezrt {__version__} bench: {model if args.model else 'demo model (embedded CNN)'}",
        file=out,
    )
    print(
        f"mode {args.mode}; warm-up {args.warmup:g} s; measure {args.duration:g} s and at least "
        f"{args.min_count} tasks; CPUs available {allowed_cpus()}",
        file=out,
    )
    configs: List[Dict[str, Any]] = []
    if args.sweep:
        name, values = args.sweep
        for value in values:
            configs.append({name: value})
    else:
        configs.append({})
    results: List[Any] = []
    runs: List[Dict[str, Any]] = []
    report: Dict[str, Any] = {"model": model, "version": __version__, "runs": runs}
    for override in configs:
        workers = override.get("workers")
        options = _provider_options(args, workers)
        for key in ("threads_per_core", "max_queue_size"):
            if key in override:
                options[key] = override[key]
        batch = override.get("batch", args.batch)
        depth = override.get("depth", args.depth)
        with InferenceSession(model, provider_options=options) as session:
            if args.input:
                feed = load_inputs(args.input, session.get_inputs())
            else:
                feed = make_feed(session.get_inputs(), dict(args.shape or []))
            update, finish = _progress(not args.no_progress, args.duration)
            try:
                result = measure(
                    session,
                    feed,
                    mode=args.mode,
                    duration=args.duration,
                    min_count=args.min_count,
                    warmup=args.warmup,
                    batch=batch,
                    depth=depth,
                    progress=update,
                )
            finally:
                finish()
            result.options = {
                **options,
                **({"batch": batch} if args.mode == "batch" else {}),
                **({"depth": depth} if args.mode == "pipeline" else {}),
            }
            _report(result, out)
            entry = result.as_dict()
            if compare and not args.sweep:
                if session.get_providers()[0] == "RKNNExecutionProvider":
                    print("(--compare runs ONNX Runtime baselines: not for RKNN models)", file=out)
                else:
                    entry["compare_samples_per_s"] = _compare(args, model, session, feed, out)
        results.append(result)
        runs.append(entry)
    if args.sweep:
        name = args.sweep[0]
        print(f"\n--- sweep {name}: throughput against p99", file=out)
        print(f"{name:>16}  {'samples/s':>10}  {'p50 ms':>8}  {'p99 ms':>8}", file=out)
        for override, result in zip(configs, results):
            lat = result.latency_summary()
            print(
                f"{override[name]:>16}  {result.throughput:>10.1f}  "
                f"{lat.get('median', 0):>8.3f}  {lat.get('p99', 0):>8.3f}",
                file=out,
            )
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as handle:
                handle.write(text + "\n")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                [
                    "mode",
                    "options",
                    "samples",
                    "seconds",
                    "samples_per_s",
                    "p50_ms",
                    "p90_ms",
                    "p99_ms",
                    "p99.9_ms",
                    "first_run_ms",
                    "stable",
                ]
            )
            for result in results:
                lat = result.latency_summary()
                writer.writerow(
                    [
                        result.mode,
                        json.dumps(result.options),
                        result.samples,
                        f"{result.seconds:.4f}",
                        f"{result.throughput:.2f}",
                        lat.get("median"),
                        lat.get("p90"),
                        lat.get("p99"),
                        lat.get("p99.9"),
                        f"{result.first_run_ms:.3f}",
                        result.stability()["stable"],
                    ]
                )
    if args.plot:
        _plot(results, args.plot)
        print(f"plot written to {args.plot}", file=out)
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
        "bench",
        help="measure throughput and latency (trtexec-style); with no MODEL, the embedded demo "
        "model against plain ONNX Runtime",
    )
    bench.add_argument(
        "model", nargs="?", help="ONNX or RKNN model (default: the demo CNN, with --compare)"
    )
    bench.add_argument(
        "--mode", choices=("run", "run_async", "pipeline", "batch"), default="run_async"
    )
    bench.add_argument("--duration", type=float, default=3.0, help="seconds to measure (3)")
    bench.add_argument("--min-count", type=int, default=100, help="at least this many tasks (100)")
    bench.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    bench.add_argument("--workers", type=int, default=0, help="workers, one per CPU/NPU core (all)")
    bench.add_argument("--schedule", help='cores, e.g. "0,1,2" (instead of --workers)')
    bench.add_argument("--threads-per-core", type=int, default=0)
    bench.add_argument("--max-queue-size", type=int, default=3)
    bench.add_argument("--sequential", dest="sequential", action="store_true", default=None)
    bench.add_argument("--no-sequential", dest="sequential", action="store_false")
    bench.add_argument("--tp-mode", help="auto, all, 0, 1, 2, 0,1 or 0,1,2 (one worker, split)")
    bench.add_argument("--batch", type=int, default=8, help="samples per call in batch mode (8)")
    bench.add_argument("--depth", type=int, default=3, help="run_pipeline depth (3)")
    bench.add_argument(
        "--shape", type=_shape_arg, action="append", help="NAME=1x3x224x224 for symbolic dims"
    )
    bench.add_argument("--input", help=".npy (first input) or .npz (by input name) to feed")
    bench.add_argument(
        "--sweep", type=_sweep_arg, help=f"NAME=v1,v2,... with NAME in {', '.join(SWEEPABLE)}"
    )
    bench.add_argument(
        "--compare", action="store_true", help="also run the BENCHMARKS.md baselines"
    )
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds for --compare (5)")
    bench.add_argument("--json", help="write the report as JSON to FILE ('-': stdout)")
    bench.add_argument("--csv", help="write one row per configuration to FILE")
    bench.add_argument("--plot", help="latency histogram and throughput over time, as PNG")
    bench.add_argument("--no-progress", action="store_true", help="no live progress bar")
    bench.set_defaults(func=_bench)

    info = commands.add_parser("info", help="what a model file contains")
    info.add_argument("model")
    info.set_defaults(func=_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EzrtError as error:
        print(f"ezrt: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
