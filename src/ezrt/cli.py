"""The ``ezrt`` command: ``ezrt bench [MODEL]`` and ``ezrt info [MODEL]``.

Every command reports a bad model file, a missing runtime or a bad argument as one
``ezrt: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import ctypes.util
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from ._version import __version__
from .backends.onnxruntime import allowed_cpus
from .errors import BackendUnavailableError, EzrtError, InvalidArgumentError

__all__ = ["build_parser", "main"]

SWEEPABLE = (
    "workers",
    "threads_per_core",
    "max_queue_size",
    "max_batch_size",
    "depth",
    "batch",
    "rate",
)
RKNN = "RKNNExecutionProvider"

#: ``--provider`` short names and the execution providers they select.
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "RKNN": "RKNNExecutionProvider",
}
SHAPE_HELP = "NAME:1x3x224x224 or NAME=1x3x224x224"

# ------------------------------------------------------------------------ arguments


def _shape_arg(text: str) -> Tuple[str, List[int]]:
    """``NAME:1x3x224x224`` (trtexec, perf_analyzer) or ``NAME=1x3x224x224``. The last
    separator splits, so names with a colon ("input:0:1x3") work."""
    separator = "=" if "=" in text else ":"
    name, _, dims = text.rpartition(separator)
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants {SHAPE_HELP} (got {text!r})") from None
    if not name or any(d < 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--shape wants {SHAPE_HELP} (got {text!r})")
    return name, shape


def _sweep_arg(text: str) -> Tuple[str, List[int]]:
    name, _, values = text.partition("=")
    if name not in SWEEPABLE:
        raise argparse.ArgumentTypeError(f"--sweep parameter must be one of {', '.join(SWEEPABLE)}")
    try:
        return name, [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep wants NAME=1,2,4 (got {text!r})") from None


def _provider_arg(text: str) -> str:
    """CPU, CUDA or RKNN (any case), or the full execution provider name."""
    for short, full in PROVIDERS.items():
        if text.upper() in (short, full.upper()):
            return full
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(PROVIDERS)} (got {text!r})")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"wants a positive number (got {text!r})")
        return value

    return parse


# ------------------------------------------------------------------------ progress


class Progress:
    """Progress on stderr over every phase of a bench: a live bar on a terminal (tqdm when
    installed, else a rewritten status line), one plain line per phase when stderr is not a
    terminal (logs, CI), nothing when disabled."""

    def __init__(self, enabled: bool, stream: Optional[TextIO] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = enabled and self.stream.isatty()
        self.log = enabled and not self.live
        self._bar: Any = None
        self._status = ""
        self._stage = ""
        self._name, self._total, self._unit = "", 0.0, "s"
        self._last: Tuple[float, str] = (0.0, "")

    def phase(self, name: str, total: float, unit: str = "s") -> None:
        """Start a phase of ``total`` units (seconds, or runs for --compare)."""
        self.close()
        self._name, self._total, self._unit, self._stage = name, total, unit, ""
        if self.log:
            print(f"ezrt bench: {name} ({total:g} {unit})", file=self.stream, flush=True)
        elif self.live:
            try:
                from tqdm import tqdm
            except ImportError:
                self._bar = None
            else:
                self._bar = tqdm(
                    total=round(total, 1),
                    desc=name,
                    unit=unit,
                    leave=False,
                    file=self.stream,
                    bar_format="{l_bar}{bar}| {n:.1f}/{total} " + unit + " {postfix}",
                )
            self.update(0.0)

    def stage(self, name: str) -> None:
        """A step inside the phase (a --compare round): a log line, or the bar's label."""
        if name == self._stage:
            return
        self._stage = name
        if self.log:
            print(f"ezrt bench: {self._name}: {name}", file=self.stream, flush=True)
        elif self._bar is not None:
            self._bar.set_description_str(f"{self._name}: {name}")
        else:
            self.update(*self._last)

    def update(self, done: float, postfix: str = "") -> None:
        """How far the phase is (live display only)."""
        if not self.live:
            return
        self._last = (done, postfix)
        done = min(round(done, 1), round(self._total, 1))
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(postfix, refresh=True)
            return
        label = f"{self._name}: {self._stage} " if self._stage else f"{self._name} "
        text = f"{label}{done:.1f}/{self._total:g} {self._unit} {postfix}".rstrip()
        self.stream.write("\r" + text.ljust(len(self._status)))
        self.stream.flush()
        self._status = text

    def timed(self, elapsed: float, completed: int) -> None:
        """``measure``'s progress callback: seconds elapsed and tasks completed."""
        self.update(elapsed, f"{completed} done, {completed / max(elapsed, 1e-9):.0f}/s")

    def close(self) -> None:
        """End the current phase's live display (the log needs no ending)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._status:
            self.stream.write("\r" + " " * len(self._status) + "\r")
            self.stream.flush()
            self._status = ""


# ------------------------------------------------------------------------ bench


def _read_head(path: str) -> bytes:
    """The first bytes of a model file (raises OSError: missing, unreadable, a folder)."""
    with open(path, "rb") as handle:
        return handle.read(16)


def _choose_provider(args: argparse.Namespace, model: str) -> str:
    """The execution provider for MODEL: --provider, checked against the model and this
    onnxruntime, or the one the model's bytes call for."""
    from .backends.onnxruntime import available_providers
    from .session import is_rknn_model

    rknn_file = is_rknn_model(_read_head(model))
    wanted = args.provider or (RKNN if rknn_file else "CPUExecutionProvider")
    if wanted == RKNN and not rknn_file:
        raise InvalidArgumentError(
            f"--provider RKNN runs .rknn models; {model} is not one (convert an ONNX model "
            "with Rockchip's rknn-toolkit2)"
        )
    if wanted != RKNN and rknn_file:
        raise InvalidArgumentError(f"{model} is an RKNN model: it runs only with --provider RKNN")
    if wanted != RKNN and wanted not in available_providers():
        short = next(k for k, v in PROVIDERS.items() if v == wanted)
        raise BackendUnavailableError(
            f"--provider {short}: this onnxruntime has no {wanted} (it has "
            f"{', '.join(available_providers())}); for CUDA install onnxruntime-gpu"
        )
    return wanted


