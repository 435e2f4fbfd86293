"""Two-tower features, model, loss and an in-process training run (no Ray cluster)."""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.config import TwoTowerConfig
from feature_store.transforms import article_features, with_activity
from feature_store.views import AS_OF_COLUMN, retrieval_frame
from training.features import (
    ACTIVITY_FEATURES,
    HIST_LENGTHS,
    HIST_VALUES,
    HM_ITEM_FEATURES_V1,
    I_CAT,
    ITEM_ATTRIBUTE_COLUMNS,
    ITEM_CATEGORICALS,
    Q_CAT,
    Q_DENSE,
    Q_HIST,
    Q_HIST_LEN,
    QUERY_CATEGORICALS,
    FeatureVocab,
    as_columns,
    encode_items,
    encode_queries,
    fixed_width_items,
    fixed_width_queries,
    from_fixed_width,
    take_rows,
)
from training.two_tower.groups import GROUP, SAMPLE_PROB
from training.two_tower.model import (
    HIST_FEATURE,
    ITEM_TOWER_FILE,
    QUERY_TOWER_FILE,
    VOCAB_FILE,
    EnsembleTower,
    ItemTower,
    QueryTower,
    TwoTower,
    candidate_log_q,
    in_batch_softmax_loss,
    load_item_tower,
    load_query_tower,
    save_towers,
)
from training.two_tower.train import (
    RunContext,
    Trainable,
    best_epoch,
    build_loop_config,
    encode_training_data,
    fit_vocab,
    local_batches,
    member_configs,
    members_at_once,
    progress_line,
    recall_at_k,
    run_members,
    run_training,
    should_stop,
    single_process_group,
    split_validation,
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


def test_plain_inference_path_equals_the_torchrec_forward(data):
    """embed() on CPU skips KeyedJaggedTensor (forward_plain); it must give the EBC forward's vectors,
    for customers with and without history and for chunked batches."""
    frame, _, _, vocab = data
    model = TwoTower.from_vocab(vocab, CFG).eval()
    with torch.no_grad():  # train the tables away from their init so pooling differences would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    q_enc = encode_queries(vocab, frame, CFG.history_len)
    assert (q_enc[HIST_LENGTHS] == 0).any() and (q_enc[HIST_LENGTHS] > 1).any()
    i_enc = encode_items(vocab, frame)
    with torch.no_grad():
        q_ref = model.query_tower(*model.query_tower.inputs(q_enc)).numpy()
        i_ref = model.item_tower(*model.item_tower.inputs(i_enc)).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(model.query_tower.forward_plain(q_enc).numpy(), q_ref, atol=1e-6)
        np.testing.assert_allclose(model.item_tower.forward_plain(i_enc).numpy(), i_ref, atol=1e-6)
    np.testing.assert_allclose(model.query_tower.embed(q_enc), q_ref, atol=1e-6)
    np.testing.assert_allclose(model.query_tower.embed(q_enc, chunk=7), q_ref, atol=1e-6)
    np.testing.assert_allclose(model.item_tower.embed(i_enc), i_ref, atol=1e-6)
    one = take_rows(q_enc, np.array([3]))
    np.testing.assert_allclose(model.query_tower.embed(one)[0], q_ref[3], atol=1e-6)
    assert not model.training
    # the numpy forward (small batches: serving's queries) gives the same vectors, empty histories too
    np.testing.assert_allclose(model.query_tower.forward_numpy(q_enc), q_ref, atol=1e-6)
    np.testing.assert_allclose(model.item_tower.forward_numpy(i_enc), i_ref, atol=1e-6)
    for i in (int(np.flatnonzero(q_enc[HIST_LENGTHS] == 0)[0]), int(np.flatnonzero(q_enc[HIST_LENGTHS] > 1)[0])):
        np.testing.assert_allclose(model.query_tower.embed(take_rows(q_enc, np.array([i])))[0], q_ref[i], atol=1e-6)
    with torch.no_grad():  # the numpy views follow in-place updates (an optimizer step, load_state_dict)
        for p in model.parameters():
            p.mul_(0.5).add_(0.01)
        moved = model.query_tower.forward_plain(q_enc).numpy()
    np.testing.assert_allclose(model.query_tower.forward_numpy(q_enc), moved, atol=1e-6)
    model.query_tower.double().float()  # new parameter tensors: the views are made again
    with torch.no_grad():
        model.query_tower.ebc.embedding_bags[f"t_{HIST_FEATURE}"].weight.add_(0.1)
        moved = model.query_tower.forward_plain(q_enc).numpy()
    np.testing.assert_allclose(model.query_tower.forward_numpy(q_enc), moved, atol=1e-6)
    calls = []
    model.query_tower.forward_plain = lambda enc: calls.append(len(enc[HIST_LENGTHS])) or torch.zeros(0)
    model.query_tower.embed(one)  # one row: numpy, no torch forward
    assert calls == []


def test_column_lists_encode_like_a_dataframe(data):
    """Serving encodes a request's rows from column lists (as_columns), not a DataFrame: same codes,
    for missing values (None, NaN), unknown strings and ids, and a missing optional column."""
    frame, _, _, vocab = data
    rows = frame.head(40).to_dict("records")
    rows[0] |= {"age": None, "club_member_status": "NEVER-SEEN", "customer_id": "unknown", "history": []}
    rows[1] |= {"month": float("nan"), "sales_channel_id": None, "FN": "1", "history": ["no-such-article"]}
    rows = [{k: v for k, v in r.items() if k != "Active"} for r in rows]  # an absent column: all unknown
    ref = encode_queries(vocab, pd.DataFrame(rows), CFG.history_len)
    got = encode_queries(vocab, as_columns(rows), CFG.history_len)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert got["customer_id"][0] == 0 and got[HIST_LENGTHS][0] == 0


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


def test_small_lookups_give_the_codes_of_the_vectorised_path(data):
    """Serving looks up a request's few values with a dict; batches use pandas: same codes."""
    vocab = data[3]
    for feature, known in vocab.strings.items():
        k = min(20, len(known))
        values = [*known[:k], "never-seen", None, np.nan, pd.NA, 7]
        small = vocab.lookup(feature, values)
        large = vocab.lookup(feature, values * 20)[: len(values)]  # over the small-input size
        assert small.tolist() == large.tolist()
        assert small[:k].tolist() == list(range(1, k + 1)) and small[k:k + 4].tolist() == [0] * 4


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


def _perturbed(vocab: FeatureVocab, seed: int) -> TwoTower:
    torch.manual_seed(seed)
    model = TwoTower.from_vocab(vocab, CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_an_ensemble_saves_loads_and_scores_the_members_mean(data, tmp_path: Path):
    """Two models saved as one: the loaded towers concatenate each member's unit vector scaled by
    1/sqrt(2), so vectors stay unit-norm and a query-item dot product is the mean of the members' scores."""
    frame, articles, _, vocab = data
    members = [_perturbed(vocab, 1), _perturbed(vocab, 2)]
    paths = save_towers(members, vocab, CFG, tmp_path)
    assert {p.name for p in paths.values()} == {QUERY_TOWER_FILE, ITEM_TOWER_FILE, VOCAB_FILE}
    query_tower, q_vocab = load_query_tower(tmp_path)
    item_tower, i_vocab = load_item_tower(tmp_path)
    assert isinstance(query_tower, EnsembleTower) and isinstance(item_tower, EnsembleTower)
    assert q_vocab == vocab == i_vocab
    assert query_tower.init_kwargs["output_dim"] == item_tower.init_kwargs["output_dim"] == 2 * CFG.output_dim
    q = query_tower.embed(encode_queries(vocab, frame, CFG.history_len))
    i = item_tower.embed(encode_items(vocab, articles))
    assert q.dtype == i.dtype == np.float32
    assert q.shape == (len(frame), 2 * CFG.output_dim) and i.shape == (len(articles), 2 * CFG.output_dim)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, atol=1e-5)
    scores = []
    for m in members:
        qm = m.query_tower.embed(encode_queries(vocab, frame, CFG.history_len))
        im = m.item_tower.embed(encode_items(vocab, articles))
        scores.append(qm @ im.T)
    np.testing.assert_allclose(q @ i.T, (scores[0] + scores[1]) / 2, atol=1e-5)
    assert not np.allclose(scores[0], scores[1])  # the members differ: the mean is not one of them
    # one-row batches (serving) give the same vectors as the full batch
    one = query_tower.embed(encode_queries(vocab, frame.iloc[:1], CFG.history_len))
    np.testing.assert_allclose(one, q[:1], atol=1e-6)


def test_a_one_model_sequence_saves_in_the_single_model_form(data, tmp_path: Path):
    frame, _, _, vocab = data
    model = _perturbed(vocab, 3)
    save_towers([model], vocab, CFG, tmp_path)
    query_tower, _ = load_query_tower(tmp_path)
    item_tower, _ = load_item_tower(tmp_path)
    assert isinstance(query_tower, QueryTower) and isinstance(item_tower, ItemTower)
    q_ref, i_ref = _embed_both(model, vocab, frame)
    np.testing.assert_allclose(query_tower.embed(encode_queries(vocab, frame, CFG.history_len)), q_ref, atol=1e-6)
    np.testing.assert_allclose(item_tower.embed(encode_items(vocab, frame)), i_ref, atol=1e-6)


def test_ensemble_members_differ_only_by_seed():
    cfg = CFG.model_copy(update={"ensemble": 3, "seed": 7})
    members = member_configs(cfg)
    assert [m.seed for m in members] == [7, 1007, 2007]
    assert all(m.ensemble == 1 for m in members)
    strip = {"seed", "ensemble"}
    assert all(m.model_dump(exclude=strip) == cfg.model_dump(exclude=strip) for m in members)
    single = CFG.model_copy(update={"ensemble": 1})
    assert member_configs(single) == [single]


def test_members_at_once_fit_the_free_resources_and_the_cap():
    two = CFG.model_copy(update={"ensemble": 2, "num_workers": 1})
    assert members_at_once(two, 1.0, False, {"CPU": 2.0}) == 2
    assert members_at_once(two, 1.0, False, {"CPU": 1.0}) == 1  # something else holds a CPU
    assert members_at_once(two, 0.5, False, {"CPU": 0.99}) == 1
    assert members_at_once(two.model_copy(update={"num_workers": 2}), 1.0, False, {"CPU": 2.0}) == 1
    assert members_at_once(two, 1.0, False, {}) == 1  # never fewer than one
    four = two.model_copy(update={"ensemble": 4})
    assert members_at_once(four, 1.0, False, {"CPU": 16.0}) == 4  # never more than the members
    assert members_at_once(four.model_copy(update={"parallel_members": 1}), 1.0, False, {"CPU": 16.0}) == 1
    assert members_at_once(four, 1.0, True, {"CPU": 16.0, "GPU": 2.0}) == 2  # one GPU per worker


def test_members_at_once_fit_the_free_memory_too():
    """A machine with many CPUs and little memory trains fewer members at once, not all of them."""
    from types import SimpleNamespace

    from training.two_tower.train import TABLE_COPIES, WORKER_BASE_BYTES, member_bytes

    # H&M's full size: 1.37M customers, 105k articles (the history table too), a few small attributes
    vocab = SimpleNamespace(query_cardinalities=lambda: {"customer_id": 1_370_000, "age_group": 8},
                            item_cardinalities=lambda: {"article_id": 105_000, "product_type_no": 132},
                            n_articles=105_000)
    four = CFG.model_copy(update={"ensemble": 4, "num_workers": 2, "embedding_dim": 32})
    rows = 1_370_000 + 8 + 105_000 + 105_000 + 132
    one = member_bytes(vocab, four, use_gpu=False)
    assert one == 2 * (WORKER_BASE_BYTES + TABLE_COPIES * 4 * rows * 32)  # about 3.8 GiB
    assert member_bytes(vocab, four, use_gpu=True) == 2 * WORKER_BASE_BYTES  # the tables on the GPUs
    cpus = {"CPU": 64.0}
    assert members_at_once(four, 1.0, False, cpus | {"memory": 100 * 2**30}, one) == 4  # CPUs and memory hold all
    assert members_at_once(four, 1.0, False, cpus | {"memory": 9 * 2**30}, one) == 2
    assert members_at_once(four, 1.0, False, cpus | {"memory": 2**30}, one) == 1  # never fewer than one
    assert members_at_once(four, 1.0, False, cpus, one) == 4  # a cluster reporting no memory: CPUs decide


def test_run_members_keeps_member_order_and_raises_the_first_failure():
    started: list[int] = []
    both = threading.Barrier(2, timeout=10)

    def fit(m: int) -> str:
        started.append(m)
        if m < 2:
            both.wait()  # members 0 and 1 run at the same time, or this times out
        time.sleep(0.01 * (3 - m))
        return f"member {m}"

    assert run_members(fit, 3, parallel=2) == ["member 0", "member 1", "member 2"]
    assert sorted(started) == [0, 1, 2]

    started.clear()

    def failing(m: int) -> str:
        started.append(m)
        if m in (1, 2):
            raise ValueError(f"member {m} failed")
        time.sleep(0.2)
        return "ok"

    with pytest.raises(ValueError, match="member 1 failed"):
        run_members(failing, 4, parallel=2)
    assert 3 not in started  # no member starts after a failure
    assert run_members(lambda m: m * m, 3, parallel=1) == [0, 1, 4]


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


def test_fixed_width_columns_round_trip_to_the_encoded_form(data):
    frame, _, _, vocab = data
    q_enc, i_enc = encode_queries(vocab, frame, CFG.history_len), encode_items(vocab, frame)
    cols = {**fixed_width_queries(q_enc, CFG.history_len), **fixed_width_items(i_enc)}
    n = len(frame)
    assert cols[Q_CAT].shape == (n, len(QUERY_CATEGORICALS)) and cols[I_CAT].shape == (n, len(ITEM_CATEGORICALS))
    assert cols[Q_HIST].shape == (n, CFG.history_len) and cols[Q_DENSE].shape == (n, 2)
    back = from_fixed_width(cols)
    for k, v in {**q_enc, **i_enc}.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_batch_inputs_give_the_same_embeddings_as_encoded_inputs(data):
    frame, _, _, vocab = data
    model = TwoTower.from_vocab(vocab, CFG).eval()
    q_enc, i_enc = encode_queries(vocab, frame, CFG.history_len), encode_items(vocab, frame)
    cols = {k: torch.from_numpy(v) for k, v in {**fixed_width_queries(q_enc, CFG.history_len),
                                                 **fixed_width_items(i_enc)}.items()}
    with torch.no_grad():
        q_ref, i_ref = model(*model.query_tower.inputs(q_enc), *model.item_tower.inputs(i_enc))
        q, i = model(*model.query_tower.batch_inputs(cols[Q_CAT], cols[Q_HIST], cols[Q_HIST_LEN], cols[Q_DENSE]),
                     *model.item_tower.batch_inputs(cols[I_CAT]))
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(i, i_ref)


def test_loss_with_extra_random_negatives():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    cand = torch.nn.functional.normalize(torch.randn(7, 8), dim=1)  # 4 positives + 3 random negatives
    ids = torch.tensor([10, 11, 12, 13, 20, 21, 22])
    only_batch = in_batch_softmax_loss(q, cand[:4], ids[:4], 0.1)
    with_neg = in_batch_softmax_loss(q, cand, ids, 0.1)
    assert with_neg > only_batch  # more negatives: a larger softmax denominator
    expected = torch.nn.functional.cross_entropy(q @ cand.T / 0.1, torch.arange(4))
    torch.testing.assert_close(with_neg, expected)
    # a random negative that is row 0's own article is an accidental hit: masked for row 0 only
    hit_ids = torch.tensor([10, 11, 12, 13, 10, 21, 22])
    masked = in_batch_softmax_loss(q, cand, hit_ids, 0.1)
    logits = q @ cand.T / 0.1
    logits[0, 4] = torch.finfo(logits.dtype).min
    torch.testing.assert_close(masked, torch.nn.functional.cross_entropy(logits, torch.arange(4)))


def test_candidate_log_q_mixes_in_batch_and_uniform_sampling():
    probs = torch.tensor([0.0, 0.5, 0.3, 0.2])
    ids = torch.tensor([1, 2, 3, 1])
    plain = candidate_log_q(probs, ids, batch_size=3)
    torch.testing.assert_close(plain, torch.log(probs[ids]) + np.log(3.0))  # plain logQ + a constant
    mixed = candidate_log_q(probs, ids, batch_size=3, n_random=2, n_catalog=4)
    torch.testing.assert_close(mixed, torch.log(3 * probs[ids] + 0.5))


def test_early_stopping_rules():
    hist = [{"epoch": e, "val_recall": r} for e, r in enumerate([0.1, 0.3, 0.3, 0.2, 0.25], start=1)]
    assert best_epoch(hist) == 2  # the first of equal bests
    assert not should_stop(hist[:3], patience=2)
    assert should_stop(hist[:4], patience=2) and should_stop(hist, patience=3)
    assert not should_stop(hist, patience=0)  # 0 = off
    assert best_epoch([{"epoch": 1, "train_loss": 1.0}]) is None and not should_stop([{"epoch": 1}], 1)
    line = progress_line({"epoch": 2, "train_loss": 3.25, "examples_per_s": 12345.6, "val_recall": 0.25,
                          "epoch_s": 1.5}, epochs=10, val_k=100)
    assert line == "[two_tower] epoch 2/10 loss 3.2500 12,346 examples/s recall@100 0.2500 1.5s"


def test_validation_holdout_by_days():
    days = pd.to_datetime(["2020-01-01", "2020-01-05", "2020-01-09", "2020-01-10"])
    frame = pd.DataFrame({"t_dat": days, "x": range(4)})
    train, val = split_validation(frame, None, CFG.model_copy(update={"val_days": 2}))
    assert list(train["x"]) == [0, 1] and list(val["x"]) == [2, 3]  # the last 2 days: 9th and 10th
    same, none = split_validation(frame, None, CFG)  # val_days 0: no validation
    assert same is frame and none is None
    with pytest.raises(ValueError, match="leaves no training or no validation rows"):
        split_validation(frame, None, CFG.model_copy(update={"val_days": 30}))
    with pytest.raises(ValueError, match="needs a 't_dat' column"):
        split_validation(frame.drop(columns="t_dat"), None, CFG.model_copy(update={"val_days": 2}))


def test_training_learns_group_structure_and_stops_early():
    frame, articles, customers = synthetic(2500, seed=3)
    train, val = frame.iloc[:2000], frame.iloc[2000:]
    vocab = FeatureVocab.fit(articles, customers)
    # 32 steps per epoch; patience 2 stops once recall plateaus (it must still learn first)
    cfg = CFG.model_copy(update={"epochs": 15, "val_k": 10, "early_stopping_patience": 2, "n_random_negatives": 16})
    columns, side = encode_training_data(vocab, train, articles, cfg, val)
    model, history = train_local(build_loop_config(vocab, cfg, progress=False, threads=1), columns, side)
    epochs = [h["epoch"] for h in history]
    assert epochs == list(range(1, len(history) + 1))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(h["examples_per_s"] > 0 for h in history)
    if len(history) < cfg.epochs:  # stopped early: the last `patience` epochs did not beat the best
        assert len(history) - best_epoch(history) == cfg.early_stopping_patience
    recall = recall_at_k(model.query_tower, model.item_tower, side.val_q, side.val_target, side.catalog, 10)
    assert recall == pytest.approx(history[-1]["val_recall"])
    random_recall = 10 / len(articles)  # 0.125; a perfect group model reaches 10 / 20 = 0.5
    assert max(h["val_recall"] for h in history) > 3 * random_recall, history


def _saved(blob: dict) -> dict:
    """What a checkpoint file holds: the blob as torch.save wrote it at report time."""
    buf = io.BytesIO()
    torch.save(blob, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resumed_run_matches_an_uninterrupted_one(data):
    """Model, optimizer and history from an epoch-2 checkpoint: epochs 3-4 come out bit-identical."""
    frame, articles, _, vocab = data
    cfg = CFG.model_copy(update={"epochs": 4, "early_stopping_patience": 0})
    columns, side = encode_training_data(vocab, frame, articles, cfg)
    config = build_loop_config(vocab, cfg, progress=False, threads=1)
    blobs: list[dict] = []
    straight, straight_hist = run_training(config, local_batches(columns, cfg.batch_size, cfg.seed), side,
                                           RunContext(report=lambda m, blob: blobs.append(_saved(blob))))
    assert len(blobs) == 4 and blobs[1]["optimizer"]["state"]  # AdamW moments are in the checkpoint
    resumed, hist = run_training(config, local_batches(columns, cfg.batch_size, cfg.seed), side,
                                 RunContext(resume=blobs[1]))
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in straight_hist]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_weight_averaging_exports_the_mean_of_the_last_epochs(data):
    """swa_epochs=2 of 3: the last checkpoint and the returned model hold the mean of epochs 2 and 3's
    weights (which the same run without averaging reports); earlier checkpoints the raw weights,
    with the running average that a resumed run continues from."""
    frame, articles, _, vocab = data
    base = CFG.model_copy(update={"epochs": 3, "early_stopping_patience": 0})
    columns, side = encode_training_data(vocab, frame, articles, base)

    def run(cfg: TwoTowerConfig) -> tuple[torch.nn.Module, list[dict]]:
        blobs: list[dict] = []
        model, _ = run_training(build_loop_config(vocab, cfg, progress=False, threads=1),
                                local_batches(columns, cfg.batch_size, cfg.seed), side,
                                RunContext(report=lambda m, blob: blobs.append(_saved(blob))))
        return model, blobs

    _, raw = run(base.model_copy(update={"swa_epochs": 0}))
    model, avg = run(base.model_copy(update={"swa_epochs": 2}))
    assert raw[-1]["swa"] is None and avg[0]["swa"] is None and avg[1]["swa"]["count"] == 1
    for k, v in avg[1]["state_dict"].items():
        torch.testing.assert_close(v, raw[1]["state_dict"][k], msg=k)  # inside the window, before its end
    last, live = avg[-1]["state_dict"], model.state_dict()
    floats = [k for k, v in last.items() if v.is_floating_point()]
    assert floats and avg[-1]["swa"]["count"] == 2
    for k in floats:
        torch.testing.assert_close(last[k], (raw[1]["state_dict"][k] + raw[2]["state_dict"][k]) / 2, msg=k)
        torch.testing.assert_close(live[k], last[k], msg=k)
    assert any(not torch.equal(last[k], raw[2]["state_dict"][k]) for k in floats)


def test_table_wise_dmp_trains_and_checkpoints_full_tables(data):
    """The sharded path: state scattered into TorchRec's table-wise shards and gathered back intact,
    loss falls, and the checkpoint (untied tables) rebuilds a plain TwoTower for export."""
    frame, articles, _, vocab = data
    cfg = CFG.model_copy(update={"epochs": 3, "sharding": "table_wise", "early_stopping_patience": 0})
    columns, side = encode_training_data(vocab, frame, articles, cfg, frame.iloc[:50])
    with single_process_group():
        torch.manual_seed(0)
        model = TwoTower.from_vocab(vocab, cfg, tie_history=False)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainable = Trainable(model, cfg, "table_wise", torch.device("cpu"), distributed=True)
        assert "t_article_id:table_wise@0" in trainable.describe()
        gathered = trainable.full_state()
        assert gathered.keys() == init.keys()
        for k, v in init.items():
            torch.testing.assert_close(gathered[k], v, msg=k)
        blobs: list[dict] = []
        run = RunContext(distributed=True, report=lambda m, blob: blobs.append(_saved(blob)))
        _, history = run_training(build_loop_config(vocab, cfg, progress=False, threads=1),
                                  local_batches(columns, cfg.batch_size, cfg.seed), side, run)
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["train_loss"] < history[0]["train_loss"]
    blob = blobs[-1]
    assert blob["tie_history"] is False and set(blob["optimizer"]) == {"fused", "dense"}
    exported = TwoTower(blob["query_kwargs"], blob["item_kwargs"], tie_history=False)
    exported.load_state_dict(blob["state_dict"])
    hist_w = exported.query_tower.history_table.weight
    assert not torch.equal(hist_w, init["query_tower.ebc.embedding_bags.t_hist_article_id.weight"])  # trained
    q, i = _embed_both(exported, vocab, frame)
    assert np.isfinite(q).all() and np.isfinite(i).all()


def test_the_planners_own_plan_trains_on_cpu_and_exports(data):
    """sharding "planner" (what "auto" runs on GPU, here on gloo): the planner mixes table-wise and
    data-parallel tables; the loss falls and the checkpoint rebuilds a plain TwoTower."""
    frame, articles, _, vocab = data
    cfg = CFG.model_copy(update={"epochs": 3, "sharding": "planner", "early_stopping_patience": 0})
    columns, side = encode_training_data(vocab, frame, articles, cfg)
    with single_process_group():
        trainable = Trainable(TwoTower.from_vocab(vocab, cfg, tie_history=False), cfg, "planner",
                              torch.device("cpu"), distributed=True)
        placed = trainable.describe()
        blobs: list[dict] = []
        _, history = run_training(build_loop_config(vocab, cfg, progress=False, threads=1),
                                  local_batches(columns, cfg.batch_size, cfg.seed), side,
                                  RunContext(distributed=True, report=lambda m, blob: blobs.append(_saved(blob))))
    assert placed.startswith("DistributedModelParallel (planner)") and "table_wise@0" in placed, placed
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    exported = TwoTower(blobs[-1]["query_kwargs"], blobs[-1]["item_kwargs"], tie_history=False)
    exported.load_state_dict(blobs[-1]["state_dict"])
    q, i = _embed_both(exported, vocab, frame)
    assert np.isfinite(q).all() and np.isfinite(i).all()


def test_table_wise_dmp_resumes_with_its_fused_optimizer_state(data):
    """Sharded tables' fused Adagrad sums and the dense AdamW moments travel in the checkpoint: a
    run resumed from epoch 2 trains epochs 3-4 exactly as the uninterrupted run did."""
    frame, articles, _, vocab = data
    cfg = CFG.model_copy(update={"epochs": 4, "sharding": "table_wise", "early_stopping_patience": 0})
    columns, side = encode_training_data(vocab, frame, articles, cfg)
    config = build_loop_config(vocab, cfg, progress=False, threads=1)
    with single_process_group():
        blobs: list[dict] = []
        straight, straight_hist = run_training(config, local_batches(columns, cfg.batch_size, cfg.seed), side,
                                               RunContext(distributed=True, report=lambda m, b: blobs.append(_saved(b))))
        fused = blobs[1]["optimizer"]["fused"]["state"]
        sums = [t for per_param in fused.values() for t in per_param.values()]
        assert sums and all(isinstance(t, torch.Tensor) for t in sums) and any(bool(t.abs().sum()) for t in sums)
        assert blobs[1]["optimizer"]["dense"]["state"]  # AdamW moments of the MLPs
        resumed, hist = run_training(config, local_batches(columns, cfg.batch_size, cfg.seed), side,
                                     RunContext(distributed=True, resume=blobs[1]))
        fresh, fresh_hist = run_training(config, local_batches(columns, cfg.batch_size, cfg.seed), side,
                                         RunContext(distributed=True, resume={**blobs[1], "optimizer": None}))
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in straight_hist]
    assert [h["train_loss"] for h in fresh_hist][2:] != [h["train_loss"] for h in straight_hist][2:]  # state matters


