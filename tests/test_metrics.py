"""session.stats() snapshots, the Prometheus exporter, and `ezrt bench` end to end."""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import subprocess
import sys

import numpy as np
import pytest

import ezrt
from ezrt.engine.metrics import BOUNDS, LatencyHistogram

from .conftest import Collector, ones


def test_stats_counts_and_histograms_agree(reshape_model, faults):
    faults.delay = lambda inputs: 0.002
    good = {"x": np.ones((1, 6), np.float32), "shape": np.array([2, 3])}
    bad = {"x": np.ones((1, 6), np.float32), "shape": np.array([5, 5])}
    collector = Collector()
    with ezrt.InferenceSession(reshape_model, provider_options={"threads_per_core": 2}) as session:
        for feed in (good, bad, good, good):
            session.run_async(None, feed, collector)
        collector.wait_for(4)
        session.submit(None, good).result(10)
        stats = session.stats()
    assert (stats.submitted, stats.completed, stats.failed) == (5, 4, 1)
    assert stats.queue_wait.count == 5 and stats.compute.count == 5
    assert stats.delivery.count == 4  # run_async callbacks only
    assert 0.002 <= stats.compute.mean < 1.0
    assert stats.compute.percentile(50) <= stats.compute.percentile(99) < 1.0
    assert sum(stats.worker_busy_seconds.values()) == pytest.approx(stats.compute.total)
    assert set(stats.worker_busy_seconds) == {"ezrt-worker-0-auto", "ezrt-worker-1-auto"}
    assert stats.uptime_seconds > 0 and stats.as_dict()["compute"]["count"] == 5


def test_stats_count_pacing_drops_and_timeouts(add_model, faults):
    faults.delay = lambda inputs: 0.05
    with ezrt.InferenceSession(add_model, provider_options={"enable_pacing": True}) as session:
        session.run(None, [ones(), ones()])
        future = session.submit(None, [ones(), ones()])
        with pytest.raises(ezrt.PacingDropError):
            session.run(None, [ones(), ones()])
        future.result(10)
        stats = session.stats()
    assert stats.dropped == 1 and stats.completed == 2 and stats.compute.count == 2


def test_histogram_percentiles_are_close_estimates():
    counts = [0] * (len(BOUNDS) + 1)
    counts[24] = 100  # all between BOUNDS[23] and BOUNDS[24] (~0.75 ms .. 1 ms)
    histogram = LatencyHistogram(tuple(counts), 0.09)
    assert BOUNDS[23] < histogram.percentile(50) <= BOUNDS[24]
    assert histogram.mean == pytest.approx(0.0009)
    assert LatencyHistogram((0,) * len(counts), 0.0).percentile(99) == 0.0


def test_prometheus_exporter_exposes_conventional_names(add_model):
    from prometheus_client import CollectorRegistry, generate_latest

    from ezrt.metrics import register_session

    registry = CollectorRegistry()
    with ezrt.InferenceSession(add_model) as session:
        register_session(session, registry, session="adder")
        collector = Collector()
        for _ in range(3):
            session.run_async(None, [ones(), ones()], collector)
        collector.wait_for(3)
        session.run(None, [ones(), ones()])
        text = generate_latest(registry).decode()
    assert 'ezrt_tasks_submitted_total{session="adder"} 4.0' in text
    assert 'ezrt_tasks_completed_total{session="adder"} 4.0' in text
    assert 'ezrt_tasks_failed_total{session="adder"} 0.0' in text
    assert 'ezrt_tasks_in_stage{session="adder",stage="queued"} 0.0' in text
    assert 'ezrt_task_compute_seconds_count{session="adder"} 4.0' in text
    assert 'ezrt_task_delivery_seconds_count{session="adder"} 3.0' in text
    # the lone run() ran on the caller's own thread: it never waited in a queue
    assert 'ezrt_task_queue_wait_seconds_bucket{le="+Inf",session="adder"} 3.0' in text
    assert 'ezrt_worker_busy_seconds_total{session="adder",worker="ezrt-worker-0-auto"}' in text


