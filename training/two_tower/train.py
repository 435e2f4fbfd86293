"""Train the two-tower model with Ray Train (TorchTrainer: gloo on CPU, nccl on GPU).

Data flow: the driver fits the vocab and encodes the training frame once into fixed-width columns
(`training.features.fixed_width_*`), which go into the object store as a Ray Dataset of about a
hundred blocks (`ray.data.from_arrow`: no Ray Data task ever runs, so training workers that hold
every CPU of the cluster cannot starve the data pipeline). Every epoch the dataset's block order is
reshuffled (seeded, different per epoch), `streaming_split` hands each worker an equal share (DDP
needs the same number of steps on every rank) and each worker iterates it with
`iter_torch_batches` through a local shuffle buffer. The article catalogue, the sampling
probabilities and the validation queries travel once as one object-store reference.

Each epoch ends with a `ray.train.report` of the metrics and rank 0's checkpoint (model, optimizer,
history). A failed worker restarts the group from the last checkpoint (`FailureConfig`), a rerun
with the same `run_name` resumes where the run stopped, and with validation data training stops
after `early_stopping_patience` epochs without a better recall; the best epoch's checkpoint is the
one exported.

When the item tower reads article activity (recent sales, days on sale) the training rows carry a
snapshot time (`features_as_of`) and every batch holds rows of one snapshot: blocks are built per
snapshot, each worker cuts its blocks into batches, and ranks stop an epoch together
(`training.two_tower.groups`).

An ensemble (`TwoTowerConfig.ensemble` > 1) is that many such runs, as many at a time as the free CPUs
hold (`parallel_members`; each run is a blocking `fit` in a driver thread), on the same
encoded data and vocab with seeds seed + 1000 * m (member 0 is the single model: same seed, same run
name); the best epoch of each is exported into one pair of tower files (see `model.EnsembleTower`).

Sharding (`TwoTowerConfig.sharding`): data-parallel (DDP: every worker holds every table) is the
CPU default; "table_wise" (and "auto" on GPU) wrap the model in TorchRec's
DistributedModelParallel, which places whole tables on workers (CPU has no row-wise kernels).
DMP cannot share one table between two EmbeddingBagCollections, so that path trains the history
table untied from the article table. Its checkpoints hold the whole tables and their fused optimizer
state (each rank holds its own tables' part: rank 0 gathers them) and the dense AdamW state, so a
resumed DMP run trains on exactly as the interrupted one would have.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
import torch.distributed as dist

from common.config import TwoTowerConfig
from common.locations import is_uri
from feature_store.transforms import with_activity
from training.features import (
    I_CAT,
    ITEM_CATEGORICALS,
    Q_CAT,
    Q_DENSE,
    Q_HIST,
    Q_HIST_LEN,
    QUERY_CATEGORICALS,
    FeatureVocab,
    encode_items,
    encode_queries,
    fixed_width_items,
    fixed_width_queries,
)
from training.two_tower.groups import (
    BLOCK_BATCHES,
    GROUP,
    SAMPLE_PROB,
    GroupTables,
    activity_codes,
    activity_positions,
    group_columns,
    grouped_chunks,
    is_time_grouped,
    lockstep,
    split_block,
)
from training.two_tower.model import (
    ItemTower,
    QueryTower,
    TwoTower,
    candidate_log_q,
    in_batch_softmax_loss,
    mixed_log_q,
    save_towers,
    tower_kwargs,
)

CHECKPOINT_FILE = "model.pt"
DEFAULT_ID_DROPOUT = 0.05
VAL_METRIC = "val_recall"
ART_COL = ITEM_CATEGORICALS.index("article_id")  # 0: every vocab lists the id first (dataset_features)
CUST_COL = QUERY_CATEGORICALS.index("customer_id")
CPU_ADAGRAD_LR_SCALE = 10.0  # DMP on CPU: fused sparse Adagrad lr = this x learning_rate
MAX_BLOCKS = 128  # Ray Dataset blocks: enough for a per-epoch block shuffle, few enough to stay cheap

Batch = dict[str, torch.Tensor]
Reporter = Callable[[dict[str, Any], dict[str, Any] | None], None]  # (metrics, checkpoint blob on rank 0)


ENSEMBLE_SEED_STRIDE = 1000  # ensemble member m trains with seed cfg.seed + m * this


@dataclass(frozen=True)
class TrainResult:
    """The exported towers; `history`, `checkpoint_path` and `best_epoch` are the first member's,
    `member_histories` / `member_best_epochs` every member's (one entry without an ensemble)."""

    query_tower: Path
    item_tower: Path
    vocab: Path
    history: list[dict[str, Any]]
    checkpoint_path: str | None = None
    best_epoch: int | None = None
    member_histories: list[list[dict[str, Any]]] = field(default_factory=list)
    member_best_epochs: list[int | None] = field(default_factory=list)


def member_configs(cfg: TwoTowerConfig) -> list[TwoTowerConfig]:
    """One single-model config per ensemble member: the same settings, seed + m * ENSEMBLE_SEED_STRIDE."""
    return [cfg.model_copy(update={"seed": cfg.seed + m * ENSEMBLE_SEED_STRIDE, "ensemble": 1})
            for m in range(cfg.ensemble)]


@dataclass
class SideData:
    """What every rank needs besides the training stream: one object-store reference in Ray."""

    catalog: dict[str, np.ndarray]  # encoded items (jagged form), every article once
    probs: np.ndarray  # in-batch sampling probability per article row (training popularity)
    val_q: dict[str, np.ndarray] | None = None  # encoded validation queries
    val_target: np.ndarray | None = None  # article row each validation query bought
    groups: GroupTables | None = None  # time-grouped batches (see training.two_tower.groups)


