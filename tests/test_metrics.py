"""session.stats() snapshots, the Prometheus exporter, and `ezrt bench` end to end."""

from __future__ import annotations

import json
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
    assert 'ezrt_task_queue_wait_seconds_bucket{le="+Inf",session="adder"} 4.0' in text
    assert 'ezrt_worker_busy_seconds_total{session="adder",worker="ezrt-worker-0-auto"}' in text


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
    for extra in (["--input", str(tmp_path / "feed.npz")], ["--shape", "x=7x3"]):
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
    assert bad.returncode == 2 and "--shape wants NAME=1x3x224x224" in bad.stderr


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
