"""PNG plots of what people would rather look at than JSON: training curves and recall@k."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(history: list[dict], path: Path) -> Path:
    """Loss (and validation recall when present) per epoch."""
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("in-batch softmax loss")
    val = [h.get("val_recall") for h in history]
    if any(v is not None for v in val):
        ax2 = ax.twinx()
        ax2.plot(epochs, val, marker="s", color="tab:orange", label="val recall")
        ax2.set_ylabel("validation recall")
    ax.set_title("two-tower training")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_metrics(metrics: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: every metric for every model, baselines included."""
    models = list(metrics)
    names = sorted({m for v in metrics.values() for m in v}, key=lambda s: (s.split("@")[0], int(s.split("@")[1])))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [metrics[model].get(n, 0.0) for n in names], width=width, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("score")
    ax.set_title("time-split evaluation (last 7 days)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