# -- encoding ---------------------------------------------------------------------------------------
def split_validation(
    train_frame: pd.DataFrame, val_frame: pd.DataFrame | None, cfg: TwoTowerConfig
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """An explicit validation frame wins; else `val_days > 0` holds out the frame's last days."""
    if val_frame is not None or cfg.val_days == 0:
        return train_frame, val_frame
    if "t_dat" not in train_frame.columns:
        raise ValueError("val_days needs a 't_dat' column in the training frame (or pass val_frame)")
    start = train_frame["t_dat"].max() - pd.Timedelta(days=cfg.val_days - 1)
    late = train_frame["t_dat"] >= start
    if late.all() or not late.any():
        raise ValueError(f"val_days={cfg.val_days} leaves no training or no validation rows")
    return train_frame[~late], train_frame[late]


def encode_training_data(
    vocab: FeatureVocab,
    train_frame: pd.DataFrame,
    articles_frame: pd.DataFrame,
    cfg: TwoTowerConfig,
    val_frame: pd.DataFrame | None = None,
) -> tuple[dict[str, np.ndarray], SideData]:
    """Fixed-width training columns, plus the catalogue, sampling probabilities and validation set.

    Time-grouped (`groups.is_time_grouped`): GROUP and SAMPLE_PROB columns too, and the catalogue's
    activity as of the end of the training rows (validation sees the catalogue as it was then)."""
    q = encode_queries(vocab, train_frame, cfg.history_len)
    i = encode_items(vocab, train_frame)
    columns = {**fixed_width_queries(q, cfg.history_len), **fixed_width_items(i)}
    counts = np.bincount(i["article_id"], minlength=vocab.n_articles).astype(np.float64)
    side = SideData(
        catalog=encode_items(vocab, articles_frame),
        probs=(np.maximum(counts, 1.0) / max(len(train_frame), 1)).astype(np.float32),  # unseen: finite
    )
    if is_time_grouped(vocab, train_frame):
        end = train_frame["t_dat"].max().normalize() + pd.Timedelta(days=1)
        side.catalog = encode_items(vocab, with_activity(articles_frame, train_frame, end))
        columns.update(_time_groups(vocab, train_frame, i["article_id"], articles_frame, side, cfg))
    if val_frame is not None and len(val_frame):
        if len(val_frame) > cfg.val_max_rows:
            val_frame = val_frame.sample(n=cfg.val_max_rows, random_state=cfg.seed)
        side.val_q = encode_queries(vocab, val_frame, cfg.history_len)
        side.val_target = vocab.lookup("article_id", val_frame["article_id"])
    return columns, side


def _time_groups(vocab: FeatureVocab, frame: pd.DataFrame, article_codes: np.ndarray, articles_frame: pd.DataFrame,
                 side: SideData, cfg: TwoTowerConfig) -> dict[str, np.ndarray]:
    """GROUP / SAMPLE_PROB columns; with random negatives also each snapshot's catalogue tables."""
    columns, days, shares = group_columns(frame, article_codes, vocab.n_articles)
    if cfg.n_random_negatives:
        snapshots = (with_activity(articles_frame, frame, pd.Timestamp(int(d), unit="D")) for d in days)
        side.groups = GroupTables(days=days, probs=shares[:, side.catalog["article_id"]],
                                  activity=activity_codes(vocab, snapshots), activity_cols=activity_positions(vocab))
    return columns


def to_dataset(columns: dict[str, np.ndarray], min_block_rows: int, seed: int = 0) -> ray.data.Dataset:
    """Fixed-width columns as an in-memory Ray Dataset (2-D columns as Ray's tensor extension).

    With a GROUP column every block holds rows of one group (BLOCK_BATCHES batches at most), so a
    worker can cut one-group batches from each block it receives."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = len(columns[Q_HIST_LEN])
    rows = max(min_block_rows, math.ceil(n / MAX_BLOCKS), 1)
    if GROUP in columns:
        chunks = grouped_chunks(columns[GROUP], max(rows, BLOCK_BATCHES * min_block_rows),
                                np.random.default_rng(seed))
    else:
        chunks = [np.arange(s, min(s + rows, n)) for s in range(0, n, rows)]
    tables = [
        pa.table({k: ArrowTensorArray.from_numpy(v[idx]) if v.ndim > 1 else pa.array(v[idx])
                  for k, v in columns.items()})
        for idx in chunks
    ]
    return ray.data.from_arrow(tables)


def local_batches(columns: dict[str, np.ndarray], batch_size: int, seed: int) -> Callable[[int], Iterator[Batch]]:
    """The in-process stand-in for a dataset shard: a seeded permutation per epoch (one-group
    batches in random order when there is a GROUP column)."""
    n = len(columns[Q_HIST_LEN])

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        rng = np.random.default_rng([seed, epoch])
        if GROUP in columns:
            chunks = grouped_chunks(columns[GROUP], batch_size, rng)
        else:
            order = rng.permutation(n)
            chunks = [order[s : s + batch_size] for s in range(0, n, batch_size)]
        for idx in chunks:
            yield {k: torch.from_numpy(v[idx]) for k, v in columns.items()}

    return epoch_batches


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


def best_epoch(history: list[dict[str, Any]]) -> int | None:
    """The (first) epoch with the highest validation recall; None without validation."""
    scored = [(h[VAL_METRIC], -h["epoch"]) for h in history if VAL_METRIC in h]
    return -max(scored)[1] if scored else None


def should_stop(history: list[dict[str, Any]], patience: int) -> bool:
    """Early stopping: `patience` epochs in a row without a better validation recall."""
    best = best_epoch(history)
    return bool(patience and best is not None and history[-1]["epoch"] - best >= patience)


# -- model placement: DDP or TorchRec DMP ---------------------------------------------------------------
def resolve_sharding(sharding: str, device: torch.device) -> str:
    """As configured ("ddp", "table_wise", "planner"); "auto" is DMP with the planner's choice on GPU,
    DDP on CPU."""
    if sharding == "auto":
        return "planner" if device.type == "cuda" else "ddp"
    return sharding


class Trainable:
    """The model as the loop sees it: forward net, optimizer, full (unsharded) state in and out."""

    def __init__(self, model: TwoTower, cfg: TwoTowerConfig, mode: str, device: torch.device, distributed: bool):
        self.model, self.mode, self.device = model, mode, device
        if mode == "ddp":
            self.net: torch.nn.Module = model
            if distributed:
                self.net = ray.train.torch.prepare_model(model)  # moves to the device, DDP when world > 1
            else:
                model.to(device)
            self.opt: Any = torch.optim.AdamW(
                self.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True
            )
        else:
            if not dist.is_initialized():
                raise ValueError(f"sharding {cfg.sharding!r} uses TorchRec DistributedModelParallel, which needs a "
                                 "torch.distributed process group (run it through train_two_tower)")
            self.net, self.opt, self.plan, self.dense_opt = _build_dmp(model, cfg, mode, device)

    def describe(self) -> str:
        """How the tables are placed: one line for the progress output."""
        if self.mode == "ddp":
            return "data-parallel (every worker holds every table)"
        placed = []
        for module_sharding in self.plan.plan.values():
            for table, ps in module_sharding.items():
                placed.append(f"{table}:{ps.sharding_type}@{','.join(map(str, ps.ranks or []))}")
        return f"DistributedModelParallel ({self.mode}): " + " ".join(sorted(placed))

    @property
    def towers(self) -> TwoTower:
        return self.model

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The unsharded model state on rank 0 (None elsewhere); a collective under DMP."""
        if self.mode == "ddp":
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return _gather_tree(_dmp_state(self.net))

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.mode == "ddp":
            self.model.load_state_dict(state)
        else:
            _fill_tree(_dmp_state(self.net), state)

    def optimizer_state(self) -> dict[str, Any] | None:
        """DDP: the AdamW state (identical on every rank). DMP: the sharded tables' fused optimizer
        state gathered whole onto rank 0 (a collective: every rank calls it; None elsewhere) and
        the dense AdamW state (identical on every rank)."""
        if self.mode == "ddp":
            return self.opt.state_dict()
        fused = _gather_tree(self.net.fused_optimizer.state_dict())
        if dist.get_rank() != 0:
            return None
        return {"fused": fused, "dense": copy.deepcopy(self.dense_opt.state_dict())}  # a snapshot, not live moments

    def load_optimizer_state(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if self.mode == "ddp":
            self.opt.load_state_dict(state)
            return
        live = self.net.fused_optimizer.state_dict()
        _fill_tree(live, state["fused"])  # each rank copies its own shards' regions
        self.net.fused_optimizer.load_state_dict(live)
        self.dense_opt.load_state_dict(state["dense"])

    def eval_model(self, state: dict[str, torch.Tensor] | None) -> TwoTower | None:
        """A model for validation on rank 0: the live one under DDP, a CPU copy of `state` under DMP."""
        if self.mode == "ddp":
            return self.model
        if state is None:
            return None
        q_kwargs, i_kwargs = self.model.init_kwargs()
        copy = TwoTower(q_kwargs, i_kwargs, tie_history=False)
        copy.load_state_dict(state)
        return copy


def _build_dmp(model: TwoTower, cfg: TwoTowerConfig, mode: str, device: torch.device):
    """DistributedModelParallel over both towers' EmbeddingBagCollections; sparse Adam fused into backward."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # FBGEMM's CPU kernels only fuse Adagrad/SGD updates (Adam is GPU-only); Adagrad's effective step
    # shrinks fast, so it starts from a larger rate.
    sparse_opt, sparse_args = (
        (torch.optim.Adam, {"lr": cfg.learning_rate}) if device.type == "cuda"
        else (torch.optim.Adagrad, {"lr": cfg.learning_rate * CPU_ADAGRAD_LR_SCALE})
    )
    for ebc in (model.query_tower.ebc, model.item_tower.ebc):
        apply_optimizer_in_backward(sparse_opt, ebc.parameters(), sparse_args)
    world = dist.get_world_size() if dist.is_initialized() else 1
    constraints = None
    if mode == "table_wise":
        tables = [c.name for tower in (model.query_tower, model.item_tower) for c in tower.ebc.embedding_bag_configs()]
        constraints = {t: ParameterConstraints(sharding_types=["table_wise"]) for t in tables}
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=world)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    net = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    made: list[torch.optim.Optimizer] = []  # the dense AdamW itself: its state_dict is checkpointed

    def adamw(params: Any) -> torch.optim.Optimizer:
        made.append(torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay))
        return made[-1]

    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(net.named_parameters())), adamw)
    _fill_tree(_dmp_state(net), init_state)  # the same initial weights as the unsharded model (and as DDP)
    return net, CombinedOptimizer([net.fused_optimizer, dense]), plan, made[0]


def _dmp_state(net: torch.nn.Module) -> dict[str, Any]:
    return {k.removeprefix("_dmp_wrapped_module."): v for k, v in net.state_dict().items()}


def _shards(value: Any) -> list[tuple[list[int], torch.Tensor]] | None:
    """(offsets, tensor) of each local shard of a sharded state entry, None for a plain tensor."""
    if hasattr(value, "local_shards"):
        return [(list(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    return None


def _gather_tree(tree: Any) -> Any:
    """A state tree (dicts of tensors) whole on rank 0: each rank holds only its own tables'
    entries (and of a sharded table only its shards), so every rank sends its local parts
    (`gather_object`, a collective) and rank 0 assembles full tensors; None on other ranks."""
    parts: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(_local_parts(tree), parts if dist.get_rank() == 0 else None, dst=0)
    return _merge_parts(parts) if dist.get_rank() == 0 else None


def _local_parts(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _local_parts(v) for k, v in tree.items()}
    if (shards := _shards(tree)) is not None:
        return ("sharded", tuple(tree.size()), [(offsets, t.detach().cpu().clone()) for offsets, t in shards])
    return tree.detach().cpu().clone() if isinstance(tree, torch.Tensor) else tree


def _merge_parts(parts: list[Any]) -> Any:
    """One tree from the ranks' local parts: dict keys united, sharded entries assembled."""
    first = parts[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for p in parts for k in p)
        return {k: _merge_parts([p[k] for p in parts if k in p]) for k in keys}
    if isinstance(first, tuple) and len(first) == 3 and first[0] == "sharded":
        full = None
        for _, size, shards in parts:
            for offsets, t in shards:
                full = torch.zeros(size, dtype=t.dtype) if full is None else full
                full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape, strict=True))] = t
        return full if full is not None else torch.zeros(first[1])
    return first


