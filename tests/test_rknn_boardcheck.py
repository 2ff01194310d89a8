"""The board check (README "Checking a board") passes on the doubles and reports failures."""

from __future__ import annotations

import pathlib

import pytest

from ezrt import boardcheck

from .rknn_double.harness import WEIGHTS, doubles, fake_model, fake_rknx, needs_cc, npu, npu3

__all__ = ["doubles", "npu", "npu3"]  # fixtures used here

pytestmark = needs_cc

ADD = (
    "input a 1 1 4 1 6 6 20",
    "input b 1 1 4 1 6 6 20",
    "output y 1 0 0 1.0 1.0 0.0 4 1 6 6 20",
    "mix 0 1 1.0",
    "w_align 16",
)


def test_board_check_passes_on_rknpu2(npu, tmp_path: pathlib.Path, capsys):
    model = tmp_path / "add.rknn"
    model.write_bytes(fake_model(*ADD))
    assert boardcheck.main([str(model), "--runs", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "RESULT: PASS"
    assert "zero copy (rknpu2): max |copy - zero copy| = 0" in lines
    assert "native input: a tensor(float16) [1, 6, 6, 20] NHWC [1920, 320, 20, 1]" in lines


def test_board_check_passes_on_rknpu3(npu3, tmp_path: pathlib.Path, capsys):
    model = tmp_path / "net.rknn"
    model.write_bytes(
        fake_rknx("input x 1 nc1hwc2 4 1 3 4 5", "output y 1 nc1hwc2 2.0 1.0 4 1 3 4 5")
    )
    (tmp_path / "net.weight").write_bytes(WEIGHTS)
    assert boardcheck.main([str(model), "--runs", "6"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "RESULT: PASS"


@pytest.mark.parametrize("schedule, step", [("0,1,2", "every worker"), ("0,1,7", "every worker")])
def test_board_check_reports_a_failing_step(npu, tmp_path: pathlib.Path, capsys, schedule, step):
    model = tmp_path / "add.rknn"
    model.write_bytes(fake_model(*ADD, "chip rk3576" if schedule == "0,1,2" else ""))
    assert boardcheck.main([str(model), "--runs", "4", "--schedule", schedule]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"RESULT: FAIL ({step})"
    assert "Traceback" not in "\n".join(out)