def _schedule(args: argparse.Namespace, provider: str, workers: Optional[int]) -> Any:
    """``schedule`` for the session: CPU ids (one worker per CPU by default), GPU ids or
    NPU cores (``--workers N``: the first N), or --schedule as given."""
    if args.schedule and workers is None:
        return args.schedule
    count = workers or args.workers
    if provider == "CPUExecutionProvider":
        cpus = allowed_cpus()
        count = count or len(cpus)
        return cpus[:count] if count <= len(cpus) else list(range(count))
    if count:
        return list(range(count))
    return [0] if provider == "CUDAExecutionProvider" else None  # RKNN: the runtime's choice


def _provider_options(
    args: argparse.Namespace, workers: Optional[int] = None, provider: str = "CPUExecutionProvider"
) -> Dict[str, Any]:
    options: Dict[str, Any] = {"max_queue_size": args.max_queue_size}
    if args.threads_per_core:
        options["threads_per_core"] = args.threads_per_core
    if args.sequential is not None:
        options["sequential_callbacks"] = args.sequential
    if args.max_batch_size > 1:
        options["max_batch_size"] = args.max_batch_size
        options["batch_timeout_us"] = args.batch_timeout_us
    if args.tp_mode:
        options["tp_mode"] = args.tp_mode
        return options
    schedule = _schedule(args, provider, workers)
    if schedule is not None:
        options["schedule"] = schedule
    return options