@torch.no_grad()
def _fill_tree(live: Any, saved: Any) -> None:
    """Copy a gathered state tree into the live one in place: each rank fills its local shards."""
    for key, value in live.items():
        if key not in saved:
            raise KeyError(f"the checkpoint lacks {key!r}: was it saved by another model?")
        src = saved[key]
        if isinstance(value, dict):
            _fill_tree(value, src)
        elif (shards := _shards(value)) is not None:
            for offsets, tensor in shards:
                region = src[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))]
                tensor.copy_(region.to(tensor.device, tensor.dtype))
        elif isinstance(value, torch.Tensor):
            value.copy_(src.to(value.device, value.dtype))
        else:
            live[key] = src


# -- the training loop ------------------------------------------------------------------------------
@dataclass
class RunContext:
    """Where the loop runs: rank and world, device, and the hooks Ray Train (or a test) supplies."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    report: Reporter | None = None
    say: Callable[[str], None] | None = None
    resume: dict[str, Any] | None = None  # a loaded checkpoint blob


def run_training(
    config: dict[str, Any], epoch_batches: Callable[[int], Iterable[Batch]], side: SideData, run: RunContext
) -> tuple[TwoTower, list[dict[str, Any]]]:
    """The loop shared by Ray workers and in-process tests; returns the unwrapped model and history."""
    cfg = TwoTowerConfig.model_validate(config["cfg"])
    torch.set_num_threads(int(config.get("threads") or 1))  # see train_two_tower: 1 thread per reserved core
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    mode = resolve_sharding(cfg.sharding, run.device)
    model = TwoTower(config["query_kwargs"], config["item_kwargs"], tie_history=mode == "ddp")
    trainable = Trainable(model, cfg, mode, run.device, run.distributed)
    if run.say is not None and run.rank == 0:
        run.say(f"[two_tower] {run.world_size} worker(s) on {run.device.type}, {trainable.describe()}")
    history: list[dict[str, Any]] = []
    swa: dict[str, Any] | None = None  # the running weight average (cfg.swa_epochs), on rank 0
    if run.resume is not None:
        trainable.load_full_state(run.resume["state_dict"])
        trainable.load_optimizer_state(run.resume.get("optimizer"))
        history = list(run.resume["history"])
        swa = run.resume.get("swa")
    catalog_cat = torch.from_numpy(fixed_width_items(side.catalog)[I_CAT]).to(run.device)
    catalog_cat = catalog_cat[catalog_cat[:, ART_COL] > 0]
    probs = torch.from_numpy(side.probs).to(run.device) if config.get("log_q", True) else None
    step = TrainStep(cfg, float(config.get("id_dropout", DEFAULT_ID_DROPOUT)), probs, catalog_cat, run,
                     _known_rows(side))
    for epoch in range(len(history), cfg.epochs):
        if should_stop(history, cfg.early_stopping_patience):
            break  # a resumed run that had already stopped
        _maybe_fail(config.get("fail_once"), epoch, run.rank)
        step.start_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, steps, rows = 0.0, 0, 0
        trainable.net.train()
        batches = epoch_batches(epoch)
        if config.get("time_grouped") and run.world_size > 1 and dist.is_initialized():
            batches = lockstep(batches, run.device)
        for batch in batches:
            loss_sum += step(trainable, batch)
            steps, rows = steps + 1, rows + len(batch[Q_HIST_LEN])
        train_s = time.perf_counter() - t0
        loss_sum, steps, rows = _sum_across_ranks([loss_sum, steps, rows], run)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(steps, 1),
            "examples_per_s": rows / max(train_s, 1e-9),
            "train_s": round(train_s, 3),
        }
        state = trainable.full_state() if mode != "ddp" or run.rank == 0 else None
        if state is not None and epoch >= cfg.epochs - cfg.swa_epochs:
            swa = average_in(swa, state)
            if epoch == cfg.epochs - 1:  # the schedule's end: validate and export the average
                state = swa["state"]
                if mode == "ddp":
                    trainable.model.load_state_dict(state)
        if side.val_q is not None:
            metrics[VAL_METRIC] = _validate(trainable.eval_model(state), side, cfg.val_k, run)
        metrics["epoch_s"] = round(time.perf_counter() - t0, 3)
        metrics["finished_at"] = round(time.time(), 3)
        history.append(metrics)
        if run.say is not None and run.rank == 0:
            run.say(progress_line(metrics, cfg.epochs, cfg.val_k))
        if run.report is not None:
            opt_state = trainable.optimizer_state() if mode != "ddp" or run.rank == 0 else None  # DMP: collective
            run.report(metrics, _checkpoint_blob(trainable, state, opt_state, history, swa) if run.rank == 0 else None)
        if should_stop(history, cfg.early_stopping_patience):
            if run.say is not None and run.rank == 0:
                run.say(f"[two_tower] early stop: no better {VAL_METRIC} since epoch {best_epoch(history)}")
            break
    return model, history


def average_in(swa: dict[str, Any] | None, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Stochastic weight averaging: the running mean of the states seen so far and `state`
    ({"state": mean, "count": n}); integer buffers are taken as they are."""
    n = swa["count"] if swa else 0
    if n == 0:
        return {"state": {k: v.clone() for k, v in state.items()}, "count": 1}
    mean = {k: swa["state"][k] + (v - swa["state"][k]) / (n + 1) if v.is_floating_point() else v.clone()
            for k, v in state.items()}
    return {"state": mean, "count": n + 1}


