"""train_two_tower through a real Ray Train TorchTrainer (1 worker, then 2 with gloo)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.config import TwoTowerConfig
from feature_store.views import AS_OF_COLUMN
from training.features import ITEM_ATTRIBUTE_COLUMNS, encode_items, encode_queries
from training.two_tower.model import (
    ITEM_TOWER_FILE,
    QUERY_TOWER_FILE,
    VOCAB_FILE,
    load_item_tower,
    load_query_tower,
)
from training.two_tower.train import train_two_tower

pytestmark = pytest.mark.integration

EPOCHS = 2


def tiny_frames(n_rows: int = 600, n_customers: int = 60, n_articles: int = 40, seed: int = 0):
    """A small retrieval training frame in the feature-store contract's shape."""
    rng = np.random.default_rng(seed)
    articles = pd.DataFrame({"article_id": [f"{i:010d}" for i in range(n_articles)]})
    for col in ITEM_ATTRIBUTE_COLUMNS:
        articles[col] = [f"{col[:4]}{x}" for x in rng.integers(0, 4, n_articles)]
    articles["price"] = rng.uniform(0.005, 0.1, n_articles)
    customers = pd.DataFrame({
        "customer_id": [f"cust{i:04d}" for i in range(n_customers)],
        "age": rng.choice([19.0, 33.0, np.nan], n_customers),
        "club_member_status": rng.choice(["ACTIVE", None], n_customers),
        "fashion_news_frequency": rng.choice(["NONE", "Regularly"], n_customers),
        "FN": rng.choice([1.0, np.nan], n_customers),
        "Active": rng.choice([1.0, np.nan], n_customers),
    })
    cust, art = rng.integers(0, n_customers, n_rows), rng.integers(0, n_articles, n_rows)
    frame = customers.iloc[cust].reset_index(drop=True)
    frame["sales_channel_id"] = rng.integers(1, 3, n_rows)
    frame["month"] = rng.integers(1, 13, n_rows)
    ids = articles["article_id"].to_numpy()
    frame["history"] = [list(ids[rng.integers(0, n_articles, rng.integers(0, 4))]) for _ in range(n_rows)]
    frame = pd.concat([frame, articles.iloc[art].reset_index(drop=True)], axis=1)
    return frame, articles, customers


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def _check_exported_towers(result, out_dir: Path, frame: pd.DataFrame, articles: pd.DataFrame, cfg) -> None:
    """The exported towers load separately, as serving and the index build load them, and embed."""
    assert (result.query_tower.name, result.item_tower.name, result.vocab.name) == (
        QUERY_TOWER_FILE, ITEM_TOWER_FILE, VOCAB_FILE
    )
    assert all(p.is_file() and p.parent == out_dir for p in (result.query_tower, result.item_tower, result.vocab))
    query_tower, vocab = load_query_tower(out_dir)
    item_tower, _ = load_item_tower(out_dir)
    q = query_tower.embed(encode_queries(vocab, frame.iloc[:5], cfg.history_len))
    i = item_tower.embed(encode_items(vocab, articles))
    dim = cfg.ensemble * cfg.output_dim  # an ensemble concatenates its members' vectors
    assert q.shape == (5, dim) and i.shape == (len(articles), dim)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert np.isfinite(q).all() and np.isfinite(i).all()