FAMILIES = {
    "ezrt_session_info",
    "ezrt_tasks_submitted",
    "ezrt_tasks_completed",
    "ezrt_tasks_failed",
    "ezrt_tasks_dropped",
    "ezrt_tasks_cancelled",
    "ezrt_tasks_expired",
    "ezrt_submit_timeouts",
    "ezrt_tasks_in_stage",
    "ezrt_task_queue_wait_seconds",
    "ezrt_task_compute_seconds",
    "ezrt_task_delivery_seconds",
    "ezrt_worker_busy_seconds",
}


def scrape(registry):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return text, list(text_string_to_metric_families(text))


def test_prometheus_two_sessions_share_one_family_per_name(add_model, relu_model):
    from prometheus_client import CollectorRegistry

    from ezrt.metrics import BUCKET_BOUNDS, SessionCollector, register_session

    registry = CollectorRegistry()
    with ezrt.InferenceSession(add_model) as adder, ezrt.InferenceSession(relu_model) as relu:
        collector = register_session(adder, registry, session="adder")
        assert register_session(relu, registry, session="relu") is collector
        adder.run(None, [ones(), ones()])
        for _ in range(2):
            relu.run(None, {"x": np.ones((2, 3), np.float32)})
        text, families = scrape(registry)
        # the registry knows the names (describe), so a second collector of them is refused
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(SessionCollector(adder, {"session": "again"}))
    names = [family.name for family in families]
    assert len(names) == len(set(names)) == len(FAMILIES)
    assert set(names) == FAMILIES
    assert text.count("# HELP ezrt_tasks_submitted_total ") == 1
    by_name = {family.name: family for family in families}
    for family in families:
        assert {sample.labels["session"] for sample in family.samples} == {"adder", "relu"}
    submitted = {s.labels["session"]: s.value for s in by_name["ezrt_tasks_submitted"].samples}
    assert submitted == {"adder": 1.0, "relu": 2.0}
    buckets = [
        s
        for s in by_name["ezrt_task_compute_seconds"].samples
        if s.name.endswith("_bucket") and s.labels["session"] == "relu"
    ]
    assert len(buckets) == len(BUCKET_BOUNDS) + 1 == 18 and buckets[-1].labels["le"] == "+Inf"
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].value == 2.0
    (info,) = [s for s in by_name["ezrt_session_info"].samples if s.labels["session"] == "adder"]
    assert info.value == 1.0
    assert info.labels == {
        "session": "adder",
        "version": ezrt.__version__,
        "backend": "onnxruntime",
        "provider": "CPUExecutionProvider",
    }


def test_prometheus_registration_rules_and_unregistering(add_model, relu_model):
    from prometheus_client import CollectorRegistry

    from ezrt.metrics import SessionCollector, register_session, unregister_session

    registry = CollectorRegistry()
    with ezrt.InferenceSession(add_model) as adder, ezrt.InferenceSession(relu_model) as relu:
        collector = SessionCollector(adder, {"session": "a"})
        with pytest.raises(ezrt.InvalidArgumentError, match="already collected with labels"):
            collector.add(relu, session="a")
        with pytest.raises(ezrt.InvalidArgumentError, match="same label names"):
            collector.add(relu, model="relu")
        with pytest.raises(ezrt.InvalidArgumentError, match="set by the exporter itself"):
            collector.add(relu, stage="x")
        with pytest.raises(ezrt.InvalidArgumentError, match="not a Prometheus label name"):
            collector.add(relu, **{"bad-name": "x"})
        with pytest.raises(ezrt.InvalidArgumentError, match="already collected"):
            collector.add(adder, session="b")
        register_session(adder, registry, session="adder")
        register_session(relu, registry, session="relu")
        assert unregister_session(adder, registry)
        assert not unregister_session(adder, registry)
        _, families = scrape(registry)
        assert {s.labels["session"] for f in families for s in f.samples} == {"relu"}
        assert unregister_session(relu, registry)
        assert scrape(registry)[1] == []  # the collector left with its last session
        register_session(adder, registry, session="adder")  # and a new one can come
        assert len(scrape(registry)[1]) == len(FAMILIES)
        unregister_session(adder, registry)