def _known_rows(side: SideData) -> GroupTables | None:
    """The group tables restricted to the catalogue rows random negatives are drawn from (known ids)."""
    if side.groups is None:
        return None
    known = side.catalog["article_id"] > 0
    g = side.groups
    return GroupTables(g.days, g.probs[:, known], g.activity[:, known], g.activity_cols)


class TrainStep:
    """One optimisation step on a fixed-width batch (+ optional random catalogue negatives).

    A time-grouped batch (GROUP / SAMPLE_PROB columns) is corrected with its rows' own sampling
    probabilities, and its random negatives get their activity as of the batch's snapshot (`groups`)."""

    def __init__(
        self, cfg: TwoTowerConfig, id_dropout: float, probs: torch.Tensor | None, catalog_cat: torch.Tensor,
        run: RunContext, groups: GroupTables | None = None,
    ) -> None:
        self.cfg, self.id_dropout, self.probs, self.catalog_cat = cfg, id_dropout, probs, catalog_cat
        self.rank = run.rank
        self.gen = torch.Generator(device=run.device)
        self.groups = groups
        if groups is not None:
            self.group_probs = torch.from_numpy(groups.probs).to(run.device)
            self.group_activity = torch.from_numpy(groups.activity).to(run.device)

    def start_epoch(self, epoch: int) -> None:
        """Reseed per (epoch, rank), so a run resumed from a checkpoint draws what it would have drawn."""
        self.gen.manual_seed((self.cfg.seed * 1_000_003 + epoch) * 1_009 + self.rank)

    def __call__(self, tr: Trainable, batch: Batch) -> float:
        dev = tr.device
        q_cat, i_cat = batch[Q_CAT].to(dev), batch[I_CAT].to(dev)
        n_neg = self.cfg.n_random_negatives
        pick, group = None, None
        if n_neg:
            pick = torch.randint(len(self.catalog_cat), (n_neg,), generator=self.gen, device=dev)
            extra = self.catalog_cat[pick]
            if self.groups is not None and GROUP in batch:
                group = self.groups.index_of(int(batch[GROUP][0]))
                extra = extra.clone()
                extra[:, self.groups.activity_cols] = self.group_activity[group][pick]
            i_cat = torch.cat([i_cat, extra])
        item_ids = i_cat[:, ART_COL]  # true ids: masking and logQ ignore the id dropout below
        q_in, i_in = q_cat, i_cat
        if self.id_dropout > 0:  # some ids go to the unknown row 0, so cold customers/articles get a trained row
            q_in, i_in = self._drop(q_cat, CUST_COL), self._drop(i_cat, ART_COL, rows=len(q_cat))
        towers = tr.towers
        q, i = tr.net(
            *towers.query_tower.batch_inputs(q_in, batch[Q_HIST].to(dev), batch[Q_HIST_LEN].to(dev),
                                             batch[Q_DENSE].to(dev)),
            *towers.item_tower.batch_inputs(i_in),
        )
        log_q = self._log_q(batch, item_ids, len(q_cat), pick, group) if self.probs is not None else None
        loss = in_batch_softmax_loss(q, i, item_ids, self.cfg.temperature, log_q)
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()
        return float(loss.detach())

    def _log_q(self, batch: Batch, item_ids: torch.Tensor, b: int, pick: torch.Tensor | None,
               group: int | None) -> torch.Tensor:
        """Per candidate column: global popularity, or the batch rows' SAMPLE_PROB (time-grouped)."""
        n_neg, n_cat = self.cfg.n_random_negatives, len(self.catalog_cat)
        if SAMPLE_PROB not in batch:
            assert self.probs is not None
            return candidate_log_q(self.probs, item_ids, b, n_neg, n_cat)
        p = batch[SAMPLE_PROB].to(item_ids.device)
        if pick is not None:
            extra = self.group_probs[group][pick] if group is not None else torch.zeros(len(pick), device=p.device)
            p = torch.cat([p, extra.to(p.dtype)])
        return mixed_log_q(p, b, n_neg, n_cat)

    def _drop(self, cat: torch.Tensor, col: int, rows: int | None = None) -> torch.Tensor:
        n = rows if rows is not None else len(cat)
        out = cat.clone()
        mask = torch.rand(n, generator=self.gen, device=cat.device) < self.id_dropout
        out[:n, col] = out[:n, col].masked_fill(mask, 0)
        return out