def _report(result: Any, out: TextIO) -> None:
    data = result.as_dict()
    lat = data["latency_ms"]
    print(f"--- {data['mode']}  {data['provider']}  options {data['options']}", file=out)
    _report_load(data["load"], out)
    print(
        f"first run latency   {data['first_run_ms']:.2f} ms   warm-up tasks {data['warmup_tasks']}",
        file=out,
    )
    print(
        f"throughput          {data['throughput_samples_per_s']:.1f} samples/s "
        f"({data['samples']} samples in {data['measured_seconds']:.2f} s)",
        file=out,
    )
    _report_stability(data, out)
    if lat:
        origin = ", from scheduled arrival" if result.open_loop else ""
        print(
            "latency (ms)        "
            + "  ".join(f"{key} {value:.3f}" for key, value in lat.items())
            + f"   [nearest rank{origin}]",
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
    if data["batch_sizes"]:
        runs = sum(data["batch_sizes"].values())
        spread = "  ".join(f"{size}: {count}" for size, count in data["batch_sizes"].items())
        print(f"batch sizes         {spread}   [tasks per run: runs; {runs} runs]", file=out)
    depth = data["queue_depth"]
    print(
        f"tasks in flight     mean {depth['mean']:.1f}, max {depth['max']} "
        f"(sampled every {depth['period_s'] * 1000:.0f} ms)",
        file=out,
    )


def _report_load(load: Dict[str, Any], out: TextIO) -> None:
    if load["kind"] != "open loop":
        return
    lag = load["submit_lag_ms"]
    print(
        f"load                open loop, {load['arrival']} arrivals at {load['rate_per_s']:g}/s; "
        f"submitted {load['submitted_per_s']:.1f}/s, submit lag p99 {lag['p99']:.2f} ms "
        f"max {lag['max']:.2f} ms",
        file=out,
    )


def _report_stability(data: Dict[str, Any], out: TextIO) -> None:
    stable = data["stability"]
    windows = ", ".join(f"{rate:.0f}" for rate in data["windows_samples_per_s"])
    verdict = "stable" if stable["stable"] else "UNSTABLE"
    spread = f"{stable['spread'] * 100:.1f} %" if stable.get("spread") is not None else "n/a"
    limit = f"{stable['threshold'] * 100:g} %"
    print(
        f"windows             {windows} samples/s; {verdict} (last 3 within {spread}, "
        f"limit {limit})",
        file=out,
    )
    if len(data["trials"]) > 1:
        tries = ", ".join(
            f"{t['throughput_samples_per_s']:.0f}/s "
            f"({'n/a' if t['spread'] is None else format(t['spread'] * 100, '.1f') + ' %'})"
            for t in data["trials"]
        )
        print(f"trials              {tries}; the last is reported", file=out)


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
    args: argparse.Namespace,
    model: str,
    session: Any,
    feed: Dict[str, Any],
    out: TextIO,
    progress: Progress,
) -> Dict[str, Any]:
    from .bench import ezrt_contender, naive_pool, ort_run_async, ort_sync, run_rounds

    provider = session.get_providers()[0]
    workers = session._live_engine().worker_count
    ours = f"ezrt {args.mode} ({workers} workers)"
    contenders = {
        "ort-sync-1t": ort_sync(model, feed, 1, provider),
        "ort-sync-default": ort_sync(model, feed, 0, provider),
        "ort-run_async": ort_run_async(model, feed, 2 * workers, provider),
        f"naive-pool ({workers})": naive_pool(model, feed, workers, provider),
        ours: ezrt_contender(session, feed, args.mode, args.batch, args.depth),
    }
    progress.phase("compare", len(contenders) * (args.rounds + 1), "runs")
    steps = [0]

    def step(message: str) -> None:  # "warming up NAME" or "round i/R: NAME"
        progress.stage("warm-up" if message.startswith("warming") else message.split(":")[0])
        progress.update(steps[0], message.rpartition(": ")[2])
        steps[0] += 1

    try:
        results = run_rounds(
            contenders, rounds=args.rounds, seconds=min(args.duration, 0.5), progress=step
        )
    finally:
        progress.close()
    base = results["ort-sync-1t"].median
    pool = results[f"naive-pool ({workers})"].median
    ezrt = results[ours].median
    width = max(len(name) for name in results)
    print(f"\n--- compare ({args.rounds} interleaved rounds, medians)", file=out)
    print(f"{'contender':<{width}}  {'samples/s':>10}  {'ezrt is x':>9}", file=out)
    for name, m in results.items():
        ratio = ezrt / m.median if m.median else float("nan")
        print(f"{name:<{width}}  {m.median:>10.1f}  {ratio:>9.2f}", file=out)
    print(f"(ezrt vs naive-pool: {ezrt / pool:.2f}; vs ort-sync-1t: {ezrt / base:.2f})", file=out)
    return {name: m.median for name, m in results.items()}