def test_prometheus_forgets_a_garbage_collected_session(add_model):
    import gc

    from prometheus_client import CollectorRegistry

    from ezrt.metrics import register_session

    registry = CollectorRegistry()
    session = ezrt.InferenceSession(add_model)
    collector = register_session(session, registry, session="gone")
    session.close()
    del session
    gc.collect()
    assert len(collector) == 0
    assert all(not family.samples for family in scrape(registry)[1])


def test_exported_buckets_add_up_the_fine_histogram_exactly():
    from ezrt.engine.metrics import Histogram
    from ezrt.metrics import BUCKET_BOUNDS, export_buckets

    durations = [2e-6, 4e-6, 9e-4, 1.1e-3, 0.004, 0.004, 0.25, 3.0, 150.0]
    histogram = Histogram()
    for seconds in durations:
        histogram.add(seconds)
    buckets = export_buckets(histogram.snapshot())
    assert len(buckets) == len(BUCKET_BOUNDS) + 1
    for (le, cumulative), bound in zip(buckets, BUCKET_BOUNDS):
        assert cumulative == sum(1 for d in durations if d <= bound), le
        assert float(le) == pytest.approx(bound, rel=2e-3)  # three significant digits
    assert buckets[-1] == ("+Inf", len(durations))
    assert BUCKET_BOUNDS[0] == pytest.approx(1e-6) and BUCKET_BOUNDS[-1] == pytest.approx(100.0)


# ---------------------------------------------------------------- bench: stability, open loop


def test_window_stability_verdicts():
    from ezrt.bench import window_stability

    assert window_stability([50, 100, 100, 104, 96])["stable"]  # only the last 3 count
    verdict = window_stability([100, 100, 80])
    assert not verdict["stable"] and verdict["spread"] == pytest.approx(20 / (280 / 3))
    assert window_stability([100, 100, 80], threshold=0.25)["stable"]
    assert window_stability([100, 100])["reason"] == "fewer than 3 windows"
    assert window_stability([0, 0, 0])["spread"] is None


def test_trial_decision_retries_until_stable_or_out_of_trials():
    from ezrt.bench import trial_decision

    steady, shaky = [100.0, 101.0, 99.0], [100.0, 60.0, 140.0]
    assert trial_decision([], 3) == "retry"
    assert trial_decision([steady], 3) == "stable"
    assert trial_decision([shaky], 3) == "retry"
    assert trial_decision([shaky, shaky], 3) == "retry"
    assert trial_decision([shaky, shaky, shaky], 3) == "unstable"
    assert trial_decision([shaky, shaky, steady], 3) == "stable"  # the last trial decides
    assert trial_decision([steady, shaky], 2) == "unstable"
    assert trial_decision([shaky], 1) == "unstable"
    assert trial_decision([shaky], 3, threshold=1.0) == "stable"
    with pytest.raises(ValueError, match="max_trials must be at least 1"):
        trial_decision([steady], 0)


def test_measure_runs_trials_until_the_decision_says_stop(add_model):
    from ezrt.bench import make_feed, measure

    quick = {"duration": 0.1, "warmup": 0.02, "min_count": 10}
    with ezrt.InferenceSession(add_model, provider_options={"schedule": [0]}) as session:
        feed = make_feed(session.get_inputs())
        never = measure(session, feed, max_trials=3, threshold=1e-12, **quick)
        always = measure(session, feed, max_trials=3, threshold=10.0, **quick)
    assert len(never.trials) == 3 and not never.stability()["stable"]
    assert never.trials[-1]["windows_samples_per_s"] == never.window_rates
    assert len(always.trials) == 1 and always.stability() == {
        **always.stability(),
        "stable": True,
        "trials": 1,
        "threshold": 10.0,
    }