def _validate(model: TwoTower | None, side: SideData, k: int, run: RunContext) -> float:
    """Recall@k on rank 0, shared with every rank so they all take the same early-stopping decision."""
    value = 0.0
    if run.rank == 0 and model is not None:
        assert side.val_q is not None and side.val_target is not None
        value = recall_at_k(model.query_tower, model.item_tower, side.val_q, side.val_target, side.catalog, k)
    if run.world_size > 1 and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=0)
        value = float(t[0])
    return value


def _sum_across_ranks(values: list[float], run: RunContext) -> list[float]:
    if run.world_size > 1 and dist.is_initialized():
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return [float(x) for x in t]
    return values


def _maybe_fail(hook: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """Test hook: fail once, on `rank` at the start of `epoch` (0-based), remembered by a marker file."""
    if not hook or epoch != hook["epoch"] or rank != hook["rank"]:
        return
    marker = Path(hook["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed at epoch {epoch} on rank {rank}, pid {os.getpid()}\n")
    raise RuntimeError(f"injected worker failure at epoch {epoch + 1} (test hook)")


def _tagged(line: str, tag: str | None) -> str:
    """An ensemble member's line names the member: "[two_tower member 2/2] epoch 3/15 ..."."""
    return line.replace("[two_tower]", f"[two_tower {tag}]", 1) if tag else line


def progress_line(metrics: dict[str, Any], epochs: int, val_k: int) -> str:
    val = f" recall@{val_k} {metrics[VAL_METRIC]:.4f}" if VAL_METRIC in metrics else ""
    return (
        f"[two_tower] epoch {metrics['epoch']}/{epochs} loss {metrics['train_loss']:.4f} "
        f"{metrics['examples_per_s']:,.0f} examples/s{val} {metrics['epoch_s']:.1f}s"
    )


# -- checkpoints ------------------------------------------------------------------------------------
def _checkpoint_blob(
    tr: Trainable, state: dict[str, torch.Tensor] | None, opt_state: dict[str, Any] | None,
    history: list[dict[str, Any]], swa: dict[str, Any] | None = None,
) -> dict[str, Any]:
    q_kwargs, i_kwargs = tr.model.init_kwargs()
    return {
        "state_dict": state, "optimizer": opt_state, "history": list(history), "swa": swa,
        "query_kwargs": q_kwargs, "item_kwargs": i_kwargs, "tie_history": tr.model.tie_history,
    }


def load_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def model_from_checkpoint(checkpoint_dir: str | Path) -> tuple[TwoTower, list[dict[str, Any]]]:
    blob = load_checkpoint(checkpoint_dir)
    model = TwoTower(blob["query_kwargs"], blob["item_kwargs"], tie_history=blob.get("tie_history", True))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), list(blob["history"])


# -- Ray Train entry point --------------------------------------------------------------------------
def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Rank/world/device from Ray Train, the dataset shard, every epoch a report with rank 0's checkpoint."""
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only batches
    warnings.filterwarnings("ignore", message="Please use DTensor instead")  # TorchRec's sharded state
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    side: SideData = ray.get(config["side_ref"])
    shard = ray.train.get_dataset_shard("train")
    cfg = TwoTowerConfig.model_validate(config["cfg"])
    queue = config.get("progress_queue")

    def epoch_batches(epoch: int) -> Iterable[Batch]:
        if config.get("time_grouped"):  # one-group blocks, cut into one-group batches here
            rng = np.random.default_rng([cfg.seed, epoch, rank])
            blocks = shard.iter_torch_batches(batch_size=None, device=device)
            return (b for block in blocks for b in split_block(block, cfg.batch_size, rng))
        return shard.iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer_rows or None,
            local_shuffle_seed=cfg.seed * 10_000 + epoch * 100 + rank, device=device,
        )

    def report(metrics: dict[str, Any], blob: dict[str, Any] | None) -> None:
        if blob is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(blob, Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"epoch_{metrics['epoch']:03d}",
            )

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(d)
    run = RunContext(
        rank=rank, world_size=world_size, device=device, distributed=True, report=report,
        say=(lambda line: queue.put(_tagged(line, config.get("tag")))) if queue is not None else None, resume=resume,
    )
    run_training(config, epoch_batches, side, run)


