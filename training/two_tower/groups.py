"""Time-grouped training: in-batch negatives from the purchase's own week (plain torch, no Ray).

Item features that change with time (an article's recent sales and days on sale,
`training.features.ACTIVITY_FEATURES`) break plain in-batch negatives: in a batch that mixes
weeks the towers can tell a query's own item from the others by *when* its features were
taken (the query's month and history say when it was made) instead of by what the customer
likes (recall@100 on the generated data's last training week fell from 0.77 to 0.66). So when
the item tower reads them, every batch holds purchases of one snapshot (the view's
`features_as_of`): all its items featurised at one moment, as the catalogue is when the index
is built. The logQ correction
then uses the article's share of that snapshot's purchases, its chance of being drawn into such a
batch (the global share would subtract the very popularity swings these features are there for).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from feature_store.views import AS_OF_COLUMN
from training.features import ACTIVITY_FEATURES, FeatureVocab

GROUP = "group"  # the row's snapshot, as a day number (int64)
SAMPLE_PROB = "sample_prob"  # the row's article's share of its snapshot's purchases (float32)
BLOCK_BATCHES = 4  # rows of a Ray Dataset block, in batches: the pool a batch's negatives come from

Batch = dict[str, torch.Tensor]


@dataclass
class GroupTables:
    """Per-snapshot catalogue tables, for the extra random negatives of a time-grouped batch."""

    days: np.ndarray  # [G] sorted snapshot day numbers (GROUP values)
    probs: np.ndarray  # [G, n catalogue rows] float32: SAMPLE_PROB of each catalogue article per snapshot
    activity: np.ndarray  # [G, n catalogue rows, n activity features] int64: their activity codes
    activity_cols: list[int]  # positions of the activity features among the item features

    def index_of(self, day: int) -> int:
        return int(np.searchsorted(self.days, day))


def is_time_grouped(vocab: FeatureVocab, frame: pd.DataFrame) -> bool:
    """Group batches by snapshot when the item tower reads activity and the frame says when it was taken."""
    return vocab.reads_activity and AS_OF_COLUMN in frame.columns


def day_numbers(times: pd.Series) -> np.ndarray:
    return pd.to_datetime(times).dt.normalize().to_numpy("datetime64[D]").astype(np.int64)


def group_columns(frame: pd.DataFrame, article_codes: np.ndarray, n_articles: int
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """GROUP and SAMPLE_PROB per row, plus the snapshot days and the [G, n_articles] share table."""
    days = day_numbers(frame[AS_OF_COLUMN])
    group_days, gi = np.unique(days, return_inverse=True)
    counts = np.bincount(gi * n_articles + article_codes, minlength=len(group_days) * n_articles)
    shares = counts.reshape(len(group_days), n_articles) / np.bincount(gi)[:, None]
    columns = {GROUP: days, SAMPLE_PROB: shares[gi, article_codes].astype(np.float32)}
    return columns, group_days, shares.astype(np.float32)


def activity_codes(vocab: FeatureVocab, catalog_frames: Iterable[pd.DataFrame]) -> np.ndarray:
    """[G, n rows, n activity features]: the activity codes of each snapshot's catalogue frame."""
    specs = [f for f in vocab.item_features if f in ACTIVITY_FEATURES]
    return np.stack([np.stack([vocab.encode_feature(s, f) for s in specs], axis=1) for f in catalog_frames])


def activity_positions(vocab: FeatureVocab) -> list[int]:
    return [j for j, f in enumerate(vocab.item_features) if f in ACTIVITY_FEATURES]


def grouped_chunks(groups: np.ndarray, rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices cut into chunks of about `rows` rows, each from one group, rows shuffled within a
    group and the chunks in random order."""
    chunks: list[np.ndarray] = []
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        if len(members):
            members = rng.permutation(members)
            chunks += np.array_split(members, max(1, round(len(members) / rows)))
    return [chunks[k] for k in rng.permutation(len(chunks))]


def split_block(block: Batch, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
    """A Ray Dataset block (one group, or several if Ray merged blocks) as shuffled one-group batches."""
    groups = block[GROUP].cpu().numpy()
    for idx in grouped_chunks(groups, batch_size, rng):
        take = torch.from_numpy(idx).to(block[GROUP].device)
        yield {k: v[take] for k, v in block.items()}


def lockstep(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Stop every rank when the first runs out: one-group batches leave ranks with different step
    counts, and DDP needs the same on all. A rank's leftover batches are drained, not trained on."""
    it = iter(batches)
    for batch in it:
        flag = torch.ones(1, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            for _ in it:
                pass
            return
        yield batch
    dist.all_reduce(torch.zeros(1, device=device), op=dist.ReduceOp.MIN)  # the others' last check