def test_arrival_times():
    from ezrt.bench import arrival_times

    constant = list(itertools.islice(arrival_times(200.0, "constant", start=10.0), 5))
    assert constant == pytest.approx([10.0, 10.005, 10.01, 10.015, 10.02])
    poisson = list(itertools.islice(arrival_times(200.0, "poisson", seed=7), 4000))
    gaps = np.diff([0.0, *poisson])
    assert (gaps > 0).all() and np.mean(gaps) == pytest.approx(1 / 200, rel=0.06)
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.1)  # exponential: sd = mean
    again = list(itertools.islice(arrival_times(200.0, "poisson", seed=7), 4000))
    assert again == poisson
    with pytest.raises(ValueError, match="positive number of requests per second"):
        next(arrival_times(0.0))
    with pytest.raises(ValueError, match="poisson, constant"):
        next(arrival_times(5.0, "bursty"))


def test_open_loop_latency_counts_queueing_from_the_scheduled_arrival(add_model, faults):
    """At twice the capacity, an open loop's latency grows with the backlog; a closed loop
    (and an open loop well below capacity) sees only the compute and a short queue."""
    from ezrt.bench import make_feed, measure

    faults.delay = lambda inputs: 0.004  # one worker: at most ~250 tasks/s
    quick = {"duration": 0.3, "warmup": 0.0, "min_count": 10, "max_trials": 1}
    options = {"schedule": [0], "max_queue_size": 3}
    with ezrt.InferenceSession(add_model, provider_options=options) as session:
        feed = make_feed(session.get_inputs())
        light = measure(session, feed, rate=40.0, arrival="constant", **quick)
        heavy = measure(session, feed, rate=500.0, arrival="constant", **quick)
        closed = measure(session, feed, **quick)
    light_p50 = light.latency_summary()["median"]
    heavy_p90 = heavy.latency_summary()["p90"]
    assert light_p50 >= 4.0 and heavy.tasks == 150 and heavy.samples == 150
    assert heavy_p90 > 5 * light_p50
    assert heavy_p90 > 3 * closed.latency_summary()["p90"]
    assert heavy.load["submit_lag_ms"]["max"] > 50  # back-pressure held the submitter up
    assert heavy.as_dict()["latency_method"].endswith("scheduled arrival to result")


def test_cpu_model_reads_x86_and_arm_cpuinfo(tmp_path):
    from ezrt.bench import cpu_model

    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\n"
        "model name\t: Intel(R) Xeon(R) Gold 6230\n"
    )
    arm = tmp_path / "arm"
    arm.write_text(
        "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd05\n\n"
        "Hardware\t: Rockchip RK3588\nModel\t: Radxa ROCK 5B\n"
    )
    assert cpu_model(str(x86)) == "Intel(R) Xeon(R) Gold 6230"
    assert cpu_model(str(arm)) == "Radxa ROCK 5B"
    assert cpu_model(str(tmp_path / "absent")) == (platform.processor() or None)


#: A short run: enough tasks to compute every figure, quick enough for CI.
QUICK = ("--duration", "0.2", "--warmup", "0.05", "--min-count", "20", "--workers", "1")


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ezrt", "bench", *args], capture_output=True, text=True, timeout=180
    )


@pytest.fixture
def add_path(add_model, tmp_path):
    path = tmp_path / "add.onnx"
    path.write_bytes(add_model)
    return str(path)


