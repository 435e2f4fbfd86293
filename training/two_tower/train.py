"""Train the two-tower model with Ray Train (TorchTrainer, gloo on CPU).

Data flow: the driver fits the vocab, encodes everything once and writes one uncompressed `.npz`
(train queries/items, the article catalogue, optional validation queries + targets, logQ table).
Each worker loads the whole file (the path must be visible to every worker: one machine or shared
storage). Every epoch draws a seeded global permutation and each rank takes its equal-sized slice,
so ranks run the same number of steps (DDP needs that) and see different rows each epoch. Rank 0
reports a checkpoint every epoch; the driver rebuilds the model from the last one and exports the
towers.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from common.config import TwoTowerConfig
from training.features import FeatureVocab, encode_items, encode_queries, n_rows, take_rows
from training.two_tower.model import (
    ItemTower,
    QueryTower,
    TwoTower,
    in_batch_softmax_loss,
    sampling_log_probs,
    save_towers,
    tower_kwargs,
)

CHECKPOINT_FILE = "model.pt"
DATA_GROUPS = ("train_q", "train_i", "catalog", "val_q")
DEFAULT_VAL_K = 100
DEFAULT_ID_DROPOUT = 0.05

Reporter = Callable[[dict[str, Any], TwoTower, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class TrainResult:
    query_tower: Path
    item_tower: Path
    vocab: Path
    history: list[dict[str, Any]]
    checkpoint_path: str | None = None


# -- encoded data on disk ---------------------------------------------------------------------------
def save_encoded(path: Path, groups: dict[str, dict[str, np.ndarray]], extra: dict[str, np.ndarray]) -> Path:
    """One flat npz, keys `group/name`; uncompressed so loading is a plain read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{g}/{k}": v for g, enc in groups.items() for k, v in enc.items()}
    np.savez(path, **flat, **extra)
    return path