def _configs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    if not args.sweep:
        return [{}]
    name, values = args.sweep
    return [{name: value} for value in values]


def _feed(args: argparse.Namespace, session: Any) -> Dict[str, Any]:
    from .bench import load_inputs, make_feed

    if args.input:
        return load_inputs(args.input, session.get_inputs())
    return make_feed(session.get_inputs(), dict(args.shape or []))


def _measure_config(
    args: argparse.Namespace,
    model: str,
    provider: str,
    override: Dict[str, Any],
    progress: Progress,
    out: TextIO,
) -> Tuple[Any, Dict[str, Any]]:
    """Open a session for one configuration, measure it (and --compare), report it."""
    from .bench import measure
    from .session import InferenceSession

    options = _provider_options(args, override.get("workers"), provider)
    options.update(
        {
            k: override[k]
            for k in ("threads_per_core", "max_queue_size", "max_batch_size")
            if k in override
        }
    )
    batch = override.get("batch", args.batch)
    depth = override.get("depth", args.depth)
    with InferenceSession(model, providers=[provider], provider_options=options) as session:
        feed = _feed(args, session)
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
                rate=override.get("rate", args.rate),
                arrival=args.arrival,
                seed=args.seed,
                max_trials=args.max_trials,
                threshold=args.stability_threshold / 100.0,
                progress=progress.timed,
                phase=progress.phase,
            )
        finally:
            progress.close()
        result.options = {
            **options,
            **({"batch": batch} if args.mode == "batch" else {}),
            **({"depth": depth} if args.mode == "pipeline" else {}),
        }
        _report(result, out)
        entry = result.as_dict()
        if (args.compare or args.model is None) and not args.sweep:
            if provider == RKNN:
                print("(--compare runs ONNX Runtime baselines: not for RKNN models)", file=out)
            else:
                entry["compare_samples_per_s"] = _compare(args, model, session, feed, out, progress)
    return result, entry


def _print_sweep(args: argparse.Namespace, results: List[Any], out: TextIO) -> None:
    name = args.sweep[0]
    print(f"\n--- sweep {name}: throughput against p99", file=out)
    print(f"{name:>16}  {'samples/s':>10}  {'p50 ms':>8}  {'p99 ms':>8}", file=out)
    for override, result in zip(_configs(args), results):
        lat = result.latency_summary()
        print(
            f"{override[name]:>16}  {result.throughput:>10.1f}  "
            f"{lat.get('median', 0):>8.3f}  {lat.get('p99', 0):>8.3f}",
            file=out,
        )


CSV_COLUMNS = (
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
    "provider",
    "rate_per_s",
)


def _write_csv(path: str, results: List[Any]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
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
                    result.provider,
                    result.load.get("rate_per_s", ""),
                ]
            )


def _write_json(path: str, report: Dict[str, Any]) -> None:
    text = json.dumps(report, indent=2)
    if path == "-":
        print(text)
        return
    with open(path, "w") as handle:
        handle.write(text + "\n")


def _check_bench_args(args: argparse.Namespace) -> None:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BackendUnavailableError(
                '--plot needs matplotlib: pip install "ezrt[plot]"'
            ) from None
    rated = args.rate is not None or (args.sweep and args.sweep[0] == "rate")
    if rated and args.mode != "run_async":
        raise InvalidArgumentError(
            f"--rate drives run_async in an open loop; --mode {args.mode} is a closed loop"
        )