@pytest.mark.parametrize("mode", ["run", "run_async", "pipeline", "batch"])
def test_bench_json_is_consistent(add_path, tmp_path, mode):
    out = tmp_path / "report.json"
    result = bench(
        add_path,
        "--mode",
        mode,
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--min-count",
        "50",
        "--workers",
        "1",
        "--batch",
        "4",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    (run,) = json.loads(out.read_text())["runs"]
    per_task = 4 if mode == "batch" else 1
    assert run["mode"] == mode and run["tasks"] >= 50
    assert run["samples"] == run["tasks"] * per_task  # every task completed
    assert run["throughput_samples_per_s"] == pytest.approx(
        run["samples"] / run["measured_seconds"]
    )
    windows = run["windows_samples_per_s"]
    width = run["measured_seconds"] / len(windows)
    assert sum(rate * width for rate in windows) == pytest.approx(run["samples"])
    lat = run["latency_ms"]
    assert (
        lat["min"]
        <= lat["median"]
        <= lat["p90"]
        <= lat["p95"]
        <= lat["p99"]
        <= lat["p99.9"]
        <= lat["max"]
    )
    assert run["first_run_ms"] > 0 and run["warmup_tasks"] > 0
    assert run["breakdown"]["compute"]["count"] >= run["tasks"]
    assert all(0 <= u <= 1.2 for u in run["worker_utilisation"].values())
    depth = run["queue_depth"]
    assert depth["series"] and depth["max"] == max(depth["series"]) and depth["period_s"] > 0
    assert "stable" in run["stability"]
    assert 1 <= len(run["trials"]) == run["stability"]["trials"] <= 3  # --max-trials 3
    assert run["trials"][-1]["windows_samples_per_s"] == windows
    assert "throughput" in result.stdout and "[nearest rank]" in result.stdout


def test_bench_sweep_csv_and_compare(add_path, tmp_path):
    table = tmp_path / "sweep.csv"
    result = bench(
        add_path,
        "--sweep",
        "max_queue_size=1,4",
        *QUICK,
        "--csv",
        str(table),
    )
    assert result.returncode == 0, result.stderr
    assert "--- sweep max_queue_size: throughput against p99" in result.stdout
    rows = table.read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("mode,options,samples")
    result = bench(
        add_path,
        "--compare",
        "--rounds",
        "1",
        *QUICK,
        "--json",
        "-",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # with --json -, the report goes to stderr
    ratios = report["runs"][0]["compare_samples_per_s"]
    assert set(ratios) >= {"ort-sync-1t", "ort-sync-default", "ort-run_async", "naive-pool (1)"}
    assert "--- compare" in result.stderr


def test_bench_inputs_from_npz_and_shapes(relu_model, tmp_path):
    path = tmp_path / "relu.onnx"
    path.write_bytes(relu_model)
    np.savez(tmp_path / "feed.npz", x=np.ones((5, 3), np.float32))
    for extra in (
        ["--input", str(tmp_path / "feed.npz")],
        ["--shape", "x=7x3"],
        ["--shape", "x:7x3"],
    ):
        result = bench(
            str(path),
            "--mode",
            "run",
            "--duration",
            "0.1",
            "--warmup",
            "0.02",
            "--min-count",
            "5",
            "--workers",
            "1",
            *extra,
        )
        assert result.returncode == 0, result.stderr
    bad = bench(str(path), "--shape", "x=7by3")
    assert bad.returncode == 2 and "--shape wants NAME:1x3x224x224 or NAME=" in bad.stderr


def test_bench_plot(add_path, tmp_path):
    png = tmp_path / "bench.png"
    result = bench(
        add_path,
        *QUICK,
        "--plot",
        str(png),
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.returncode == 2 and 'pip install "ezrt[plot]"' in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_open_loop_json_has_the_environment_and_schema_version(add_path, tmp_path):
    import onnxruntime

    from ezrt.bench import SCHEMA_VERSION

    out = tmp_path / "rate.json"
    result = bench(
        add_path,
        "--rate",
        "400",
        "--arrival",
        "constant",
        *QUICK,
        "--max-trials",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["schema_version"] == SCHEMA_VERSION == 1
    env = report["environment"]
    assert env["ezrt"] == ezrt.__version__ and env["onnxruntime"] == onnxruntime.__version__
    assert env["numpy"] == np.__version__ and env["python"].endswith(platform.python_version())
    assert env["onnxruntime_providers"] == onnxruntime.get_available_providers()
    assert env["cpu_count"] == os.cpu_count() and env["cpus_allowed"] >= 1
    assert "cpu_model" in env and env["platform"]
    assert env["command"].startswith("ezrt bench ") and "--rate 400" in env["command"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", env["utc_time"])
    (run,) = report["runs"]
    assert run["load"]["kind"] == "open loop" and run["load"]["arrival"] == "constant"
    assert run["load"]["rate_per_s"] == 400.0 and run["provider"] == "CPUExecutionProvider"
    assert run["tasks"] == 80 == run["samples"]  # 0.2 s at 400/s, whatever the capacity
    assert run["latency_method"].endswith("scheduled arrival to result")
    assert "open loop, constant arrivals at 400/s" in result.stdout
    assert "ezrt bench: measure (0.2 s)" in result.stderr  # a log line per phase, not a tty