def train_local(
    config: dict[str, Any], columns: dict[str, np.ndarray], side: SideData
) -> tuple[TwoTower, list[dict[str, Any]]]:
    """The same loop in this process, without Ray (tests, quick experiments)."""
    cfg = TwoTowerConfig.model_validate(config["cfg"])
    say = (lambda line: print(line, flush=True)) if config.get("progress", True) else None
    return run_training(config, local_batches(columns, cfg.batch_size, cfg.seed), side, RunContext(say=say))


# -- driver -----------------------------------------------------------------------------------------
def build_loop_config(
    vocab: FeatureVocab, cfg: TwoTowerConfig, *, log_q: bool = True, id_dropout: float = DEFAULT_ID_DROPOUT,
    progress: bool = True, threads: int | None = None,
) -> dict[str, Any]:
    """The plain-dict config every worker receives (picklable, no frames)."""
    q_kwargs, i_kwargs = tower_kwargs(vocab, cfg)
    return {
        "cfg": cfg.model_dump(), "query_kwargs": q_kwargs, "item_kwargs": i_kwargs, "log_q": log_q,
        "id_dropout": id_dropout, "progress": progress, "threads": threads,
    }


def fit_vocab(train_frame: pd.DataFrame, articles_frame: pd.DataFrame, customers_frame: pd.DataFrame,
              roles: Any = None) -> FeatureVocab:
    """The vocab of the articles the training rows bought: an article never bought in training (and
    an attribute value only such articles have) maps to the unknown row 0, which id dropout trains,
    instead of a row left at its random initialisation."""
    channels = None if roles is None or roles.is_hm else train_frame["sales_channel_id"].dropna().unique()
    bought = articles_frame[articles_frame["article_id"].isin(train_frame["article_id"])]
    return FeatureVocab.fit(bought, customers_frame, roles=roles, channels=channels)


