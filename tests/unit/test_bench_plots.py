"""benchmarks/_plots.py: where the latency plots go, and that they are drawn from the data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_go_where_asked_then_the_environment_then_the_workdir(monkeypatch):
    monkeypatch.delenv(_plots.PLOTS_ENV, raising=False)
    assert _plots.plots_dir(None) is None  # a temp run: nowhere
    assert _plots.plots_dir(None, "runs/a") == Path("runs/a/reports")
    monkeypatch.setenv(_plots.PLOTS_ENV, "bench/plots")
    assert _plots.plots_dir(None, "runs/a") == Path("bench/plots")
    assert _plots.plots_dir("mine", "runs/a") == Path("mine")


def test_histograms_and_rate_plot_are_written_as_png(tmp_path):
    rng = np.random.default_rng(0)
    panels = {"250 keys, 1 client": {"batched": rng.lognormal(0.5, 0.3, 500), "statement": rng.lognormal(0, 0.3, 500)},
              "100 keys, 4 clients": {"batched": rng.lognormal(1, 0.3, 500), "empty": np.array([])}}
    hist = _plots.latency_histograms(tmp_path / "a" / "h.png", "reads", panels, {"250 keys, 1 client": 2.0})
    rate = _plots.latency_vs_rate(tmp_path / "r.png", "load", {"fused": [(150, 9.0, 30.0), (50, 8.0, 20.0)],
                                                                 "split": [(25, 30.0, None)]}, 50.0)
    for path in (hist, rate):
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5_000  # a drawn figure, not an empty canvas


def test_bins_cover_every_series_in_log_steps():
    bins = _plots._bins([np.array([1.0, 10.0]), np.array([100.0])])
    assert bins[0] < 1.0 and bins[-1] > 100.0
    ratios = bins[1:] / bins[:-1]
    assert np.allclose(ratios, ratios[0])
    empty = _plots._bins([np.array([])])  # a case with no answered request still gets an axis
    assert len(empty) >= 2 and empty[0] > 0


def test_log_ticks_read_as_plain_milliseconds():
    labels = [_plots._tick(v) for v in (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 50.0, 100.0, 0.0)]
    assert labels == ["0.5", "1", "2", "", "5", "10", "20", "", "50", "100", ""]
