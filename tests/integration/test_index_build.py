"""`rayrec index build` on a run's workdir: real Ray Data, a real (untrained, tiny) item tower and
the packaged MiniLM; the manifest then serves the new version."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from common.artifacts import FeatureGroupRef, new_manifest, read_manifest, write_manifest
from common.config import TwoTowerConfig
from common.workdir import Workdir
from training.features import ITEM_ATTRIBUTE_COLUMNS, FeatureVocab
from training.two_tower.model import ITEM_TOWER_FILE, TwoTower, save_towers

pytestmark = pytest.mark.integration

TYPES = ["Dress", "Socks", "Trousers", "Sweater"]
DESCS = {"Dress": "Long dress in soft chiffon with a V-neck", "Socks": "Warm socks in a wool blend",
         "Trousers": "Slim-fit trousers in stretch denim", "Sweater": "Knitted sweater in soft cotton"}


def articles_group(n: int, seed: int = 0) -> pd.DataFrame:
    """The articles feature group's columns (regions as JSON text, as stored offline)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, len(TYPES), n)
    df = pd.DataFrame({"article_id": [f"{i:010d}" for i in range(n)]})
    for col in ITEM_ATTRIBUTE_COLUMNS:
        df[col] = [f"{col[:4]}{x}" for x in rng.integers(0, 3, n)]
    df["product_type_name"] = [TYPES[j] for j in t]
    df["index_group_name"] = rng.choice(["Ladieswear", "Menswear"], n)
    df["prod_name"] = [f"{TYPES[j]} {i}" for i, j in enumerate(t)]
    df["detail_desc"] = [DESCS[TYPES[j]] for j in t]
    df["price"] = rng.uniform(0.005, 0.1, n)
    df["sales_total"] = rng.integers(0, 50, n)
    df["sales_7d"] = rng.integers(0, 5, n)
    df["stock"] = rng.choice([0.0, 2.0, np.nan], n)
    df["min_age"] = rng.choice([0, 18], n)
    df["regions"] = [['["north", "south"]', '["east"]', "[]"][i % 3] for i in range(n)]
    return df


def pipeline_run(wd: Workdir, n: int = 300) -> pd.DataFrame:
    """What the index build reads from a pipeline run: the articles group, the towers, a manifest."""
    arts = articles_group(n)
    path = wd.offline_dir / "articles" / "v1"
    path.mkdir(parents=True)
    arts.to_parquet(path / "part-0.parquet", index=False)
    customers = pd.DataFrame({"customer_id": ["c1"], "age": [30.0], "club_member_status": ["ACTIVE"],
                              "fashion_news_frequency": ["NONE"], "FN": [1.0], "Active": [1.0]})
    vocab = FeatureVocab.fit(arts, customers)
    cfg = TwoTowerConfig(embedding_dim=8, output_dim=16, hidden_dims=[16], history_len=3, batch_size=32, epochs=1)
    paths = save_towers(TwoTower.from_vocab(vocab, cfg), vocab, cfg, wd.two_tower_dir)
    m = new_manifest("t")
    m.feature_groups["articles"] = FeatureGroupRef(version=1, offline_path=wd.relative(path), primary_key=["article_id"])
    m.models.update({k: wd.relative(p) for k, p in paths.items()})
    write_manifest(wd, m)
    return arts


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_index_build_on_a_run_serves_the_new_version(tmp_path, ray_cluster, capsys, monkeypatch):
    from ray_apps.index_cli import main

    # Ray is already up in this process: the CLI's token set-up would only leak env into later tests.
    monkeypatch.setattr("ray_apps.ray_auth.use_ray_token", lambda wd: None)
    from training.index import ItemFilter, ItemIndex

    wd = Workdir.at(tmp_path / "run")
    arts = pipeline_run(wd)
    assert main(["index", "build", "--workdir", str(wd.root)]) == 0
    out = capsys.readouterr().out
    assert "rows/s" in out  # progress during the build
    built = json.loads(out.strip().splitlines()[-1])
    ref = read_manifest(wd).index
    assert built["promoted"] and ref.version == built["version"] and ref.n_rows == len(arts) and ref.dim == 16

    index = ItemIndex(str(wd.resolve(ref.uri)), ref.table, ref.version)
    assert index.engine == "exact" and index.record is not None and index.record.text_dim == 384
    assert (wd.two_tower_dir / ITEM_TOWER_FILE).is_file()
    ids, vecs = index.vectors()
    assert sorted(ids) == sorted(arts["article_id"]) and vecs.shape == (len(arts), 16)
    q = vecs[5]
    got, sims = index.search(q, 10)
    scores = vecs @ q / np.linalg.norm(vecs, axis=1) / np.linalg.norm(q)
    assert set(got) == {ids[i] for i in np.argsort(-scores)[:10]}
    by_id = arts.set_index("article_id")
    for a in index.search(q, 30, ItemFilter(region="east", in_stock_only=True))[0]:
        assert "east" in json.loads(by_id.loc[a, "regions"]) and not by_id.loc[a, "stock"] <= 0
    # MiniLM text vectors: semantic and hybrid search find socks for a sock query with no shared words
    socks = set(arts.loc[arts["product_type_name"] == "Socks", "article_id"])
    assert set(index.semantic_search("something warm for my feet", 5)[0]) <= socks
    assert set(index.hybrid("wool socks", 5, query_vector=q)[0]) <= socks

    assert main(["index", "rollback", "--workdir", str(wd.root)]) == 2  # one build: nothing older
    assert "no complete build older" in capsys.readouterr().err
