"""benchmarks/_common.py: each JSON line says how fast the machine was when it was printed."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
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


def test_rss_peak_sees_memory_held_inside_the_block_only(common):
    with common.rss_peak(every_s=0.005) as mem:
        block = bytearray(200 * 1024 * 1024)  # touched: resident
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.05)
        del block
    assert mem["peak_rss_growth_mb"] >= 150 and mem["peak_rss_mb"] >= mem["rss_before_mb"] + 150
    with common.rss_peak(every_s=0.005) as quiet:
        time.sleep(0.03)
    assert quiet["peak_rss_growth_mb"] < 50


def test_json_lines_only_leaves_stdout_to_the_json_lines(tmp_path):
    """Whatever else a benchmark's process writes to stdout (print, file descriptor 1 directly,
    a subprocess) goes to stderr once json_lines_only() ran; emit's lines stay on stdout."""
    script = tmp_path / "bench.py"
    script.write_text(
        "import os, subprocess, sys\n"
        f"sys.path.insert(0, {str(COMMON.parent)!r})\n"
        "from _common import emit, json_lines_only\n"
        "print('before: stays on stdout', flush=True)\n"
        "json_lines_only()\n"
        "print('progress line')\n"
        "os.write(1, b'raw fd 1\\n')\n"
        "subprocess.run([sys.executable, '-c', 'print(\"child\")'], check=True)\n"
        "emit('demo_bench', case='c', p50_ms=1.0)\n"
        "print('after')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=60)
    out = done.stdout.splitlines()
    assert out[0] == "before: stays on stdout" and len(out) == 2
    assert json.loads(out[1])["bench"] == "demo_bench"
    for noise in ("progress line", "raw fd 1", "child", "after"):
        assert noise in done.stderr.splitlines()