def test_one_worker_trains_from_a_ray_dataset(ray_cluster, tmp_path: Path, capsys):
    """An ensemble of two: each member a Ray Train run of its own, exported as one pair of towers. The
    two members train at the same time (2 free CPUs, 1 each), and member 2 equals the same model trained
    alone (seed 1000, nothing else running): training side by side changes nothing. (Member 1 alone is
    the single model; the order members run in is a unit test's: `run_members`.)"""
    frame, articles, customers = tiny_frames()
    cfg = TwoTowerConfig(embedding_dim=8, output_dim=8, hidden_dims=[16], history_len=3, batch_size=64,
                         epochs=EPOCHS, num_workers=1, n_random_negatives=8, ensemble=2)
    out_dir = tmp_path / "model"
    result = train_two_tower(
        frame.iloc[:500], articles, customers, cfg, out_dir, tmp_path / "ray", val_frame=frame.iloc[500:]
    )
    assert ray_cluster.is_initialized()  # the caller's Ray is left alone
    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    assert all(np.isfinite(h["train_loss"]) and 0.0 <= h["val_recall"] <= 1.0 for h in result.history)
    assert all(h["examples_per_s"] > 0 for h in result.history)
    assert result.best_epoch in {h["epoch"] for h in result.history}
    assert result.history[result.best_epoch - 1]["val_recall"] == max(h["val_recall"] for h in result.history)
    assert len(result.member_histories) == len(result.member_best_epochs) == 2
    assert result.member_histories[0] == result.history and result.member_best_epochs[0] == result.best_epoch
    losses = [[h["train_loss"] for h in hist] for hist in result.member_histories]
    assert losses[0] != losses[1]  # another seed: another run
    _check_exported_towers(result, out_dir, frame, articles, cfg)
    assert "ensemble of 2 (seeds 0, 1000), 2 at a time" in capsys.readouterr().out

    alone_dir = tmp_path / "alone"
    alone = train_two_tower(frame.iloc[:500], articles, customers, cfg.model_copy(update={"ensemble": 1, "seed": 1000}),
                            alone_dir, tmp_path / "ray_alone", val_frame=frame.iloc[500:])
    assert [h["train_loss"] for h in alone.history] == losses[1]
    assert alone.best_epoch == result.member_best_epochs[1]
    (q_ens, vocab), (q_one, _) = load_query_tower(out_dir), load_query_tower(alone_dir)
    (i_ens, _), (i_one, _) = load_item_tower(out_dir), load_item_tower(alone_dir)
    queries, items = encode_queries(vocab, frame.iloc[:50], cfg.history_len), encode_items(vocab, articles)
    root2 = np.float32(np.sqrt(2))  # the ensemble's vector: [member 1, member 2] / sqrt(2)
    assert np.array_equal(q_ens.embed(queries)[:, cfg.output_dim:], q_one.embed(queries) / root2)
    assert np.array_equal(i_ens.embed(items)[:, cfg.output_dim:], i_one.embed(items) / root2)


def test_two_workers_survive_a_worker_failure_and_resume(ray_cluster, tmp_path: Path):
    """Rank 1 raises at the start of epoch 2 on the first attempt: the group restarts from the epoch-1
    checkpoint (not from scratch) and the run ends with one history entry per epoch."""
    frame, articles, customers = tiny_frames()
    cfg = TwoTowerConfig(embedding_dim=8, output_dim=8, hidden_dims=[16], history_len=3, batch_size=64,
                         epochs=3, num_workers=2, max_failures=1, early_stopping_patience=0, ensemble=1)
    out_dir = tmp_path / "model"
    result = train_two_tower(frame.iloc[:500], articles, customers, cfg, out_dir, tmp_path / "ray",
                             val_frame=frame.iloc[500:], run_name="resume_test", fail_once_at_epoch=2)
    marker = tmp_path / "ray" / "resume_test" / "injected_failure"
    assert marker.is_file(), "the failure hook did not fire"
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    failed_at = marker.stat().st_mtime
    # epoch 1 was trained before the failure and not again; epochs 2-3 after the restart
    assert result.history[0]["finished_at"] < failed_at < result.history[1]["finished_at"]
    _check_exported_towers(result, out_dir, frame, articles, cfg)


def test_two_workers_train_time_grouped_batches(ray_cluster, tmp_path: Path):
    """Rows featurised at four weekly snapshots (the article activity the item tower reads): every
    block and batch holds one snapshot, the two ranks stop together although their batch counts may
    differ, and the random negatives get their batch's snapshot's activity."""
    frame, articles, customers = tiny_frames()
    rng = np.random.default_rng(1)
    week = rng.integers(0, 4, len(frame))
    frame["t_dat"] = pd.Timestamp("2020-01-01") + pd.to_timedelta(7 * week + rng.integers(0, 7, len(frame)), unit="D")
    frame[AS_OF_COLUMN] = pd.Timestamp("2020-01-01") + pd.to_timedelta(7 * week, unit="D")
    frame["sales_7d"] = rng.integers(0, 20, len(frame))
    frame["first_seen"] = "2019-12-01"
    frame["sales_day"] = (frame[AS_OF_COLUMN] - pd.Timedelta(days=1)).dt.strftime("%Y-%m-%d")
    cfg = TwoTowerConfig(embedding_dim=8, output_dim=8, hidden_dims=[16], history_len=3, batch_size=32,
                         epochs=2, num_workers=2, n_random_negatives=4, early_stopping_patience=0, ensemble=1)
    out_dir = tmp_path / "model"
    result = train_two_tower(frame, articles, customers, cfg, out_dir, tmp_path / "ray")
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    _check_exported_towers(result, out_dir, frame, articles, cfg)
