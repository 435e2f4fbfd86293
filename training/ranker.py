"""The CatBoost ranker: learns to order retrieval candidates with customer and article features.

Training data: for customers who bought in a label window, the retrieval model's candidates
(features as of the window's start) labelled 1 if bought in the window. Candidates are the
model's own hard negatives, the ones the ranker must tell apart at serving time.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import RankerConfig
from training.ranking_features import RANKER_FEATURES, ranking_features


def candidates_long(
    customer_ids: list[str], cand_ids: list[list[str]], cand_scores: list[np.ndarray]
) -> pd.DataFrame:
    """One row per (customer, candidate) with the retrieval score and rank."""
    lens = [len(c) for c in cand_ids]
    return pd.DataFrame(
        {
            "customer_id": np.repeat(np.asarray(customer_ids, dtype=object), lens),
            "article_id": [a for c in cand_ids for a in c],
            "retrieval_score": np.concatenate(cand_scores) if cand_scores else np.array([]),
            "retrieval_rank": np.concatenate([np.arange(n) for n in lens]) if lens else np.array([]),
        }
    )


def join_features(
    cands: pd.DataFrame,
    customers_fg: pd.DataFrame,
    history_fg: pd.DataFrame,
    articles_fg: pd.DataFrame,
    channel: dict[str, int],
) -> pd.DataFrame:
    """Attach the feature-group columns `ranking_features` reads (batch path)."""
    hist_cols = ["customer_id", "n_purchases", "mean_price", "type_counts", "index_group_counts"]
    out = cands.merge(customers_fg[["customer_id", "age", "club_member_status", "FN"]], on="customer_id", how="left")
    out = out.merge(history_fg[hist_cols], on="customer_id", how="left")
    art_cols = ["article_id", "price", "sales_7d", "sales_total", "product_type_name", "index_group_name"]
    out = out.merge(articles_fg[art_cols], on="article_id", how="left")
    out["sales_channel_id"] = out["customer_id"].map(channel).fillna(1).astype("int64")
    return out


def fit_ranker(frame: pd.DataFrame, labels: np.ndarray, cfg: RankerConfig, progress: bool = True,
               train_dir: Path | None = None):
    """Fit CatBoostRanker (YetiRank) on groups that have at least one positive.

    CatBoost's own training logs go to `train_dir` (inside the run's workdir), or nowhere.
    """
    from catboost import CatBoostRanker, Pool

    frame = frame.assign(label=labels)
    has_pos = frame.groupby("customer_id")["label"].transform("max") > 0
    frame = frame[has_pos].sort_values("customer_id", kind="stable")
    if frame.empty:
        raise ValueError("ranker training data has no positive labels: the retrieval candidates never hit")
    x = ranking_features(frame)
    groups = pd.factorize(frame["customer_id"])[0]
    pool = Pool(x.to_numpy(np.float32), frame["label"].to_numpy(), group_id=groups, feature_names=RANKER_FEATURES)
    model = CatBoostRanker(loss_function="YetiRank", iterations=cfg.iterations, depth=cfg.depth,
                           learning_rate=cfg.learning_rate, random_seed=cfg.seed, thread_count=2,
                           verbose=max(1, cfg.iterations // 5) if progress else False,
                           allow_writing_files=train_dir is not None,
                           train_dir=str(train_dir) if train_dir is not None else None)
    if train_dir is not None:
        train_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model.fit(pool)
    if progress:
        print(f"[ranker] fit on {groups.max() + 1} groups x {len(frame)} rows in {time.time() - t0:.1f}s", flush=True)
    return model


def save_ranker(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_model(str(path))
    return path


def load_ranker(path: Path):
    from catboost import CatBoostRanker

    model = CatBoostRanker()
    model.load_model(str(path))
    return model


def score(model, frame: pd.DataFrame) -> np.ndarray:
    """Ranker scores for candidate rows (higher is better)."""
    if frame.empty:
        return np.zeros(0)
    return model.predict(ranking_features(frame).to_numpy(np.float32), thread_count=1)


def rank_lists(
    model,
    customer_ids: list[str],
    cand_ids: list[list[str]],
    cand_scores: list[np.ndarray],
    customers_fg: pd.DataFrame,
    history_fg: pd.DataFrame,
    articles_fg: pd.DataFrame,
    channel: dict[str, int],
) -> dict[str, list[str]]:
    """Each customer's candidates re-ordered by the ranker (batch path, for evaluation)."""
    frame = join_features(candidates_long(customer_ids, cand_ids, cand_scores), customers_fg, history_fg,
                          articles_fg, channel)
    frame["rank_score"] = score(model, frame)
    ordered = frame.sort_values(["customer_id", "rank_score"], ascending=[True, False], kind="stable")
    return ordered.groupby("customer_id")["article_id"].agg(list).to_dict()
