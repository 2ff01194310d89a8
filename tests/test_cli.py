"""The ezrt command: in-process through cli.main, and as a subprocess as a user runs it."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest

import ezrt
from ezrt.bench import demo_model_path
from ezrt.cli import Progress, _provider_arg, _shape_arg, main

from .test_rknn import IMAGE


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


# ---------------------------------------------------------------- one-line errors, info


def bad_files(tmp_path):
    """Files a user may pass by mistake, each with a part of the expected message."""
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\n" * 8)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    files = {
        "missing": (str(tmp_path / "missing.onnx"), "No such file or directory"),
        "folder": (str(folder), "Is a directory"),
        "invalid": (str(garbage), "INVALID_PROTOBUF"),  # onnxruntime's own words
        "empty": (str(empty), "No graph was found in the protobuf"),
    }
    if os.geteuid() != 0:  # root reads a file whatever its mode
        locked = tmp_path / "locked.onnx"
        locked.write_bytes(b"x")
        locked.chmod(0)
        files["unreadable"] = (str(locked), "Permission denied")
    return files


@pytest.mark.parametrize("command", ["info", "bench"])
def test_bad_model_files_are_one_line_errors_with_exit_code_2(tmp_path, capsys, command):
    for kind, (path, expected) in bad_files(tmp_path).items():
        assert (
            main([command, path, "--no-progress"] if command == "bench" else [command, path]) == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ezrt: "), (kind, err)
        assert expected in err[0], (kind, err)


def test_info_on_a_missing_file_as_a_user_runs_it(tmp_path):
    result = ezrt_cmd("info", str(tmp_path / "missing.onnx"))
    assert result.returncode == 2
    assert result.stderr == f"ezrt: {tmp_path / 'missing.onnx'}: No such file or directory\n"
    assert result.stdout == ""


def test_info_json_describes_an_onnx_model(add_model, tmp_path, capsys):
    path = tmp_path / "add.onnx"
    path.write_bytes(add_model)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "onnx" and info["providers"] == ["CPUExecutionProvider"]
    assert [i["name"] for i in info["inputs"]] == ["a", "b"]
    assert {"name": "prod", "type": "tensor(float)", "shape": [1, 4]} in info["outputs"]
    assert info["metadata"] == {"author": "tests"}


def test_info_without_a_model_is_a_doctor_report(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    labels = [line.split()[0] for line in text.splitlines() if not line.startswith(" ")]
    assert labels == ["ezrt", "python", "numpy", "onnxruntime", "librknnrt", "librknn3_api", "CPUs"]
    assert f"ezrt          {ezrt.__version__}" in text
    assert "CPUExecutionProvider" in text
    assert f"CPUs          {os.cpu_count()} " in text


def test_doctor_finds_runtimes_through_their_variables_without_loading_them(
    tmp_path, monkeypatch, capsys
):
    fake = tmp_path / "librknn3_api.so"
    fake.write_bytes(b"not a library: loading it would fail")
    monkeypatch.setenv("ZTU_RKNPU3_RUNTIME_LIBRARY", str(fake))
    monkeypatch.setenv("ZTU_RKNPU2_RUNTIME_LIBRARY", str(tmp_path / "absent.so"))
    monkeypatch.delenv("EZRT_RKNN_LIBRARY", raising=False)
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"ezrt", "python", "numpy", "onnxruntime", "rknn_runtimes", "cpu"}
    rknn3 = report["rknn_runtimes"]["librknn3_api"]
    assert rknn3["found"] == str(fake) and rknn3["via"] == "ZTU_RKNPU3_RUNTIME_LIBRARY"
    rknn2 = report["rknn_runtimes"]["librknnrt"]
    assert rknn2["env"] == {"ZTU_RKNPU2_RUNTIME_LIBRARY": str(tmp_path / "absent.so")}
    if rknn2["found"] is None:  # on a board with librknnrt installed it is found elsewhere
        assert "RKNNExecutionProvider" not in report["ezrt"]["providers"]
    assert report["onnxruntime"]["version"] and report["cpu"]["count"] == os.cpu_count()
    assert main(["info"]) == 0
    assert (
        f"librknn3_api  found: {fake} (via ZTU_RKNPU3_RUNTIME_LIBRARY)" in capsys.readouterr().out
    )


# ---------------------------------------------------------------- bench arguments


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x:7x3", ("x", [7, 3])),
        ("x=7x3", ("x", [7, 3])),
        ("images:1x3x224x224", ("images", [1, 3, 224, 224])),
        ("input:0:1X3", ("input:0", [1, 3])),  # TensorFlow-style names keep their colon
        ("input:0=2x3", ("input:0", [2, 3])),
        ("scalar:5", ("scalar", [5])),
    ],
)
def test_shape_syntax(text, expected):
    assert _shape_arg(text) == expected


@pytest.mark.parametrize("text", ["x", "x:", ":1x3", "x:1by3", "x=-1x3", "x:1x"])
def test_bad_shapes_say_what_is_expected(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"NAME:1x3x224x224 or NAME=1x3x224x224"):
        _shape_arg(text)


def test_provider_names():
    assert _provider_arg("cpu") == "CPUExecutionProvider"
    assert _provider_arg("CUDA") == "CUDAExecutionProvider"
    assert _provider_arg("RKNNExecutionProvider") == "RKNNExecutionProvider"
    with pytest.raises(argparse.ArgumentTypeError, match="CPU, CUDA, RKNN"):
        _provider_arg("tpu")


def test_unusable_providers_are_clear_errors(add_model, tmp_path, capsys):
    import onnxruntime

    path = tmp_path / "add.onnx"
    path.write_bytes(add_model)
    assert main(["bench", str(path), "--provider", "RKNN"]) == 2
    assert "--provider RKNN runs .rknn models" in capsys.readouterr().err
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert main(["bench", str(path), "--provider", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "--provider CUDA: this onnxruntime has no CUDAExecutionProvider" in err
    assert main(["bench", str(path), "--mode", "run", "--rate", "10"]) == 2
    assert "--rate drives run_async" in capsys.readouterr().err


def test_provider_cpu_measures_on_cpu(add_model, tmp_path, capsys):
    path = tmp_path / "add.onnx"
    path.write_bytes(add_model)
    args = ["--duration", "0.1", "--warmup", "0.02", "--min-count", "10", "--workers", "1"]
    assert main(["bench", str(path), "--provider", "cpu", *args, "--json", "-"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["provider"] == "CPUExecutionProvider" and run["options"]["schedule"] == [0]


# ---------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_logs_one_line_per_phase_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(True, stream)
    progress.phase("warm-up", 1.0)
    progress.timed(0.5, 100)  # live updates are for terminals only
    progress.phase("compare", 10, "runs")
    for stage in ("warm-up", "warm-up", "round 1/2", "round 1/2", "round 2/2"):
        progress.stage(stage)
    progress.close()
    assert stream.getvalue().splitlines() == [
        "ezrt bench: warm-up (1 s)",
        "ezrt bench: compare (10 runs)",
        "ezrt bench: compare: warm-up",
        "ezrt bench: compare: round 1/2",
        "ezrt bench: compare: round 2/2",
    ]


def test_progress_is_live_on_a_terminal_and_silent_when_disabled(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the fallback status line, tqdm or not
    stream = Terminal()
    progress = Progress(True, stream)
    progress.phase("measure", 3.0)
    progress.timed(1.5, 300)
    progress.stage("round 1/5")
    progress.close()
    shown = stream.getvalue()
    assert "measure 1.5/3 s 300 done, 200/s" in shown and "measure: round 1/5" in shown
    assert shown.endswith("\r") and "\n" not in shown  # the status line is wiped at the end
    quiet = Terminal()
    off = Progress(False, quiet)
    off.phase("measure", 3.0)
    off.timed(1.0, 10)
    off.close()
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------- RKNN through the C double


def test_bench_on_the_npu_double(npu, tmp_path, capsys):
    model = tmp_path / "model.rknn"
    model.write_bytes(IMAGE)
    quick = ["--duration", "0.1", "--warmup", "0.02", "--min-count", "10", "--max-trials", "1"]
    assert main(["bench", str(model), "--workers", "3", "--compare", *quick, "--json", "-"]) == 0
    captured = capsys.readouterr()
    (run,) = json.loads(captured.out)["runs"]
    assert run["provider"] == "RKNPU2ExecutionProvider"  # upstream 0.11's canonical name
    assert run["options"]["schedule"] == [0, 1, 2]  # NPU cores, not CPU ids
    assert len(run["worker_utilisation"]) == 3 and run["tasks"] >= 10
    assert "not for RKNN models" in captured.err and "compare_samples_per_s" not in run
    assert main(["bench", str(model), *quick, "--json", "-"]) == 0  # no --workers: no schedule
    assert "schedule" not in json.loads(capsys.readouterr().out)["runs"][0]["options"]
    assert main(["bench", str(model), "--provider", "CPU"]) == 2
    assert "is an RKNN model: it runs only with --provider RKNN" in capsys.readouterr().err
