"""The ezrt command, run as a subprocess as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import ezrt
from ezrt.bench import demo_model_path


def ezrt_cmd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ezrt", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_model_ships_with_the_package():
    path = demo_model_path()
    assert os.path.isfile(path) and os.path.getsize(path) < 1_000_000
    with ezrt.InferenceSession(path) as session:
        assert session.get_inputs()[0].shape == [1, 3, 128, 128]
        import numpy as np

        probs = session.run(None, np.zeros((1, 3, 128, 128), np.float32))[0]
        assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1.0) < 1e-5


def test_info_prints_inputs_outputs_and_metadata(add_model, tmp_path):
    path = tmp_path / "add.onnx"
    path.write_bytes(add_model)
    result = ezrt_cmd("info", str(path))
    assert result.returncode == 0, result.stderr
    assert "input a: tensor(float) [1, 4]" in result.stdout
    assert "output prod: tensor(float) [1, 4]" in result.stdout
    assert "metadata author = tests" in result.stdout


def test_bench_without_a_model_compares_the_demo_with_plain_onnxruntime():
    result = ezrt_cmd(
        "bench",
        "--duration",
        "0.2",
        "--warmup",
        "0.05",
        "--min-count",
        "10",
        "--rounds",
        "1",
        "--workers",
        "1",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "demo model (embedded CNN)" in result.stdout
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("contender"))
    rows = {}
    for line in lines[header + 1 :]:
        if not line.strip() or line.startswith("("):
            break
        name, value, ratio = line.rsplit(None, 2)
        rows[name.strip()] = (float(value), float(ratio))
    assert set(rows) == {
        "ort-sync-1t",
        "ort-sync-default",
        "ort-run_async",
        "naive-pool (1)",
        "ezrt run_async (1 workers)",
    }
    assert rows["ezrt run_async (1 workers)"][1] == 1.0  # ezrt's ratio to itself
    assert all(value > 0 for value, _ in rows.values())


def test_version_and_usage_errors():
    assert ezrt_cmd("--version").stdout.strip() == f"ezrt {ezrt.__version__}"
    assert ezrt_cmd().returncode == 2