def _two_rank_resume(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: train 3 epochs table-wise, then resume from rank 0's epoch-1 checkpoint."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    frame, articles, customers = synthetic(400)
    vocab = FeatureVocab.fit(articles, customers)
    cfg = CFG.model_copy(update={"epochs": 3, "sharding": "table_wise", "early_stopping_patience": 0})
    columns, side = encode_training_data(vocab, frame, articles, cfg)
    config = build_loop_config(vocab, cfg, progress=False, threads=1)
    mine = {k: v[rank::2] for k, v in columns.items()}
    blobs: list[dict] = []
    _, straight = run_training(config, local_batches(mine, cfg.batch_size, cfg.seed), side,
                               RunContext(rank=rank, world_size=2, distributed=True,
                                          report=lambda m, b: blobs.append(_saved(b) if b else b)))
    shared = [blobs[0] if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)  # as Ray Train hands the checkpoint to every worker
    _, resumed = run_training(config, local_batches(mine, cfg.batch_size, cfg.seed), side,
                              RunContext(rank=rank, world_size=2, distributed=True, resume=shared[0]))
    if rank == 0:
        torch.save({"straight": [h["train_loss"] for h in straight], "resumed": [h["train_loss"] for h in resumed],
                    "tables": sorted(blobs[0]["optimizer"]["fused"]["state"])}, out)
    dist.destroy_process_group()


def test_two_ranks_resume_table_wise_with_every_tables_optimizer_state(tmp_path):
    """Each rank holds only its own tables' fused state: rank 0's checkpoint gathers all of them, and
    both ranks resume bit-identically."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_resume, args=(port, str(tmp_path / "out.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    model = TwoTower.from_vocab(FeatureVocab.fit(*synthetic(400)[1:]), CFG, tie_history=False)
    assert got["tables"] == sorted(k for k in model.state_dict() if ".ebc." in k)  # both ranks' tables
    assert got["resumed"] == got["straight"]


def test_table_wise_needs_a_process_group(data):
    frame, articles, _, vocab = data
    cfg = CFG.model_copy(update={"sharding": "table_wise"})
    columns, side = encode_training_data(vocab, frame, articles, cfg)
    with pytest.raises(ValueError, match="needs a torch.distributed process group"):
        train_local(build_loop_config(vocab, cfg, progress=False), columns, side)


# -- article activity and time-grouped training ---------------------------------------------------------
def test_activity_features_encode_from_the_articles_group_columns(data):
    _, _, _, vocab = data
    frame = pd.DataFrame({"article_id": ["x"] * 4, "sales_7d": [0, 1, 37, None],
                          "first_seen": ["2020-01-01", None, "2020-01-20", None],
                          "sales_day": ["2020-01-21", "2020-01-21", "2020-01-21", None]})
    enc = encode_items(vocab, frame)
    assert enc["sales_7d_bucket"].tolist() == [1, 2, 7, 0]  # 0 | 1 | 32-63 | unknown
    assert enc["days_on_sale_bucket"].tolist() == [6, 1, 2, 0]  # 21-27 days | not sold yet | 1-2 | unknown
    assert vocab.reads_activity and vocab.cardinality("sales_7d_bucket") == enc["sales_7d_bucket"].max() + 8


def test_a_format_1_vocab_keeps_the_item_features_of_its_time(data, tmp_path: Path):
    _, _, _, vocab = data
    path = vocab.save(tmp_path / "vocab.json")
    raw = json.loads(path.read_text())
    for k in ("query_features", "item_features"):
        del raw[k]
    path.write_text(json.dumps({**raw, "format": 1}))
    assert FeatureVocab.load(path).item_features == HM_ITEM_FEATURES_V1


def hot_cohorts(weeks: int = 8, per_cohort: int = 8, buys: int = 300, seed: int = 0):
    """Articles arrive in weekly cohorts; a week's buyers mostly (60%) pick last week's arrivals, the
    rest this week's or any older one. Which articles are hot changes every week and shows only in
    their recent sales."""
    rng = np.random.default_rng(seed)
    n_art = weeks * per_cohort
    articles = pd.DataFrame({"article_id": [f"{i:010d}" for i in range(n_art)]})
    for col in ITEM_ATTRIBUTE_COLUMNS:
        articles[col] = "x"
    articles["prod_name"], articles["detail_desc"], articles["price"] = "x", "x", 0.01
    customers = pd.DataFrame({"customer_id": [f"c{i:03d}" for i in range(100)], "age": 30.0,
                              "club_member_status": "ACTIVE", "fashion_news_frequency": None, "FN": 1.0, "Active": 1.0})
    rows = []
    for w in range(weeks):
        u = rng.random(buys)
        cohort = np.where((u < 0.6) & (w > 0), w - 1, np.where(u < 0.8, w, rng.integers(0, w + 1, buys)))
        art = cohort * per_cohort + rng.integers(0, per_cohort, buys)
        days = pd.Timestamp("2020-01-01") + pd.to_timedelta(7 * w + rng.integers(0, 7, buys), unit="D")
        rows.append(pd.DataFrame({"t_dat": days, "customer_id": rng.choice(customers["customer_id"], buys),
                                  "article_id": articles["article_id"].to_numpy()[art]}))
    tx = pd.concat(rows).sort_values("t_dat", kind="stable").reset_index(drop=True)
    tx["price"], tx["sales_channel_id"] = 0.01, 1
    view = retrieval_frame(tx, customers, article_features(articles, tx, None), CFG.history_len)
    return view, articles, customers


def test_time_grouped_batches_hold_one_snapshot_and_its_sampling_probabilities():
    view, articles, customers = hot_cohorts(weeks=3)
    vocab = fit_vocab(view, articles, customers)
    columns, _ = encode_training_data(vocab, view, articles, CFG)
    assert GROUP in columns and SAMPLE_PROB in columns
    for batch in local_batches(columns, CFG.batch_size, 0)(0):
        groups = batch[GROUP].unique()
        assert len(groups) == 1 and len(batch[GROUP]) <= 1.5 * CFG.batch_size
    week = view[AS_OF_COLUMN] == view[AS_OF_COLUMN].iloc[-1]
    share = view.loc[week, "article_id"].value_counts(normalize=True)
    np.testing.assert_allclose(columns[SAMPLE_PROB][week.to_numpy()],
                               share.loc[view.loc[week, "article_id"]].to_numpy(), rtol=1e-6)
    never = fit_vocab(view.iloc[:10], articles, customers)  # articles not bought in training: the unknown row
    assert (never.lookup("article_id", articles["article_id"]) == 0).sum() == len(articles) - view.iloc[
        :10]["article_id"].nunique()


def test_article_activity_finds_this_weeks_hot_articles():
    """Validated on the last week, whose hot articles (last week's arrivals) are not those that sold
    most so far: their days on sale carry the signal. Without the activity features the same model
    can only rank by what sold before."""
    view, articles, customers = hot_cohorts()
    last = view["t_dat"] >= view[AS_OF_COLUMN].max()
    cfg = CFG.model_copy(update={"epochs": 6, "val_k": 8, "early_stopping_patience": 0})
    recalls = {}
    for activity in (True, False):
        vocab = fit_vocab(view[~last], articles, customers)
        if not activity:
            vocab.item_features = list(HM_ITEM_FEATURES_V1)
        columns, side = encode_training_data(vocab, view[~last], articles, cfg, view[last])
        assert (GROUP in columns) is activity
        _, history = train_local(build_loop_config(vocab, cfg, progress=False, threads=1), columns, side)
        recalls[activity] = history[-1]["val_recall"]
    assert recalls[True] > 0.5 and recalls[True] > recalls[False] + 0.2, recalls


def test_random_negatives_of_a_time_grouped_batch_carry_its_snapshots_activity():
    view, articles, customers = hot_cohorts(weeks=3)
    vocab = fit_vocab(view, articles, customers)
    cfg = CFG.model_copy(update={"epochs": 1, "n_random_negatives": 8})
    columns, side = encode_training_data(vocab, view, articles, cfg)
    groups = side.groups
    assert groups is not None and groups.activity.shape == (3, len(articles), 2)
    first_week = with_activity(articles, view, pd.Timestamp(int(groups.days[0]), unit="D"))
    assert groups.activity[0, :, 0].tolist() == vocab.encode_feature(ACTIVITY_FEATURES[0], first_week).tolist()
    np.testing.assert_allclose(groups.probs.sum(axis=1), 1.0, rtol=1e-5)  # each week's shares
    _, history = train_local(build_loop_config(vocab, cfg, progress=False, threads=1), columns, side)
    assert np.isfinite(history[0]["train_loss"])