def _bench(args: argparse.Namespace) -> int:
    from .bench import SCHEMA_VERSION, demo_model_path, environment

    _check_bench_args(args)
    model = args.model or demo_model_path()
    provider = _choose_provider(args, model)
    out = sys.stderr if args.json == "-" else sys.stdout
    load = f"open loop at {args.rate:g}/s ({args.arrival})" if args.rate else "closed loop"
    print(f"ezrt {__version__} bench: {args.model or 'demo model (embedded CNN)'}", file=out)
    print(
        f"mode {args.mode}, {load}, {provider}; warm-up {args.warmup:g} s; measure "
        f"{args.duration:g} s and at least {args.min_count} tasks, up to {args.max_trials} "
        f"trials until stable; CPUs available {allowed_cpus()}",
        file=out,
    )
    progress = Progress(not args.no_progress)
    results: List[Any] = []
    runs: List[Dict[str, Any]] = []
    for override in _configs(args):
        result, entry = _measure_config(args, model, provider, override, progress, out)
        results.append(result)
        runs.append(entry)
    if args.sweep:
        _print_sweep(args, results, out)
    report = {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "version": __version__,
        "environment": environment(args.command_line),
        "runs": runs,
    }
    if args.json:
        _write_json(args.json, report)
    if args.csv:
        _write_csv(args.csv, results)
    if args.plot:
        _plot(results, args.plot)
        print(f"plot written to {args.plot}", file=out)
    return 0


# ------------------------------------------------------------------------ info


def _describe_model(path: str) -> Dict[str, Any]:
    """What ``ezrt info MODEL`` shows, as data."""
    from .session import InferenceSession, is_rknn_model

    if is_rknn_model(_read_head(path)):
        from .backends.rknn.container import parse_container

        with open(path, "rb") as handle:
            container = parse_container(handle.read(), path)
        return {
            "path": path,
            "format": "rknn",
            "container": dataclasses.asdict(container),
            "describe": container.describe(),
            "runtime": _rknn_runtime_for_info(),
        }
    with InferenceSession(path) as session:
        meta = session.get_modelmeta()
        return {
            "path": path,
            "format": "onnx",
            "providers": session.get_providers(),
            "producer": meta.producer_name,
            "graph": meta.graph_name,
            "inputs": [_arg(a) for a in session.get_inputs()],
            "outputs": [_arg(a) for a in session.get_outputs()],
            "metadata": dict(meta.custom_metadata_map),
        }


def _arg(arg: Any) -> Dict[str, Any]:
    return {"name": arg.name, "type": arg.type, "shape": arg.shape}


def _rknn_runtime_for_info() -> Dict[str, Any]:
    from .backends.rknn import abi

    try:
        runtime = abi.load_runtime()
    except EzrtError:
        return {"found": False, "hint": abi.INSTALL_HINT}
    return {"found": True, "path": runtime.path, "version": runtime.file_version()}


def _print_model(info: Dict[str, Any]) -> None:
    if info["format"] == "rknn":
        print(f"{info['path']}: " + "\n".join(info["describe"]))
        runtime = info["runtime"]
        if runtime["found"]:
            print(f"  runtime: {runtime['path']} (version {runtime['version'] or 'unknown'})")
        else:
            print(f"  runtime: not found ({runtime['hint']})")
        return
    print(f"{info['path']}: ONNX model, providers {info['providers']}")
    print(f"  producer: {info['producer'] or '-'}  graph: {info['graph'] or '-'}")
    for label in ("input", "output"):
        for arg in info[label + "s"]:
            print(f"  {label} {arg['name']}: {arg['type']} {arg['shape']}")
    for key, value in info["metadata"].items():
        print(f"  metadata {key} = {value}")


#: Where each Rockchip runtime may be named: environment variables, then loader names.
RKNN_RUNTIMES = {
    "librknnrt": (("EZRT_RKNN_LIBRARY", "ZTU_RKNPU2_RUNTIME_LIBRARY"), ("rknnrt",)),
    "librknn3_api": (
        ("ZTU_RKNPU3_RUNTIME_LIBRARY",),
        ("rknn3_api", "rknn3_api_rkcp", "rknn3_api_native"),
    ),
}