def load_encoded(path: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    extra: dict[str, np.ndarray] = {}
    with np.load(path) as z:
        for key in z.files:
            group, _, name = key.partition("/")
            if name:
                groups.setdefault(group, {})[name] = z[key]
            else:
                extra[key] = z[key]
    return groups, extra


def encode_training_data(
    vocab: FeatureVocab,
    train_frame: pd.DataFrame,
    articles_frame: pd.DataFrame,
    history_len: int,
    val_frame: pd.DataFrame | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Everything the workers need, as arrays: train pairs, catalogue, validation, logQ table."""
    groups = {
        "train_q": encode_queries(vocab, train_frame, history_len),
        "train_i": encode_items(vocab, train_frame),
        "catalog": encode_items(vocab, articles_frame),
    }
    extra = {"log_q": sampling_log_probs(groups["train_i"]["article_id"], vocab.n_articles)}
    if val_frame is not None and len(val_frame):
        groups["val_q"] = encode_queries(vocab, val_frame, history_len)
        extra["val_target"] = vocab.lookup("article_id", val_frame["article_id"])
    return groups, extra


# -- evaluation -------------------------------------------------------------------------------------
def recall_at_k(
    query_tower: QueryTower,
    item_tower: ItemTower,
    queries: dict[str, np.ndarray],
    targets: np.ndarray,
    catalog: dict[str, np.ndarray],
    k: int,
) -> float:
    """Fraction of (query, purchased article) pairs whose article is in the exact top-k of the catalogue."""
    q = torch.from_numpy(query_tower.embed(queries))
    items = torch.from_numpy(item_tower.embed(catalog))
    ids = torch.from_numpy(catalog["article_id"])
    k = min(k, len(ids))
    hits = 0
    for s in range(0, len(q), 4096):
        top = torch.topk(q[s : s + 4096] @ items.T, k, dim=1).indices
        tgt = torch.from_numpy(targets[s : s + 4096]).unsqueeze(1)
        hits += int(((ids[top] == tgt) & (tgt > 0)).any(dim=1).sum())
    return hits / max(len(q), 1)


# -- the training loop ------------------------------------------------------------------------------
def run_training(
    config: dict[str, Any], rank: int = 0, world_size: int = 1, report: Reporter | None = None
) -> tuple[TwoTower, list[dict[str, Any]]]:
    """The loop shared by Ray workers and in-process tests; returns the (unwrapped) model and history."""
    cfg = TwoTowerConfig.model_validate(config["cfg"])
    torch.set_num_threads(int(config.get("threads") or 1))  # see train_two_tower: 1 thread per reserved core
    torch.manual_seed(cfg.seed)  # same init on every rank; DDP broadcasts rank 0's weights anyway
    groups, extra = load_encoded(config["data_path"])
    train_q, train_i = groups["train_q"], groups["train_i"]
    model = TwoTower(config["query_kwargs"], config["item_kwargs"])
    start_epoch, history = _restore(model, config.get("resume_from"))
    net: torch.nn.Module = model
    if world_size > 1:
        net = ray.train.torch.prepare_model(model)
    # fused: one kernel over all parameters, 2x faster steps here when the id tables are large
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    log_q = torch.from_numpy(extra["log_q"]) if config.get("log_q", True) else None
    id_dropout = float(config.get("id_dropout", DEFAULT_ID_DROPOUT))
    per_rank = n_rows(train_q) // world_size
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_rows(train_q))
        shard = order[rank * per_rank : (rank + 1) * per_rank]
        drop_rng = np.random.default_rng([cfg.seed, epoch, rank, 1])
        loss_sum, steps = 0.0, 0
        net.train()
        for s in range(0, per_rank, cfg.batch_size):
            idx = shard[s : s + cfg.batch_size]
            loss = _step(net, opt, take_rows(train_q, idx), take_rows(train_i, idx), cfg, log_q, id_dropout, drop_rng)
            loss_sum, steps = loss_sum + loss, steps + 1
        metrics = {"epoch": epoch + 1, "train_loss": _mean_across_ranks(loss_sum, steps, world_size)}
        if rank == 0 and "val_q" in groups:
            k = int(config.get("val_k", DEFAULT_VAL_K))
            metrics[f"val_recall@{k}"] = recall_at_k(
                model.query_tower, model.item_tower, groups["val_q"], extra["val_target"], groups["catalog"], k
            )
        metrics["epoch_s"] = round(time.perf_counter() - t0, 3)
        history.append(metrics)
        if rank == 0 and config.get("progress", True):
            # the real stdout: Ray Train V2 patches print() and would show every line twice
            print(_progress_line(metrics, cfg.epochs), file=sys.__stdout__, flush=True)
        if report is not None:
            report(metrics, model, history)
    return model, history


def _step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    q_enc: dict[str, np.ndarray],
    i_enc: dict[str, np.ndarray],
    cfg: TwoTowerConfig,
    log_q: torch.Tensor | None,
    id_dropout: float,
    rng: np.random.Generator,
) -> float:
    """One optimisation step. Some ids go to the unknown row 0, so cold customers/articles get a trained row."""
    item_ids = torch.from_numpy(i_enc["article_id"].copy())  # true ids: masking and logQ ignore the dropout
    if id_dropout > 0:
        for enc, key in ((q_enc, "customer_id"), (i_enc, "article_id")):
            enc[key] = np.where(rng.random(len(enc[key])) < id_dropout, 0, enc[key])
    towers = net.module if hasattr(net, "module") else net
    q, i = net(*towers.query_tower.inputs(q_enc), *towers.item_tower.inputs(i_enc))
    batch_log_q = log_q[item_ids] if log_q is not None else None
    loss = in_batch_softmax_loss(q, i, item_ids, cfg.temperature, batch_log_q)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _mean_across_ranks(loss_sum: float, steps: int, world_size: int) -> float:
    if world_size > 1 and dist.is_initialized():
        t = torch.tensor([loss_sum, float(steps)], dtype=torch.float64)
        dist.all_reduce(t)
        loss_sum, steps = float(t[0]), int(t[1])
    return loss_sum / max(steps, 1)


def _progress_line(metrics: dict[str, Any], epochs: int) -> str:
    extra = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
    return (
        f"[two_tower] epoch {metrics['epoch']}/{epochs} loss {metrics['train_loss']:.4f} "
        f"{extra}{' ' if extra else ''}{metrics['epoch_s']:.1f}s"
    )


def _checkpoint_blob(model: TwoTower, history: list[dict[str, Any]]) -> dict[str, Any]:
    q_kwargs, i_kwargs = model.init_kwargs()
    return {"state_dict": model.state_dict(), "query_kwargs": q_kwargs, "item_kwargs": i_kwargs, "history": history}


def _restore(model: TwoTower, checkpoint_dir: str | None) -> tuple[int, list[dict[str, Any]]]:
    """Resume after a worker failure: weights and history from the checkpoint, fresh optimizer moments."""
    if not checkpoint_dir:
        return 0, []
    blob = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["state_dict"])
    return len(blob["history"]), list(blob["history"])


def model_from_checkpoint(checkpoint_dir: str | Path) -> tuple[TwoTower, list[dict[str, Any]]]:
    blob = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = TwoTower(blob["query_kwargs"], blob["item_kwargs"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), list(blob["history"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: rank/world from the context, every epoch a report with rank 0's checkpoint."""
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    resume = ray.train.get_checkpoint()

    def report(metrics: dict[str, Any], model: TwoTower, history: list[dict[str, Any]]) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(_checkpoint_blob(model, history), Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"epoch_{metrics['epoch']:03d}",
            )

    if resume is not None:
        with resume.as_directory() as d:
            run_training({**config, "resume_from": d}, rank, world_size, report)
    else:
        run_training(config, rank, world_size, report)


def train_local(config: dict[str, Any]) -> tuple[TwoTower, list[dict[str, Any]]]:
    """The same loop in this process, without Ray (tests, quick experiments)."""
    return run_training(config, rank=0, world_size=1, report=None)


# -- driver -----------------------------------------------------------------------------------------
def build_loop_config(
    vocab: FeatureVocab, cfg: TwoTowerConfig, data_path: Path, *, log_q: bool = True,
    id_dropout: float = DEFAULT_ID_DROPOUT, val_k: int = DEFAULT_VAL_K, progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """The plain-dict config every worker receives (picklable, no frames)."""
    q_kwargs, i_kwargs = tower_kwargs(vocab, cfg)
    return {
        "cfg": cfg.model_dump(), "data_path": str(data_path), "query_kwargs": q_kwargs, "item_kwargs": i_kwargs,
        "log_q": log_q, "id_dropout": id_dropout, "val_k": val_k, "progress": progress, "threads": threads,
    }


def train_two_tower(
    train_frame: pd.DataFrame,
    articles_frame: pd.DataFrame,
    customers_frame: pd.DataFrame,
    cfg: TwoTowerConfig,
    out_dir: Path,
    storage_dir: Path,
    val_frame: pd.DataFrame | None = None,
    progress: bool = True,
    *,
    log_q: bool = True,
    id_dropout: float = DEFAULT_ID_DROPOUT,
    val_k: int = DEFAULT_VAL_K,
    run_name: str | None = None,
    cpus_per_worker: float = 1.0,
) -> TrainResult:
    """Fit vocab, encode, train on Ray Train workers, export the towers from the last checkpoint.

    Each worker runs as many torch threads as the CPUs it reserves (`cpus_per_worker`, default 1): on a
    shared 2-core box two intra-op threads per process were 20% faster when idle but 5-10x slower as
    soon as anything else ran, so one thread per reserved core is the robust default.
    """
    vocab = FeatureVocab.fit(articles_frame, customers_frame)
    groups, extra = encode_training_data(vocab, train_frame, articles_frame, cfg.history_len, val_frame)
    name = run_name or f"two_tower_{datetime.now(UTC):%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"
    data_path = save_encoded(Path(storage_dir).resolve() / "inputs" / f"{name}.npz", groups, extra)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    threads = max(1, math.floor(cpus_per_worker))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=build_loop_config(
            vocab, cfg, data_path, log_q=log_q, id_dropout=id_dropout, val_k=val_k, progress=progress, threads=threads
        ),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(
            storage_path=str(Path(storage_dir).resolve()), name=name, checkpoint_config=CheckpointConfig(num_to_keep=2)
        ),
    )
    try:
        result = trainer.fit()
    finally:
        data_path.unlink(missing_ok=True)
    if result.error is not None:
        raise RuntimeError(f"two-tower training failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("two-tower training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        model, history = model_from_checkpoint(d)
    paths = save_towers(model, vocab, cfg, out_dir)
    return TrainResult(paths["query_tower"], paths["item_tower"], paths["vocab"], history, result.checkpoint.path)

