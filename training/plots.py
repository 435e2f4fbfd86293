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
    return save_figure(fig, path)


def plot_metrics(metrics: dict[str, dict[str, float]], path: Path) -> Path:
    """Recall@k curves of every model against the baselines, and MAP@12 / NDCG@10 bars."""
    models = list(metrics)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model in models:
        ks = sorted(int(m.split("@")[1]) for m in metrics[model] if m.startswith("recall@"))
        style = "--" if model not in ("retrieval", "ranked") else "-"
        left.plot(ks, [metrics[model][f"recall@{k}"] for k in ks], style, marker="o", label=model)
    left.set_xscale("log")
    left.set_xlabel("k")
    left.set_ylabel("recall@k")
    left.set_title("recall@k (dashed: baselines)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    names = [n for n in ("map@12", "ndcg@10") if all(n in metrics[m] for m in models)]
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        right.bar([j + i * width for j in range(len(names))], [metrics[model][n] for n in names], width=width,
                  label=model)
    right.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(names))], names)
    right.set_title("ranking quality")
    right.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (folders made) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