def _use_gpu(cfg: TwoTowerConfig) -> bool:
    if cfg.device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.device == "cuda"


def _cpus_per_worker(cfg: TwoTowerConfig) -> float:
    """The configured CPUs per worker, scaled down so that every worker fits the cluster (never a hang)."""
    total = ray.cluster_resources().get("CPU", 1.0)
    fit = math.floor(100 * total / cfg.num_workers) / 100
    if fit < cfg.cpus_per_worker:
        print(f"[two_tower] {cfg.num_workers} workers x {cfg.cpus_per_worker} CPU do not fit {total:g} CPUs: "
              f"{fit:g} CPU each", flush=True)
    return max(min(cfg.cpus_per_worker, fit), 0.01)


class _ProgressPrinter:
    """Prints the workers' progress lines on the driver (worker stdout may not reach it)."""

    def __init__(self, enabled: bool) -> None:
        self.queue = None
        if enabled:
            from ray.util.queue import Queue

            self.queue = Queue(actor_options={"num_cpus": 0})
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._pump, daemon=True)
            self._thread.start()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set() or not self.queue.empty():
            try:
                print(self.queue.get(timeout=0.5), file=sys.stdout, flush=True)
            except Empty:
                continue
            except Exception:  # noqa: BLE001  (the queue actor is gone: nothing left to print)
                return

    def close(self) -> None:
        if self.queue is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self.queue.shutdown()


def train_two_tower(
    train_frame: pd.DataFrame,
    articles_frame: pd.DataFrame,
    customers_frame: pd.DataFrame,
    cfg: TwoTowerConfig,
    out_dir: Path,
    storage_dir: str | Path,
    val_frame: pd.DataFrame | None = None,
    progress: bool = True,
    *,
    log_q: bool = True,
    id_dropout: float = DEFAULT_ID_DROPOUT,
    run_name: str | None = None,
    fail_once_at_epoch: int | None = None,
    roles: Any = None,
) -> TrainResult:
    """Fit vocab, encode, train on Ray Train workers, export the best epoch's towers.

    A rerun with the same `run_name` and `storage_dir` resumes from that run's last checkpoint.
    `storage_dir` is a folder or a URI Ray Train opens (`s3://bucket/prefix`); on a multi-node cluster
    every node must reach it.
    Each worker runs as many torch threads as the CPUs it reserves (`cfg.cpus_per_worker`, default 1): on
    a shared 2-core box two intra-op threads per process were 20% faster when idle but 5-10x slower as
    soon as anything else ran, so one thread per reserved core is the robust default.
    `fail_once_at_epoch` is a test hook: the last worker raises once at the start of that epoch (1-based).
    `roles` (a dataset config's `feature_store.dataset.Roles`) picks the towers' features; None: H&M's.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train_frame, val_frame = split_validation(train_frame, val_frame, cfg)
    vocab = fit_vocab(train_frame, articles_frame, customers_frame, roles)
    columns, side = encode_training_data(vocab, train_frame, articles_frame, cfg, val_frame)
    name = run_name or f"two_tower_{datetime.now(UTC):%Y%m%d_%H%M%S}_{uuid.uuid4().hex[:6]}"
    storage = str(storage_dir) if is_uri(storage_dir) else str(Path(storage_dir).resolve())
    if fail_once_at_epoch is not None and is_uri(storage):
        raise ValueError("fail_once_at_epoch (a test hook) needs a local storage_dir for its marker file")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    use_gpu = _use_gpu(cfg)
    cpus = _cpus_per_worker(cfg)
    from ray.data import RandomSeedConfig

    time_grouped = GROUP in columns
    has_val = side.val_q is not None
    side_ref = ray.put(side)
    members = member_configs(cfg)
    memory = member_bytes(vocab, cfg, use_gpu)
    parallel = members_at_once(cfg, cpus, use_gpu, ray.available_resources(), memory)
    printer = _ProgressPrinter(progress)
    if progress and len(members) > 1:
        print(f"[two_tower] ensemble of {len(members)} (seeds {', '.join(str(m.seed) for m in members)}), "
              f"{parallel} at a time (up to {memory / 2**30:.1f} GiB of memory each)", flush=True)

    def fit_member(m: int) -> tuple[list[dict[str, Any]], TwoTower, Any, int | None]:
        mcfg = members[m]
        dataset = to_dataset(columns, min_block_rows=mcfg.batch_size, seed=mcfg.seed).randomize_block_order(
            seed=RandomSeedConfig(seed=mcfg.seed, reseed_after_execution=True)  # a new block order every epoch
        )
        dataset.context.enable_progress_bars = False  # the per-epoch progress line says what matters
        loop_config = build_loop_config(vocab, mcfg, log_q=log_q, id_dropout=id_dropout, progress=progress,
                                        threads=max(1, math.floor(cpus)))
        loop_config.update(side_ref=side_ref, use_gpu=use_gpu, progress_queue=printer.queue,
                           time_grouped=time_grouped, tag=f"member {m + 1}/{len(members)}" if len(members) > 1 else None)
        if fail_once_at_epoch is not None and m == 0:
            loop_config["fail_once"] = {"epoch": fail_once_at_epoch - 1, "rank": cfg.num_workers - 1,
                                        "marker": str(Path(storage) / name / "injected_failure")}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=(
                {"CPU": cpus, "GPU": 1} if use_gpu else {"CPU": cpus})),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            datasets={"train": dataset},
            dataset_config=DataConfig(datasets_to_split=["train"]),
            run_config=RunConfig(
                storage_path=storage,
                # member 0 is the single model (same seed, same run name: a rerun resumes it)
                name=name if m == 0 else f"{name}_member{m}",
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(  # the best epoch, and always the latest (for resuming)
                    num_to_keep=1,
                    checkpoint_score_attribute=VAL_METRIC if has_val else None,
                    checkpoint_score_order="max",
                ),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"two-tower training failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError("two-tower training finished without a checkpoint")
        with result.checkpoint.as_directory() as d:
            history = list(load_checkpoint(d)["history"])
        best, epoch = _best_checkpoint(result, has_val)
        with best.as_directory() as d:
            model, _ = model_from_checkpoint(d)
        return history, model, best, epoch

    try:
        fitted = run_members(fit_member, len(members), parallel)
    finally:
        printer.close()
    histories = [h for h, _, _, _ in fitted]
    models = [model for _, model, _, _ in fitted]
    bests = [(best, epoch) for _, _, best, epoch in fitted]
    paths = save_towers(models, vocab, cfg, out_dir)
    return TrainResult(paths["query_tower"], paths["item_tower"], paths["vocab"], histories[0], bests[0][0].path,
                       bests[0][1], member_histories=histories, member_best_epochs=[e for _, e in bests])


# A CPU worker's memory besides its tables: its peak RSS was 520 MB on the tests' tiny run and 584 MB
# on the demo's (whose tables are under 1 MB), sampled from /proc every 0.5 s; rounded up (docs/scaling.md F44).
WORKER_BASE_BYTES = 768 << 20
# Copies of the tables a CPU worker may hold at once: the weights, their gradients, AdamW's two moments,
# the weight average (swa_epochs) and the checkpoint's copy being written.
TABLE_COPIES = 6


def member_bytes(vocab: FeatureVocab, cfg: TwoTowerConfig, use_gpu: bool) -> int:
    """The host memory one ensemble member may take, an upper bound: every worker holds every table
    (data-parallel; sharded runs hold less, except rank 0 gathering a checkpoint). On GPU the
    tables live on the device. The towers' MLPs are left out: tens of thousands of weights."""
    rows = sum(vocab.query_cardinalities().values()) + vocab.n_articles + sum(vocab.item_cardinalities().values())
    tables = 0 if use_gpu else TABLE_COPIES * 4 * rows * cfg.embedding_dim  # float32
    return cfg.num_workers * (WORKER_BASE_BYTES + tables)


