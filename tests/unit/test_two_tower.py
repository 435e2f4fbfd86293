"""Two-tower features, model, loss and an in-process training run (no Ray cluster)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import TwoTowerConfig
from training.features import (
    HIST_LENGTHS,
    HIST_VALUES,
    ITEM_ATTRIBUTE_COLUMNS,
    ITEM_CATEGORICALS,
    QUERY_CATEGORICALS,
    FeatureVocab,
    encode_items,
    encode_queries,
    take_rows,
)
from training.two_tower.model import (
    ITEM_TOWER_FILE,
    QUERY_TOWER_FILE,
    VOCAB_FILE,
    TwoTower,
    in_batch_softmax_loss,
    load_item_tower,
    load_query_tower,
    save_towers,
)
from training.two_tower.train import (
    build_loop_config,
    encode_training_data,
    recall_at_k,
    save_encoded,
    train_local,
)

CFG = TwoTowerConfig(embedding_dim=16, output_dim=16, hidden_dims=[32], history_len=5, batch_size=64, epochs=2)


def synthetic(n_rows: int, n_customers: int = 200, n_articles: int = 80, groups: int = 4, seed: int = 0):
    """Customers of group g only buy articles of type g; the group is visible only through
    the customer id and the purchase history, so the model has to learn it."""
    rng = np.random.default_rng(seed)
    art_group = np.arange(n_articles) % groups
    articles = pd.DataFrame({"article_id": [f"{i:010d}" for i in range(n_articles)]})
    for col in ITEM_ATTRIBUTE_COLUMNS:
        articles[col] = [f"{col[:4]}{x}" for x in rng.integers(0, 6, n_articles)]
    articles["product_type_name"] = [f"type{g}" for g in art_group]
    articles["price"] = rng.uniform(0.005, 0.1, n_articles)
    cust_group = rng.integers(0, groups, n_customers)
    customers = pd.DataFrame({
        "customer_id": [f"cust{i:05d}" for i in range(n_customers)],
        "age": rng.choice([18.0, 27.0, 41.0, 65.0, np.nan], n_customers),
        "club_member_status": rng.choice(["ACTIVE", "PRE-CREATE", None], n_customers),
        "fashion_news_frequency": rng.choice(["NONE", "Regularly", None], n_customers),
        "FN": rng.choice([1.0, np.nan], n_customers),
        "Active": rng.choice([1.0, np.nan], n_customers),
    })
    by_group = [np.flatnonzero(art_group == g) for g in range(groups)]
    cust = rng.integers(0, n_customers, n_rows)
    art = np.array([rng.choice(by_group[cust_group[c]]) for c in cust])
    frame = customers.iloc[cust].reset_index(drop=True)
    frame["sales_channel_id"] = rng.integers(1, 3, n_rows)
    frame["month"] = rng.integers(1, 13, n_rows)
    ids = articles["article_id"].to_numpy()
    frame["history"] = [
        list(ids[rng.choice(by_group[cust_group[c]], rng.integers(0, 6))]) for c in cust
    ]
    frame = pd.concat([frame, articles.iloc[art].reset_index(drop=True)], axis=1)
    return frame, articles, customers


@pytest.fixture(scope="module")
def data():
    frame, articles, customers = synthetic(400)
    return frame, articles, customers, FeatureVocab.fit(articles, customers)


def _embed_both(model: TwoTower, vocab: FeatureVocab, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return (
        model.query_tower.embed(encode_queries(vocab, frame, CFG.history_len)),
        model.item_tower.embed(encode_items(vocab, frame)),
    )


def test_encode_and_forward_shapes_are_normalised(data):
    frame, _, _, vocab = data
    q_enc = encode_queries(vocab, frame, CFG.history_len)
    i_enc = encode_items(vocab, frame)
    assert set(QUERY_CATEGORICALS) <= set(q_enc) and set(ITEM_CATEGORICALS) == set(i_enc)
    assert all(q_enc[k].dtype == np.int64 and len(q_enc[k]) == len(frame) for k in QUERY_CATEGORICALS)
    assert q_enc[HIST_LENGTHS].dtype == np.int32 and q_enc[HIST_LENGTHS].max() <= CFG.history_len
    assert len(q_enc[HIST_VALUES]) == q_enc[HIST_LENGTHS].sum()
    model = TwoTower.from_vocab(vocab, CFG)
    q, i = model(*model.query_tower.inputs(q_enc), *model.item_tower.inputs(i_enc))
    assert q.shape == i.shape == (len(frame), CFG.output_dim)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(len(frame)))
    torch.testing.assert_close(i.norm(dim=1), torch.ones(len(frame)))
    emb = model.query_tower.embed(q_enc)
    assert emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_take_rows_gathers_jagged_history(data):
    frame, _, _, vocab = data
    enc = encode_queries(vocab, frame.iloc[:6], CFG.history_len)
    idx = np.array([4, 0, 4, 2])
    sub = take_rows(enc, idx)
    expected = encode_queries(vocab, frame.iloc[idx], CFG.history_len)
    for k in expected:
        np.testing.assert_array_equal(sub[k], expected[k])


def test_unknown_ids_map_to_row_zero(data):
    _, articles, _, vocab = data
    query = pd.DataFrame({
        "customer_id": ["never-seen"], "age": [np.nan], "club_member_status": ["NEW-STATUS"],
        "fashion_news_frequency": [None], "FN": [np.nan], "Active": [np.nan],
        "history": [["9999999999", articles["article_id"].iloc[0]]],
    })  # no sales_channel_id / month columns: unknown context
    q_enc = encode_queries(vocab, query, CFG.history_len)
    assert all(q_enc[k][0] == 0 for k in QUERY_CATEGORICALS)
    assert q_enc[HIST_VALUES].tolist() == [0, 1]
    item = articles.iloc[:1].assign(article_id="9999999999", product_type_name="brand-new", price=np.nan)
    i_enc = encode_items(vocab, item)
    assert i_enc["article_id"][0] == 0 and i_enc["product_type_name"][0] == 0 and i_enc["price_bucket"][0] == 0
    model = TwoTower.from_vocab(vocab, CFG)
    assert np.isfinite(model.query_tower.embed(q_enc)).all() and np.isfinite(model.item_tower.embed(i_enc)).all()


def test_vocab_round_trips_through_json(data, tmp_path: Path):
    frame, _, _, vocab = data
    loaded = FeatureVocab.load(vocab.save(tmp_path / "vocab.json"))
    assert loaded == vocab
    a, b = encode_queries(vocab, frame, 5), encode_queries(loaded, frame, 5)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_history_changes_query_embedding_through_shared_table(data):
    frame, articles, _, vocab = data
    model = TwoTower.from_vocab(vocab, CFG)
    assert model.query_tower.history_table.weight is model.item_tower.article_table.weight
    row = frame.iloc[[0]].copy()
    before = model.query_tower.embed(encode_queries(vocab, row, CFG.history_len))
    row["history"] = [[articles["article_id"].iloc[7], *row["history"].iloc[0]]]  # a new purchase
    after = model.query_tower.embed(encode_queries(vocab, row, CFG.history_len))
    assert not np.allclose(before, after, atol=1e-4)


def test_towers_saved_and_loaded_separately_match_the_model(data, tmp_path: Path):
    frame, _, _, vocab = data
    torch.manual_seed(1)
    model = TwoTower.from_vocab(vocab, CFG)
    with torch.no_grad():  # make the weights differ from a fresh init
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    paths = save_towers(model, vocab, CFG, tmp_path)
    assert {p.name for p in paths.values()} == {QUERY_TOWER_FILE, ITEM_TOWER_FILE, VOCAB_FILE}
    query_tower, q_vocab = load_query_tower(tmp_path)
    item_tower, i_vocab = load_item_tower(tmp_path)
    assert q_vocab == vocab == i_vocab
    q_ref, i_ref = _embed_both(model, vocab, frame)
    np.testing.assert_allclose(query_tower.embed(encode_queries(q_vocab, frame, CFG.history_len)), q_ref, atol=1e-6)
    np.testing.assert_allclose(item_tower.embed(encode_items(i_vocab, frame)), i_ref, atol=1e-6)


def test_loss_removes_accidental_hits():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    i = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    plain = torch.nn.functional.cross_entropy(q @ i.T / 0.1, torch.arange(6))
    unique = in_batch_softmax_loss(q, i, torch.arange(6), 0.1)
    torch.testing.assert_close(unique, plain)  # no duplicates: the ordinary in-batch softmax
    dup_ids = torch.tensor([3, 5, 3, 1, 5, 3])
    masked = in_batch_softmax_loss(q, i, dup_ids, 0.1)
    assert torch.isfinite(masked) and not torch.isclose(masked, plain)
    assert masked < plain  # removing negatives can only lower each row's loss
    log_q = torch.log(torch.tensor([0.5, 0.2, 0.5, 0.1, 0.2, 0.5]))
    corrected = in_batch_softmax_loss(q, i, dup_ids, 0.1, log_q=log_q)
    assert torch.isfinite(corrected) and not torch.isclose(corrected, masked)
    qg = q.clone().requires_grad_()
    in_batch_softmax_loss(qg, i, torch.zeros(6, dtype=torch.long), 0.1).backward()  # all duplicates
    assert torch.isfinite(qg.grad).all()


def test_training_learns_group_structure(tmp_path: Path):
    frame, articles, customers = synthetic(2500, seed=3)
    train, val = frame.iloc[:2000], frame.iloc[2000:]
    vocab = FeatureVocab.fit(articles, customers)
    cfg = CFG.model_copy(update={"epochs": 10})  # 32 steps per epoch -> 320 steps
    groups, extra = encode_training_data(vocab, train, articles, cfg.history_len, val)
    path = save_encoded(tmp_path / "enc.npz", groups, extra)
    loop_config = build_loop_config(vocab, cfg, path, val_k=10, progress=False, threads=1)
    model, history = train_local(loop_config)
    assert [h["epoch"] for h in history] == list(range(1, 11))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    recall = recall_at_k(
        model.query_tower, model.item_tower, groups["val_q"], extra["val_target"], groups["catalog"], 10
    )
    assert recall == pytest.approx(history[-1]["val_recall@10"])
    random_recall = 10 / len(articles)  # 0.125; a perfect group model reaches 10 / 20 = 0.5
    assert recall > 3 * random_recall, history