def find_runtime(name: str) -> Dict[str, Any]:
    """Where the Rockchip runtime ``name`` (librknnrt, librknn3_api) would come from,
    without loading it: the first set environment variable naming an existing file, else
    the loader's search path (``ctypes.util.find_library``), else the usual folders."""
    from .backends.rknn import abi

    variables, libraries = RKNN_RUNTIMES[name]
    env = {var: os.environ[var] for var in variables if os.environ.get(var)}
    for var, value in env.items():
        if os.path.isfile(value):
            return {"found": value, "via": var, "env": env}
    for library in libraries:
        found = ctypes.util.find_library(library)
        if found:
            return {"found": found, "via": "loader search path", "env": env}
    folders = sorted({os.path.dirname(p) for p in abi.USUAL_PATHS})
    for folder in folders:
        path = os.path.join(folder, f"{name}.so")
        if os.path.isfile(path):
            return {"found": path, "via": folder, "env": env}
    return {
        "found": None,
        "via": None,
        "env": env,
        "variables": list(variables),
        "looked_in": [*env.values(), *folders],
    }


def doctor() -> Dict[str, Any]:
    """What ``ezrt info`` without a model reports: versions, providers, runtimes, CPUs."""
    import platform

    import numpy

    from .bench import cpu_model

    report: Dict[str, Any] = {
        "ezrt": {"version": __version__, "path": os.path.dirname(os.path.abspath(__file__))},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "numpy": numpy.__version__,
    }
    try:
        import onnxruntime

        ort_providers = list(onnxruntime.get_available_providers())
        report["onnxruntime"] = {"version": onnxruntime.__version__, "providers": ort_providers}
    except ImportError as error:  # pragma: no cover - a dependency of ezrt
        ort_providers = []
        report["onnxruntime"] = {"version": None, "error": str(error), "providers": []}
    runtimes = {name: find_runtime(name) for name in RKNN_RUNTIMES}
    ours = [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in ort_providers]
    if runtimes["librknnrt"]["found"]:
        ours.append("RKNNExecutionProvider")
    report["ezrt"]["providers"] = ours
    report["rknn_runtimes"] = runtimes
    report["cpu"] = {
        "count": os.cpu_count(),
        "allowed": allowed_cpus(),
        "model": cpu_model(),
    }
    return report


def _print_doctor(report: Dict[str, Any]) -> None:
    ezrt, ort, cpu = report["ezrt"], report["onnxruntime"], report["cpu"]
    print(f"ezrt          {ezrt['version']}  ({ezrt['path']})")
    print(f"  providers   {', '.join(ezrt['providers']) or 'none'}")
    print(f"python        {report['python']['version']}  ({report['python']['executable']})")
    print(f"numpy         {report['numpy']}")
    print(f"onnxruntime   {ort['version'] or 'not importable: ' + ort.get('error', '')}")
    print(f"  providers   {', '.join(ort['providers']) or 'none'}")
    for name, found in report["rknn_runtimes"].items():
        env = ", ".join(f"{k}={v}" for k, v in found["env"].items())
        if found["found"]:
            print(f"{name:<13} found: {found['found']} (via {found['via']})")
        else:
            unset = [var for var in found["variables"] if var not in found["env"]]
            print(
                f"{name:<13} not found (not on the loader path nor in "
                f"{', '.join(found['looked_in'])}"
                + (f"; {', '.join(unset)} unset" if unset else "")
                + ")"
            )
        if env:
            print(f"  set         {env}")
    allowed = cpu["allowed"]
    print(f"CPUs          {cpu['count']} ({len(allowed)} allowed to this process: {allowed})")
    print(f"  model       {cpu['model'] or 'unknown'}")


def _info(args: argparse.Namespace) -> int:
    if args.model is None:
        report = doctor()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_doctor(report)
        return 0
    info = _describe_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_model(info)
    return 0


# ------------------------------------------------------------------------ parser


def _add_bench_parser(commands: Any) -> None:
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
    bench.add_argument(
        "--provider",
        type=_provider_arg,
        metavar="{CPU,CUDA,RKNN}",
        help="CPU, CUDA or RKNN (default: what the model file calls for; CPU for ONNX)",
    )
    _add_measure_arguments(bench.add_argument_group("measurement"))
    _add_session_arguments(bench.add_argument_group("session options"))
    _add_output_arguments(bench.add_argument_group("inputs, comparison and output"))
    bench.set_defaults(func=_bench)