def members_at_once(cfg: TwoTowerConfig, cpus: float, use_gpu: bool, free: dict[str, float],
                    member_memory: int = 0) -> int:
    """How many members train at once: as many as the `free` CPUs (GPUs) and, given `member_memory`
    (bytes, `member_bytes`), Ray's free `memory` hold, at most `parallel_members` (0: no cap) and never
    fewer than one. Only what is free counts: a member whose workers cannot be placed would wait for Ray
    Train's worker-group start timeout and fail, and members that outgrow the memory get killed by
    Ray's memory monitor."""
    fit = math.floor(free.get("CPU", 0.0) / (cfg.num_workers * cpus) + 1e-9)
    if use_gpu:
        fit = min(fit, math.floor(free.get("GPU", 0.0) / cfg.num_workers + 1e-9))
    if member_memory > 0 and "memory" in free:
        fit = min(fit, math.floor(free["memory"] / member_memory))
    cap = cfg.parallel_members or cfg.ensemble
    return max(1, min(fit, cap, cfg.ensemble))


def run_members(fit: Callable[[int], Any], n: int, parallel: int) -> list[Any]:
    """fit(0..n-1), `parallel` at a time, results in member order. Each call blocks on its own Ray Train
    run in a daemon thread: Ctrl-C reaches the caller at once (Ray's shutdown then ends the runs) instead
    of waiting for them at exit. After a failure no further member starts, the running ones finish, and
    the lowest failed member's error is raised."""
    if parallel <= 1:
        return [fit(m) for m in range(n)]
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}
    pending = iter(range(n))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                m = None if errors else next(pending, None)
            if m is None:
                return
            try:
                results[m] = fit(m)
            except BaseException as e:  # noqa: BLE001  (re-raised by the caller's thread)
                with lock:
                    errors[m] = e

    threads = [threading.Thread(target=work, name=f"two_tower_member_{i}", daemon=True) for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[min(errors)]
    return [results[m] for m in range(n)]


def _best_checkpoint(result: Any, has_val: bool) -> tuple[Any, int | None]:
    """The kept checkpoint with the highest validation recall (earliest on ties), else the latest."""
    scored = [(m[VAL_METRIC], -m["epoch"], c) for c, m in (result.best_checkpoints or []) if VAL_METRIC in m]
    if not has_val or not scored:
        return result.checkpoint, None
    recall, neg_epoch, checkpoint = max(scored, key=lambda t: (t[0], t[1]))
    return checkpoint, -neg_epoch



@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A world-of-one gloo group, so DistributedModelParallel runs in this process (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
