"""PNG plots of the benchmarks' latencies, for people rather than scripts: a histogram per case
(where the tail is, against the target) and p50/p99 against the offered rate (where the knee is)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import FuncFormatter

from training.plots import plt, save_figure

PLOTS_ENV = "RAYREC_BENCH_PLOTS"


def plots_dir(arg: str | None, workdir: str | None = None) -> Path | None:
    """Where a benchmark writes its plots: --plots DIR, else $RAYREC_BENCH_PLOTS (`make bench`
    sets it), else the reports/ folder of --workdir (a run's plots live in its workdir), else
    nowhere (a temp run's folder is gone when the benchmark ends)."""
    chosen = arg or os.environ.get(PLOTS_ENV) or (str(Path(workdir) / "reports") if workdir else None)
    return Path(chosen) if chosen else None


def _tick(v: float, _pos: object = None) -> str:
    """1, 2, 5, 10, 20, 50 ... on a log axis (not 2x10^0), the other minor ticks unlabelled."""
    if v <= 0:
        return ""
    lead = v / 10 ** np.floor(np.log10(v) + 1e-9)
    return f"{v:g}" if any(abs(lead - d) < 1e-6 for d in (1, 2, 5)) else ""


_PLAIN = FuncFormatter(_tick)


def _decorate(ax, log_axis: str, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, title, grid and legend; `log_axis` ("x" or "y") on a log scale read in plain ms."""
    axis = ax.xaxis if log_axis == "x" else ax.yaxis
    (ax.set_xscale if log_axis == "x" else ax.set_yscale)("log")
    axis.set_major_formatter(_PLAIN)
    axis.set_minor_formatter(_PLAIN)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _bins(series: Sequence[np.ndarray]) -> np.ndarray:
    """Log-spaced bins over every series' range: latencies span decades, and the tail matters."""
    parts = [s[s > 0] for s in series if len(s)]
    values = np.concatenate(parts) if parts else np.array([])
    if not len(values):
        return np.array([0.1, 1.0])
    low, high = float(values.min()), float(values.max())
    return np.geomspace(low * 0.9, max(high * 1.1, low * 1.2), 60)


def latency_histograms(path: Path, title: str, panels: Mapping[str, Mapping[str, np.ndarray]],
                       target_ms: Mapping[str, float] | None = None) -> Path:
    """One panel per key of `panels`, one step histogram per series (latencies in ms), each
    labelled with its count, p50 and p99; a panel's target (when given) as a dashed red line."""
    n = max(len(panels), 1)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        bins = _bins(list(series.values()))
        for label, lat in series.items():
            if not len(lat):
                continue
            p50, p99 = np.percentile(lat, [50, 99])
            ax.hist(lat, bins=bins, histtype="step", linewidth=1.4,
                    label=f"{label}: n={len(lat)}, p50 {p50:.2f}, p99 {p99:.2f} ms")
        target = (target_ms or {}).get(name)
        if target is not None:
            ax.axvline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target p99 {target:g} ms")
        _decorate(ax, "x", "latency (ms, log scale)", "requests", name)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, path)


def latency_vs_rate(path: Path, title: str, lines: Mapping[str, Sequence[tuple[float, float, float]]],
                    target_ms: float | None = None) -> Path:
    """p99 (solid) and p50 (dashed) against the offered rate, one colour per line; each point is
    (offered req/s, p50 ms, p99 ms)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, points) in enumerate(lines.items()):
        pts = sorted(p for p in points if p[2] is not None)
        if not pts:
            continue
        rate, p50, p99 = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
        colour = f"C{i % 10}"
        ax.plot(rate, p99, "-o", color=colour, label=f"{name} p99")
        ax.plot(rate, p50, "--", color=colour, alpha=0.7, label=f"{name} p50")
    if target_ms is not None:
        ax.axhline(target_ms, color="tab:red", linestyle=":", linewidth=1, label=f"target p99 {target_ms:g} ms")
    _decorate(ax, "y", "offered load (req/s)", "latency (ms, log scale)", title)
    return save_figure(fig, path)