def _add_measure_arguments(group: Any) -> None:
    group.add_argument("--duration", type=float, default=3.0, help="seconds to measure (3)")
    group.add_argument("--min-count", type=int, default=100, help="at least this many tasks (100)")
    group.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    group.add_argument(
        "--rate",
        type=_positive(float),
        help="open loop: submit R requests per second whatever the latency (run_async); "
        "latency counts from each request's scheduled arrival, so queueing shows",
    )
    group.add_argument(
        "--arrival", choices=("poisson", "constant"), default="poisson", help="--rate arrivals"
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals (0)")
    group.add_argument(
        "--max-trials",
        type=_positive(int),
        default=3,
        help="measure again, up to this many times, while the last 3 windows disagree (3)",
    )
    group.add_argument(
        "--stability-threshold",
        type=_positive(float),
        default=10.0,
        help="percent: the last 3 windows' spread that counts as stable (10)",
    )


def _add_session_arguments(group: Any) -> None:
    group.add_argument(
        "--workers", type=int, default=0, help="workers, one per CPU/GPU/NPU core (all CPUs)"
    )
    group.add_argument("--schedule", help='cores, e.g. "0,1,2" (instead of --workers)')
    group.add_argument("--threads-per-core", type=int, default=0)
    group.add_argument("--max-queue-size", type=int, default=3)
    group.add_argument(
        "--max-batch-size",
        type=int,
        default=1,
        help="dynamic batching: queued tasks per run, up to this many (1: off)",
    )
    group.add_argument(
        "--batch-timeout-us",
        type=int,
        default=0,
        help="dynamic batching: how long a worker waits for more tasks (0)",
    )
    group.add_argument("--sequential", dest="sequential", action="store_true", default=None)
    group.add_argument("--no-sequential", dest="sequential", action="store_false")
    group.add_argument("--tp-mode", help="auto, all, 0, 1, 2, 0,1 or 0,1,2 (one worker, split)")
    group.add_argument("--batch", type=int, default=8, help="samples per call in batch mode (8)")
    group.add_argument("--depth", type=int, default=3, help="run_pipeline depth (3)")


def _add_output_arguments(group: Any) -> None:
    group.add_argument(
        "--shape", type=_shape_arg, action="append", help=f"{SHAPE_HELP} for symbolic dims"
    )
    group.add_argument("--input", help=".npy (first input) or .npz (by input name) to feed")
    group.add_argument(
        "--sweep", type=_sweep_arg, help=f"NAME=v1,v2,... with NAME in {', '.join(SWEEPABLE)}"
    )
    group.add_argument(
        "--compare",
        action="store_true",
        help="also run plain ONNX Runtime baselines (ort-sync-1t, ort-sync-default, "
        "ort-run_async, naive-pool; see docs/benchmarks.md) in interleaved rounds",
    )
    group.add_argument("--rounds", type=int, default=5, help="interleaved rounds for --compare (5)")
    group.add_argument("--json", help="write the report as JSON to FILE ('-': stdout)")
    group.add_argument("--csv", help="write one row per configuration to FILE")
    group.add_argument("--plot", help="latency histogram and throughput over time, as PNG")
    group.add_argument(
        "--no-progress", action="store_true", help="no progress display (a bar or log lines)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``ezrt`` argument parser (``bench`` and ``info``)."""
    parser = argparse.ArgumentParser(prog="ezrt", description="ezrt: inference on every core")
    parser.add_argument("--version", action="version", version=f"ezrt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_bench_parser(commands)
    info = commands.add_parser(
        "info",
        help="what a model file contains; with no MODEL, a report on this installation "
        "(versions, providers, Rockchip runtimes, CPUs)",
    )
    info.add_argument("model", nargs="?", help="ONNX or RKNN model")
    info.add_argument("--json", action="store_true", help="print the same as JSON")
    info.set_defaults(func=_info)
    return parser


def _one_line(error: BaseException) -> str:
    """An error as one line: an OSError as "PATH: reason", others as their message."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}"
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ezrt`` command; returns its exit code (2: a usage, file or runtime error)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    args.command_line = ["ezrt", *arguments]
    try:
        return int(args.func(args))
    except (EzrtError, OSError, ValueError) as error:
        print(f"ezrt: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ezrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
