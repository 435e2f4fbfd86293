"""benchmarks/_common.py: each JSON line says how fast the machine was when it was printed."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "benchmarks" / "_common.py"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", COMMON)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_line_has_the_calibration_loop_time(common, capsys, monkeypatch):
    monkeypatch.setattr(common, "CALIBRATION_LOOP", 1000)
    common.emit("demo_bench", case="c", p50_ms=1.234567)
    row = json.loads(capsys.readouterr().out)
    assert row["bench"] == "demo_bench" and row["case"] == "c" and row["p50_ms"] == 1.2346
    assert 0 < row["calibration_loop_ms"] < 1000 and row["cores"] >= 1


def test_the_loop_time_grows_with_the_loop(common, monkeypatch):
    monkeypatch.setattr(common, "CALIBRATION_LOOP", 2_000)
    short = common.calibration_loop_ms()
    monkeypatch.setattr(common, "CALIBRATION_LOOP", 200_000)
    assert common.calibration_loop_ms() > short > 0
