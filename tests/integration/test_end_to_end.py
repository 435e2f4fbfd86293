"""The whole flow on a tiny generated dataset: real MariaDB, real local Ray, real Serve over HTTP."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import free_tcp_port

from common.artifacts import read_manifest
from common.workdir import Workdir
from feature_store.sources import FILES
from feature_store.store import FeatureStore
from feature_store.views import RETRIEVAL_VIEW_VERSION

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tiny_run):
    """Serve the session's tiny run (tests/conftest.py); yields (workdir, base url)."""
    import os

    import ray
    from ray import serve

    from ray_apps.app import APP_NAME, build_app

    metrics_port = free_tcp_port()
    os.environ["RAYREC_E2E_METRICS_PORT"] = str(metrics_port)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        port = free_tcp_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"workdir": str(tiny_run.root), **BURST_ROOM}), name=APP_NAME, route_prefix="/",
                  blocking=False)
        yield tiny_run, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


# Serve's Python proxy (the tests' ingress) counts a burst of concurrent requests as queued until
# it has assigned them to replicas: room for the tests' bursts of up to 8.
BURST_ROOM = {"max_queued_requests": 8}


def _raw(wd: Workdir):
    arts = pd.read_csv(wd.data_dir / FILES["articles"], dtype=str)
    tx = pd.read_csv(wd.data_dir / FILES["transactions"], dtype=str)
    return set(arts["article_id"]), tx


def test_pipeline_outputs(served):
    wd, _ = served
    metrics = json.loads(wd.metrics_path.read_text())
    for model in ("popularity", "popularity_global", "repeat", "ease", "retrieval", "ranked"):
        assert {"map@12", "recall@10", "recall@12", "recall@50", "recall@100", "ndcg@10", "coverage@12"} <= set(
            metrics[model])
        assert all(0.0 <= v <= 1.0 for v in metrics[model].values())
    assert metrics["n_eval_customers"] > 0
    assert metrics["comparison"]["best_baseline"] in metrics["models"]
    # no leakage: the retrieval training data ends before the held-out week, on the actual files
    view = pd.read_parquet(wd.views_dir / "retrieval" / f"v{RETRIEVAL_VIEW_VERSION}" / "train.parquet")
    cutoff = pd.Timestamp(metrics["protocol"]["cutoff"])
    assert view["t_dat"].max() < cutoff
    tx = pd.read_csv(wd.data_dir / FILES["transactions"], dtype=str, parse_dates=["t_dat"])
    assert len(view) == int((tx["t_dat"] < cutoff).sum())
    m = read_manifest(wd)
    assert m.index is not None and m.index.n_rows == 200
    for rel in m.models.values():
        assert wd.resolve(rel).is_file()
    assert (wd.reports_dir / "training.png").is_file() and (wd.reports_dir / "recall.png").is_file()
    # the groups larger than the run's max_txn_rows (120) went online in several transactions
    fs = FeatureStore(wd)
    for name, n in (("customers", 300), ("articles", 200)):
        (commit,) = fs.get_feature_group(name, m.feature_groups[name].version).offline.commits()
        assert commit["online_rows"] == n and commit["online_transactions"] == -(-n // 120)


def test_recommend_returns_k_unbought_existing_articles(served):
    wd, url = served
    article_ids, tx = _raw(wd)
    buyers = tx["customer_id"].value_counts()
    with httpx.Client(timeout=60) as c:
        for cid in [buyers.index[0], buyers.index[len(buyers) // 2]]:
            r = c.post(f"{url}/v1/recommend", json={"customer_id": cid, "k": 12, "debug": True})
            assert r.status_code == 200, r.text
            items = [i["article_id"] for i in r.json()["items"]]
            assert len(items) == 12 and len(set(items)) == 12
            assert set(items) <= article_ids
            bought = set(tx.loc[tx["customer_id"] == cid, "article_id"])
            assert not set(items) & bought
            scores = [i["score"] for i in r.json()["items"]]
            assert scores == sorted(scores, reverse=True)
            assert r.json()["debug"]["n_after_filter"] >= 12


def test_concurrent_recommends_answer_as_they_would_alone(served):
    """The default `fused_calls: coalesced` shares encode and rank calls between requests that
    arrive together: each must still get exactly its own list, with the batch size in debug."""
    import asyncio

    wd, url = served
    _, tx = _raw(wd)
    cids = tx["customer_id"].value_counts().index[:6].tolist()
    body = lambda cid: {"customer_id": cid, "k": 12, "debug": True, "context": {"date": "2020-09-20"}}  # noqa: E731

    def items(r: httpx.Response) -> list[tuple[str, float]]:
        assert r.status_code == 200, r.text
        return [(i["article_id"], round(i["score"], 6)) for i in r.json()["items"]]

    with httpx.Client(timeout=60) as c:
        alone = [items(c.post(f"{url}/v1/recommend", json=body(cid))) for cid in cids]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/recommend", json=body(cid)) for cid in cids))

    answers = asyncio.run(together())
    assert [items(r) for r in answers] == alone
    assert all(r.json()["debug"]["rank_batch"] >= 1 for r in answers)


def test_unknown_customer_gets_popular_articles_for_the_age_group(served):
    from training.popularity import load_popularity

    wd, url = served
    pop = load_popularity(wd.popularity_path)
    arts = _articles_group(wd)
    r = httpx.post(f"{url}/v1/recommend", json={"customer_id": "not-a-customer", "k": 5, "debug": True}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["source"] == "popular" and not out["degraded"] and out["debug"]["fallback"] == "cold_start"
    assert len(out["items"]) == 5 and {i["article_id"] for i in out["items"]} <= set(pop["overall"])
    # an age given in the context picks that age group's list, minus what a 17-year-old may not buy
    teen = _recommend(url, {"customer_id": "new-teen", "k": 5, "context": {"age": 17}, "debug": True})
    assert teen["debug"]["age_group"] == "0-18"
    assert [i["article_id"] for i in teen["items"]] == [a for a in pop["by_age_group"]["0-18"]
                                                      if a in {i["article_id"] for i in teen["items"]}]
    assert all((arts.loc[i["article_id"], "min_age"] or 0) <= 17 for i in teen["items"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"k": 12}, "customer_id"),
        ({"customer_id": "x", "k": 0}, "k"),
        ({"customer_id": "x", "k": -3}, "k"),
        ({"customer_id": "x", "k": 101}, "k"),
        ({"customer_id": "x", "colour": "red"}, "colour"),
        ({"customer_id": 123}, "customer_id"),
        ({"customer_id": "x", "k": "twelve"}, "k"),
        ({"customer_id": "x", "context": {"sales_channel": 3}}, "context.sales_channel"),
        (b'{"customer_id": "x",', "body: invalid JSON at character 20"),
    ],
)
def test_bad_requests_get_422_naming_the_field(served, body, field):
    _, url = served
    sent = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/recommend", **sent, timeout=30)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]


def test_healthz(served):
    _, url = served
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    docs = httpx.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "/openapi.json" in docs.text  # the OpenAPI page
    assert "/v1/recommend" in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]


# -- filtering, ranking and batch recommendations (issue #9) -----------------------------------


def _articles_group(wd: Workdir) -> pd.DataFrame:
    ref = read_manifest(wd).feature_groups["articles"]
    return pd.read_parquet(wd.resolve(ref.offline_path)).set_index("article_id")


def _recommend(url: str, body: dict) -> dict:
    r = httpx.post(f"{url}/v1/recommend", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_ranking_metrics_and_importance_are_reported(served):
    wd, _ = served
    metrics = json.loads(wd.metrics_path.read_text())
    ranking = metrics["ranking"]
    for name in ("popularity", "retrieval", "ranked", "ranked_classifier", "retrieval_filtered", "served"):
        assert set(ranking["metrics"][name]) == {"map@12", "ndcg@12"}
    assert "ranked_vs_retrieval_map@12" in ranking and "classifier_vs_retrieval_map@12" in ranking
    assert ranking["ranker"]["groups"] > 0 and len(ranking["ranker"]["cutoffs"]) == 2
    assert ranking["ranker"]["retrieval_for_training"] == "refit"
    assert (wd.root / ranking["importance_png"]).is_file()


def test_request_filters_over_http(served):
    wd, url = served
    arts = _articles_group(wd)
    _, tx = _raw(wd)
    cid = tx["customer_id"].value_counts().index[0]
    group = arts["index_group_name"].value_counts().index[0]
    out = _recommend(url, {"customer_id": cid, "k": 5, "filters": {"index_groups": [group]}, "debug": True})
    assert len(out["items"]) == 5 and out["warnings"] == []
    assert {arts.loc[i["article_id"], "index_group_name"] for i in out["items"]} == {group}
    assert out["debug"]["filter_removed"]["index_group"] > 0
    cheap = float(arts["price"].quantile(0.5))
    out = _recommend(url, {"customer_id": cid, "k": 5, "filters": {"max_price": cheap}})
    assert all(arts.loc[i["article_id"], "price"] <= cheap for i in out["items"])


def test_too_strict_filters_return_fewer_items_and_say_so(served):
    wd, url = served
    _, tx = _raw(wd)
    cid = tx["customer_id"].value_counts().index[0]
    out = _recommend(url, {"customer_id": cid, "k": 12, "filters": {"max_price": 1e-9}, "debug": True})
    assert out["items"] == []
    assert "only 0 of k=12" in out["warnings"][0]
    assert len(out["debug"]["fetches"]) >= 2  # it asked retrieval for more before giving up


@pytest.mark.parametrize(("filters", "field"), [({"colour": "red"}, "filters.colour"),
                                                ({"max_price": -1}, "filters.max_price"),
                                                ({"index_groups": []}, "filters.index_groups")])
def test_bad_filters_get_422_naming_the_field(served, filters, field):
    _, url = served
    r = httpx.post(f"{url}/v1/recommend", json={"customer_id": "x", "filters": filters}, timeout=30)
    assert r.status_code == 422, r.text
    assert field in r.json()["message"]


def test_recommend_batch_agrees_with_http(served, monkeypatch, capsys):
    import argparse

    from ray_apps.batch_cli import add_batch_commands

    wd, url = served
    _, tx = _raw(wd)
    buyers = tx["customer_id"].value_counts()
    cids = [buyers.index[0], buyers.index[len(buyers) // 2], "not-a-customer"]
    http = {c: _recommend(url, {"customer_id": c, "k": 12, "context": {"date": "2020-10-01", "sales_channel": 1}})
            for c in cids}
    ids_file = wd.root / "batch_customers.txt"
    ids_file.write_text("\n".join(cids) + "\n")
    # The command turns on Ray token auth for its own Ray; this process's Ray is already up, and
    # changing the auth variables under it would break later `ray.init`s in this test session.
    monkeypatch.setattr("ray_apps.ray_auth.use_ray_token", lambda wd: None)
    parser = argparse.ArgumentParser()
    add_batch_commands(parser.add_subparsers())
    out = wd.root / "batch.parquet"
    args = parser.parse_args(["recommend-batch", "--workdir", str(wd.root), "--k", "12", "--out", str(out),
                              "--customers", str(ids_file), "--date", "2020-10-01", "--channel", "1"])
    assert args.func(args) == 0
    assert "36 rows for 3 customers" in capsys.readouterr().out
    got = pd.read_parquet(out)
    assert list(got.columns) == ["customer_id", "rank", "article_id", "score"]
    for c in cids:
        mine = got[got["customer_id"] == c].sort_values("rank")
        assert mine["rank"].tolist() == list(range(1, 13))
        assert mine["article_id"].tolist() == [i["article_id"] for i in http[c]["items"]]
        assert mine["score"].tolist() == pytest.approx([i["score"] for i in http[c]["items"]], abs=1e-9)


# -- the full HTTP API (issue #7) --------------------------------------------------------------


def _buyer(wd: Workdir, rank: int = 0) -> str:
    _, tx = _raw(wd)
    return tx["customer_id"].value_counts().index[rank]


def test_similar_items_and_unknown_article_is_404(served):
    wd, url = served
    aid = sorted(_raw(wd)[0])[0]
    r = httpx.get(f"{url}/v1/items/{aid}/similar", params={"k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 5 and aid not in {i["article_id"] for i in items}
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    r = httpx.get(f"{url}/v1/items/no-such-article/similar", timeout=30)
    assert r.status_code == 404 and "no-such-article" in r.json()["message"]
    for k in (0, 101):
        r = httpx.get(f"{url}/v1/items/{aid}/similar", params={"k": k}, timeout=30)
        assert r.status_code == 422 and r.json()["message"].startswith("k: ")


def test_search_is_personalised_and_ranked(served):
    wd, url = served
    arts = _articles_group(wd)
    word = arts["product_type_name"].value_counts().index[0]
    cid = _buyer(wd)
    r = httpx.post(f"{url}/v1/search", json={"query": word, "customer_id": cid, "k": 5, "debug": True}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = [i["article_id"] for i in out["items"]]
    assert 0 < len(ids) <= 5 and set(ids) <= set(arts.index)
    assert sum(arts.loc[a, "product_type_name"] == word for a in ids) >= len(ids) // 2  # it is a text search
    _, tx = _raw(wd)
    assert not set(ids) & set(tx.loc[tx["customer_id"] == cid, "article_id"])  # the rules still apply
    anon = httpx.post(f"{url}/v1/search", json={"query": word, "k": 5}, timeout=60)
    assert anon.status_code == 200 and anon.json()["items"]
    bad = httpx.post(f"{url}/v1/search", json={"query": "", "k": 5}, timeout=60)
    assert bad.status_code == 422 and "query" in bad.json()["message"]
    bad = httpx.post(f"{url}/v1/search", json={"query": word, "k": 101}, timeout=60)
    assert bad.status_code == 422 and bad.json()["message"].startswith("k: ")


def test_purchase_event_excludes_the_article_and_moves_the_query(served):
    from feature_store.events import read_event_log

    wd, url = served
    cid = _buyer(wd, 3)
    req = {"customer_id": cid, "k": 12, "context": {"date": "2020-10-01"}, "debug": True}
    before = _recommend(url, req)
    top = before["items"][0]["article_id"]
    ev = {"event_id": "buy-e2e-1", "customer_id": cid, "article_id": top, "type": "purchase",
          "ts": "2020-10-01T12:00:00"}
    r = httpx.post(f"{url}/v1/events", json=ev, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["results"] == [{"event_id": "buy-e2e-1", "type": "purchase", "applied": True, "pending": False}]
    after = _recommend(url, req)
    assert top not in {i["article_id"] for i in after["items"]}
    # the query embedding reflects the purchase, and so do the scores of the articles still shown
    q0, q1 = np.array(before["debug"]["query_vector"]), np.array(after["debug"]["query_vector"])
    assert q0.shape == q1.shape == (len(q0),) and len(q0) > 0 and not np.allclose(q0, q1)
    scores0 = {i["article_id"]: i["score"] for i in before["items"]}
    common = [i for i in after["items"] if i["article_id"] in scores0]
    assert common and any(i["score"] != scores0[i["article_id"]] for i in common)
    # the retried event changes nothing and is logged once for training
    again = httpx.post(f"{url}/v1/events", json=ev, timeout=30).json()["results"][0]
    assert again["applied"] is False
    log = read_event_log(wd)
    assert (log["event_id"] == "buy-e2e-1").sum() == 1 and log.set_index("event_id").loc["buy-e2e-1", "article_id"] == top
    prof = httpx.get(f"{url}/v1/customers/{cid}", timeout=30).json()
    assert prof["known"] and prof["purchased"][0] == top


def test_event_batch_logs_interactions_and_rejects_bad_events(served):
    from feature_store.events import read_interactions

    wd, url = served
    cid, aid = _buyer(wd, 5), sorted(_raw(wd)[0])[1]
    batch = {"events": [{"event_id": f"v-{t}", "customer_id": cid, "article_id": aid, "type": t}
                        for t in ("view", "click", "add_to_cart")]}
    r = httpx.post(f"{url}/v1/events/batch", json=batch, timeout=30)
    assert r.status_code == 200, r.text
    assert [x["type"] for x in r.json()["results"]] == ["view", "click", "add_to_cart"]
    logged = read_interactions(wd)
    assert {"v-view", "v-click", "v-add_to_cart"} <= set(logged["event_id"])
    r = httpx.post(f"{url}/v1/events", json={"event_id": "x1", "customer_id": cid, "article_id": "nope",
                                             "type": "purchase"}, timeout=30)
    assert r.status_code == 404 and "nope" in r.json()["message"]
    assert "x1" not in set(read_interactions(wd)["event_id"])
    twice = {"events": [batch["events"][0], batch["events"][0]]}
    r = httpx.post(f"{url}/v1/events/batch", json=twice, timeout=30)
    assert r.status_code == 422 and "event_id repeated" in r.json()["message"]
    for body, field in (({"event_id": "x", "customer_id": cid, "article_id": aid, "type": "like"}, "type"),
                        ({"event_id": "x", "customer_id": cid, "article_id": aid, "type": "view", "ts": "soon"}, "ts"),
                        ({"customer_id": cid, "article_id": aid, "type": "view"}, "event_id")):
        r = httpx.post(f"{url}/v1/events", json=body, timeout=30)
        assert r.status_code == 422 and field in r.json()["message"], r.text


def test_logged_purchases_a_killed_replica_did_not_apply_are_replayed(served):
    """A purchase fsync'ed to the log (so acknowledged) whose replica died before the online
    transaction: the next replica to start applies it, once."""
    from feature_store.events import PurchaseEvent, append_log_lines, event_log_dir
    from ray_apps.service import Recommender

    wd, url = served
    cid = _buyer(wd, 5)
    before = httpx.get(f"{url}/v1/customers/{cid}", timeout=30).json()
    art = next(a for a in _articles_group(wd).index if a not in before["purchased"])
    ev = PurchaseEvent("logged-not-applied-1", cid, art, 0.02, "2020-10-02T09:00:00")
    append_log_lines(event_log_dir(wd), [(ev.timestamp, ev.to_dict())], durable=True)
    rec = Recommender(str(wd.root), follow_index=False)
    try:
        assert rec.replay_logged_purchases() == 1
        assert rec.replay_logged_purchases() == 0  # applied now: nothing left to replay
    finally:
        rec.close()
    after = httpx.get(f"{url}/v1/customers/{cid}", timeout=30).json()
    assert after["purchased"][0] == art and after["n_purchases"] == before["n_purchases"] + 1


def test_customer_samples_and_article_details(served):
    wd, url = served
    ids = httpx.get(f"{url}/v1/customers", params={"n": 3}, timeout=30).json()["customer_ids"]
    assert len(ids) == 3 and ids[0] == _buyer(wd)
    arts = _articles_group(wd)
    a, b = sorted(arts.index)[:2]
    got = httpx.get(f"{url}/v1/items", params={"ids": f"{a},{b},nope"}, timeout=30).json()["items"]
    assert set(got) == {a, b} and got[a]["prod_name"] == arts.loc[a, "prod_name"]
    assert httpx.get(f"{url}/v1/items", params={"ids": ",".join(["x"] * 101)}, timeout=30).status_code == 422
    long = httpx.get(f"{url}/v1/items", params={"ids": f"{a},{'9' * 65}"}, timeout=30)  # no such id can be stored
    assert long.status_code == 422 and "at most 64 characters" in long.json()["message"]
    long = httpx.get(f"{url}/v1/customers/{'c' * 65}", timeout=30)
    assert long.status_code == 422 and long.json()["message"].startswith("customer_id: ")


def test_serving_metrics_reach_rays_prometheus_endpoint(served):
    import os
    import re
    import time
    from pathlib import Path

    wd, url = served
    _recommend(url, {"customer_id": _buyer(wd), "k": 5})
    _recommend(url, {"customer_id": "not-a-customer", "k": 5})
    metrics_url = f"http://127.0.0.1:{os.environ['RAYREC_E2E_METRICS_PORT']}/metrics"
    # every rayrec series the Grafana dashboard queries (the cache one counts article-row lookups)
    dash = json.loads((Path(__file__).resolve().parents[2] / "ops/grafana/rayrec.json").read_text())
    wanted = {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"(ray_rayrec_[a-z_]+)", t["expr"])}
    assert len(wanted) >= 7 and "ray_rayrec_cache_total" in wanted
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # Ray exports every few seconds
        text = httpx.get(metrics_url, timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = sorted(w for w in wanted if w not in text)
    assert not missing, f"not exported: {missing}; have {sorted(set(re.findall(r'ray_rayrec_[a-z_]+', text)))}"
    assert 'stage="encode"' in text and 'reason="cold_start"' in text and 'rule="already_bought"' in text
    assert re.search(r'ray_rayrec_cache_total\{[^}]*group="articles"', text)


def test_body_over_the_limit_is_refused(served):
    _, url = served
    r = httpx.post(f"{url}/v1/recommend", content=b'{"customer_id": "' + b"x" * 1_100_000 + b'"}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["message"]


def test_readyz_reports_models_index_and_database(served):
    _, url = served
    r = httpx.get(f"{url}/readyz", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["ready"] and r.json()["database"] and r.json()["index"] and r.json()["models"]


def test_prediction_log_joins_with_later_events(served):
    import time

    from feature_store.events import read_event_log, read_interactions
    from training.feedback import labelled_impressions, log_files, read_predictions

    wd, url = served
    cid = _buyer(wd, 7)
    shown = _recommend(url, {"customer_id": cid, "k": 6})
    rid, bought = shown["request_id"], shown["items"][2]["article_id"]
    r = httpx.post(f"{url}/v1/events", json={"event_id": "buy-log-1", "customer_id": cid, "article_id": bought,
                                             "type": "purchase"}, timeout=30)
    assert r.status_code == 200
    deadline = time.time() + 20
    while time.time() < deadline:  # the log is written by a background thread
        preds = read_predictions(wd.predictions_dir)
        if len(preds) and rid in set(preds["request_id"]):
            break
        time.sleep(0.5)
    mine = preds[preds["request_id"] == rid]
    assert mine["article_id"].tolist() == [i["article_id"] for i in shown["items"]]
    assert {"f_retrieval_score", "f_price_ratio", "f_product_type_name"} <= set(preds.columns)
    assert mine["model"].iloc[0]["run"] == "e2e"
    # the log also keeps every candidate the ranker scored, the shown ones among them
    (rec,) = [json.loads(line) for _, _, p in log_files(wd.predictions_dir)
              for line in p.read_text().splitlines() if f'"request_id":"{rid}"' in line]
    scored = dict(rec["candidates"])
    assert len(scored) == len(rec["candidates"]) >= len(shown["items"])
    assert all(scored[i["article_id"]] == pytest.approx(i["score"], abs=1e-5) for i in shown["items"])
    joined = labelled_impressions(mine, read_event_log(wd), read_interactions(wd))
    assert joined.set_index("article_id")["bought"].to_dict() == {a: int(a == bought) for a in mine["article_id"]}


def test_store_down_answers_degraded_then_recovers(served, mariadb):
    import time

    wd, url = served
    cid = _buyer(wd, 1)
    # Each replica keeps the last good rows of the customers it served: ask a few times so that
    # both replicas of the fused deployment have them.
    for _ in range(8):
        ok = _recommend(url, {"customer_id": cid, "k": 12})
    assert not ok["degraded"]
    mariadb.server.stop()
    try:
        t0 = time.time()
        answers = [httpx.post(f"{url}/v1/recommend", json={"customer_id": cid, "k": 12, "debug": True}, timeout=30)
                   for _ in range(5)]
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        assert all(r.json()["degraded"] and r.json()["source"] == "popular" for r in answers)
        bought = set(_raw(wd)[1].query("customer_id == @cid")["article_id"])
        from_last_good = [r.json() for r in answers if r.json()["debug"]["known_customer"]]
        assert from_last_good  # the customer's last good rows were used
        for a in from_last_good:
            assert not bought & {i["article_id"] for i in a["items"]}  # the last good history still filters
        assert time.time() - t0 < 15  # no request waits for a dead server more than once per pause
        ev = {"event_id": "buy-outage-1", "customer_id": cid, "article_id": ok["items"][0]["article_id"],
              "type": "purchase"}
        r = httpx.post(f"{url}/v1/events", json=ev, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["pending"] is True  # logged, applied later
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 503
    finally:
        mariadb.server.start()
    deadline = time.time() + 30
    while time.time() < deadline:
        r = httpx.post(f"{url}/v1/recommend", json={"customer_id": cid, "k": 12}, timeout=30)
        if r.status_code == 200 and not r.json()["degraded"]:
            break
        time.sleep(0.5)
    assert r.status_code == 200 and not r.json()["degraded"] and r.json()["source"] == "ranked"
    # the replica that logged the pending purchase applies it by itself once the store is back
    deadline = time.time() + 20
    while time.time() < deadline:
        prof = httpx.get(f"{url}/v1/customers/{cid}", timeout=30).json()
        if prof["purchased"] and prof["purchased"][0] == ev["article_id"]:
            break
        time.sleep(0.5)
    assert prof["purchased"][0] == ev["article_id"]


def _copy_run(wd: Workdir, name: str) -> Workdir:
    """Another run with the same models and index, named `name` in its manifest."""
    import shutil

    dst = Workdir.at(wd.root.parent / name)
    shutil.copytree(wd.root, dst.root, ignore=shutil.ignore_patterns("ray", "db", "logs"))
    m = read_manifest(dst)
    dst.manifest_path.write_text(m.model_copy(update={"run_name": name}).model_dump_json(indent=2))
    return dst


def _replica_pids(deployment: str) -> set[str]:
    """The processes of a deployment's replicas (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    import subprocess

    from ray_apps.app import APP_NAME

    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{APP_NAME}:{deployment}"], capture_output=True, text=True)
    return set(out.stdout.split())


def _ingress_pids() -> set[str]:
    from ray_apps.app import INGRESS_NAME

    return _replica_pids(INGRESS_NAME)


def _app_config(wd: Workdir, url: str, serving: Workdir, topology: str,
                env: dict[str, str] | None = None, args: dict | None = None) -> dict:
    """`rayrec serve config`'s Serve config for the run `wd` answering from `serving` (the
    ingress's user_config), on the tests' port, with `env` for the app's build and replicas and
    `args` for build_app."""
    from ray_apps.app import serve_config

    conf = serve_config(wd.root, "127.0.0.1", int(url.rsplit(":", 1)[1]), topology=topology)
    (app,) = conf["applications"]
    app["args"] |= BURST_ROOM | (args or {})
    app["deployments"][0]["user_config"] = {"workdir": str(serving.root)}
    if env:
        app["runtime_env"] = {"env_vars": env}
    return conf


def _deploy(conf: dict, timeout_s: float = 300) -> None:
    """Deploy `conf` through the controller call that `serve deploy` ends in (the dashboard's REST
    handler calls the same `deploy_apps`; these tests run Ray without a dashboard), and wait
    until the app runs it whole. (`deploy_apps(_blocking=True)` stops waiting after 60 s without
    a word: a rebuild on a slow 2-core VM took longer, and a test then took a rollout still under
    way for a switch that started replicas.)"""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from ray_apps.app import APP_NAME

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(conf))  # the app is DEPLOYING on return
    deadline = time.time() + timeout_s
    while (app := serve.status().applications.get(APP_NAME)) is None or app.status != "RUNNING":
        assert app is None or app.status != "DEPLOY_FAILED", app
        assert time.time() < deadline, f"not running {timeout_s:.0f} s after the deploy: {app}"
        time.sleep(0.2)


def _hot_reload_round(wd: Workdir, url: str, topology: str, v2_name: str, headers: dict[str, str],
                      env: dict[str, str] | None = None, rebuild: bool = True, args: dict | None = None) -> None:
    """Switch the served run to a copy of it named `v2_name` and back through the ingress's
    user_config (in place), with three clients sending requests throughout; asserts none failed
    and no replica was started by a switch. `rebuild`: first deploy the run from the Serve config
    (for an app deployed from Python: a new code version, so new replicas), under the same load."""
    import threading
    import time

    from ray_apps.app import INGRESS_NAME

    v2 = _copy_run(wd, v2_name)
    deployments = [INGRESS_NAME] + ([f"{s}_stage" for s in ("encoder", "retriever", "ranker")]
                                    if topology == "split" else [])

    def deploy(serving: Workdir) -> None:
        _deploy(_app_config(wd, url, serving, topology, env, args))

    def answered_by(run: str, timeout_s: float = 90) -> None:
        n, deadline = len(seen), time.time() + timeout_s
        while time.time() < deadline and not (len(seen) > n and seen[-1] == run):
            time.sleep(0.05)

    def pids() -> dict[str, set[str]]:
        return {d: _replica_pids(d) for d in deployments}

    _, tx = _raw(wd)
    customers = tx["customer_id"].value_counts().index[:40].tolist()
    seen, failures, stop = [], [], threading.Event()
    phase = ["rebuild" if rebuild else "before the switch"]  # what the failures happened during

    def hammer(first: int):
        # three clients, each with requests of many customers: some are mid-way (between their
        # store reads, or their stage calls) when a replica switches runs, and the rows are not
        # all in a cache
        with httpx.Client(timeout=30, headers=headers) as c:
            i = first
            while not stop.is_set():
                r = c.post(f"{url}/v1/recommend", json={"customer_id": customers[i % len(customers)], "k": 5})
                (seen.append(r.json()["model"]["run"]) if r.status_code == 200
                 else failures.append(f"{phase[-1]}: {r.status_code} {r.text[:200]}"))
                i += 3

    threads = [threading.Thread(target=hammer, args=(j,)) for j in range(3)]
    for t in threads:
        t.start()
    try:
        if rebuild:
            deploy(wd)  # from Python to the config: a new code version for Serve, so new replicas
        answered_by("e2e")
        before = pids()
        phase.append("to v2")
        deploy(v2)
        answered_by(v2_name)
        after_v2 = pids()
        phase.append("back")
        deploy(wd)
        answered_by("e2e")
        time.sleep(0.5)  # requests that began on v2 have answered
        after_back = pids()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == [], failures
    assert seen[-1] == "e2e" and v2_name in seen
    for d in deployments:
        assert after_v2[d] and after_v2[d] <= before[d] and after_back[d] <= before[d], f"the switch started new {d}"


def test_hot_reload_switches_runs_in_place_without_failed_requests(served):
    """README's hot reload: `rayrec serve config`'s Serve config with the ingress's user_config
    naming another run, deployed as `serve deploy` does. Requests keep coming throughout: while
    the app, deployed from Python by the fixture, is rebuilt from the config (new replicas), then
    while the replicas switch runs in place (no new replica process), and back."""
    wd, url = served
    # one replica: Serve's rolling update starts the new replicas one at a time, each 20-30 s on a
    # slow 2-core VM, and this test's point is the switch under load, not the replica count
    _hot_reload_round(wd, url, "fused", "run-v2", {}, args={"min_replicas": 1, "max_replicas": 1})


def test_acknowledged_events_survive_replicas_killed_right_after_answering(served):
    """An event acknowledged with 2xx is never lost, even if the replica is killed right after
    answering. Two clients post purchases back to back; right after one of them gets an answer,
    every ingress replica gets SIGKILL (the other client's request is then mid-way: before,
    between or after its log write and its online transaction). Requests fail until Serve has
    started new replicas. Then every acknowledged purchase is in the durable event log, and every
    purchase the log holds is applied online exactly once: one a replica logged but did not apply
    is applied by the new replicas' replay, one it applied is not applied again."""
    import os
    import signal
    import threading
    import time

    from common.config import load_config
    from feature_store.connect import open_online_store
    from feature_store.events import logged_purchases, unapplied_events
    from feature_store.store import FeatureStore

    wd, url = served
    customers = [_buyer(wd, 120), _buyer(wd, 121)]  # customers no other test looks at
    arts = _articles_group(wd)
    articles = (arts.sort_values("stock", ascending=False) if "stock" in arts else arts).index[:30].tolist()
    before = {c: httpx.get(f"{url}/v1/customers/{c}", timeout=30).json()["n_purchases"] for c in customers}
    acked: list[tuple[float, str]] = []
    failed: list[str] = []
    killed_at: list[float] = []
    stop = threading.Event()
    victims = _ingress_pids()
    assert victims

    def post(j: int) -> None:
        with httpx.Client(timeout=30) as c:
            i = 0
            while not stop.is_set():
                eid = f"kill-{j}-{i}"
                body = {"event_id": eid, "customer_id": customers[j], "article_id": articles[(7 * i + j) % len(articles)],
                        "type": "purchase", "ts": "2020-10-02T12:00:00"}
                i += 1
                try:
                    r = c.post(f"{url}/v1/events", json=body)
                except httpx.HTTPError as e:
                    failed.append(f"{eid}: {e!r}")
                    time.sleep(0.1)
                    continue
                if r.status_code != 200:
                    failed.append(f"{eid}: {r.status_code} {r.text[:100]}")
                    time.sleep(0.1)
                    continue
                acked.append((time.time(), eid))
                if j == 0 and not killed_at and sum(1 for _, e in acked if e.startswith("kill-0-")) == 10:
                    for pid in victims:  # right after this answer, while client 1 is mid-request
                        os.kill(int(pid), signal.SIGKILL)
                    killed_at.append(time.time())

    threads = [threading.Thread(target=post, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 180
        while not (killed_at and sum(1 for t, _ in acked if t > killed_at[0]) >= 10):
            assert time.time() < deadline, f"no answers after the kill: {failed[-3:]}"
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert _ingress_pids() and not _ingress_pids() & victims, "the killed replicas were not replaced"
    cfg = load_config(wd.config_path)
    store = open_online_store(cfg.database, wd)
    try:
        logged = [e for e in logged_purchases(wd) if e.event_id.startswith("kill-")]
        assert {e for _, e in acked} <= {e.event_id for e in logged}, "an acknowledged event is not in the log"
        deadline = time.time() + 60  # the new replicas replay the log in a thread of their own
        while unapplied := unapplied_events(FeatureStore(wd, store), logged):
            assert time.time() < deadline, f"logged purchases never applied online: {unapplied}"
            time.sleep(0.5)
    finally:
        store.close()
    for c in customers:
        n = sum(e.customer_id == c for e in logged)
        after = httpx.get(f"{url}/v1/customers/{c}", timeout=30).json()["n_purchases"]
        assert after == before[c] + n, (c, before[c], n, after)  # each logged purchase counted once
    print(f"[kill] {len(acked)} acknowledged, {len(failed)} failed, {len(logged)} logged; "
          f"{sum(1 for t, _ in acked if t > killed_at[0])} answered after the kill")


# The split and batched tests below send bursts of 8 concurrent requests to check that they share
# batches. Behind Serve's own proxy (no HAProxy here) the default bounds, 4 at a time + 2 queued,
# would refuse part of a burst at the split graph's single ingress replica, as designed; these
# fixtures give the bursts room, so that a refusal there is a bug.
@pytest.fixture(scope="module")
def served_split(served):
    """The same run as the split topology (encoder, retriever, ranker deployments), with an API
    key, deployed from `rayrec serve config`'s Serve config as `serve deploy` does (the hot reload
    test then changes only the user_config)."""
    from ray import serve

    from ray_apps.app import APP_NAME

    wd, url = served
    serve.delete(APP_NAME)  # a topology change is a new app: the fused replicas' CPUs are needed by the split graph
    _deploy(_app_config(wd, url, wd, "split", SPLIT_ENV, SPLIT_ARGS))
    return wd, url


KEY = {"X-API-Key": "e2e-secret-key"}
SPLIT_ENV = {"RAYREC_API_KEY": KEY["X-API-Key"]}  # read by build_app, in the app's build task
# A rebuild starts each replacement replica before its old one stops: a quarter CPU per replica
# leaves the local Ray's 2 CPUs room for them.
SPLIT_ARGS = {"num_cpus": 0.25, "rollout_surge_percent": 100}


def test_api_key_is_required_except_for_health_checks(served_split):
    _, url = served_split
    body = {"customer_id": "anyone", "k": 3}
    assert httpx.post(f"{url}/v1/recommend", json=body, timeout=30).status_code == 401
    assert httpx.post(f"{url}/v1/recommend", json=body, headers={"X-API-Key": "wrong"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/v1/items/x/similar", timeout=30).status_code == 401
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{url}/readyz", timeout=60).status_code in (200, 503)  # no 401
    docs = httpx.get(f"{url}/openapi.json", timeout=30)  # the docs too, with a challenge a browser answers
    assert docs.status_code == 401 and docs.headers["www-authenticate"].startswith("Basic ")
    assert "/v1/recommend" in httpx.get(f"{url}/openapi.json", auth=("docs-reader", "e2e-secret-key"),
                                        timeout=30).json()["paths"]
    r = httpx.post(f"{url}/v1/recommend", json=body, headers={"Authorization": "Bearer e2e-secret-key"}, timeout=60)
    assert r.status_code == 200, r.text


def test_split_topology_answers_like_fused(served_split):
    wd, url = served_split
    assert httpx.get(f"{url}/readyz", headers=KEY, timeout=60).json()["ready"]
    _, tx = _raw(wd)
    for cid in (_buyer(wd, 2), "not-a-customer"):
        r = httpx.post(f"{url}/v1/recommend", json={"customer_id": cid, "k": 12, "debug": True}, headers=KEY,
                       timeout=60)
        assert r.status_code == 200, r.text
        items = [i["article_id"] for i in r.json()["items"]]
        assert len(set(items)) == 12
        assert not set(items) & set(tx.loc[tx["customer_id"] == cid, "article_id"])
    aid = sorted(_raw(wd)[0])[0]
    assert len(httpx.get(f"{url}/v1/items/{aid}/similar", headers=KEY, timeout=30).json()["items"]) == 12
    assert httpx.get(f"{url}/v1/items/nope/similar", headers=KEY, timeout=30).status_code == 404
    # concurrent requests share query-encoding batches and all succeed
    import concurrent.futures as cf

    cids = list(tx["customer_id"].unique()[:16])
    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda c: httpx.post(f"{url}/v1/recommend", json={"customer_id": c, "k": 5},
                                                   headers=KEY, timeout=60).status_code, cids))
    assert codes == [200] * len(cids)


def test_split_topology_searches_and_takes_events(served_split):
    """Search and a purchase event through the stage deployments; the key guards both routes."""
    wd, url = served_split
    assert httpx.post(f"{url}/v1/search", json={"query": "x", "k": 3}, timeout=30).status_code == 401
    assert httpx.post(f"{url}/v1/events/batch", json={"events": []}, timeout=30).status_code == 401
    word = _articles_group(wd)["product_type_name"].value_counts().index[0]
    cid = _buyer(wd, 4)
    r = httpx.post(f"{url}/v1/search", json={"query": word, "customer_id": cid, "k": 5}, headers=KEY, timeout=60)
    assert r.status_code == 200 and 0 < len(r.json()["items"]) <= 5, r.text

    def recommended() -> list[str]:
        r = httpx.post(f"{url}/v1/recommend", json={"customer_id": cid, "k": 12}, headers=KEY, timeout=60)
        assert r.status_code == 200, r.text
        return [i["article_id"] for i in r.json()["items"]]

    top = recommended()[0]
    ev = {"event_id": "buy-split-1", "customer_id": cid, "article_id": top, "type": "purchase"}
    r = httpx.post(f"{url}/v1/events/batch", json={"events": [ev]}, headers=KEY, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["applied"] is True, r.text
    assert top not in recommended()


def test_hot_reload_switches_the_split_graph_in_place(served_split):
    """The hot reload of the split topology: the ingress warms each stage on the new run before
    it switches, the stages keep both runs while requests of either are between their calls.
    The fixture deployed the graph from the same Serve config, so only the user_config changes."""
    wd, url = served_split
    # new args: a rebuild first; one replica per deployment, since the autoscaler adding a second
    # ingress under the three clients (ongoing requests 3.2 against a target of 2, while the slow
    # rebuild ran) would pass for a replica the switch started
    _hot_reload_round(wd, url, "split", "run-v2-split", KEY, env=SPLIT_ENV, rebuild=True,
                      args=SPLIT_ARGS | {"article_cache_ttl_s": 1.0, "max_replicas": 1})


@pytest.fixture(scope="module")
def served_fused_batched(served_split):
    """The same run fused again, with `fused_calls: batched` (the default runs stages on the request loop)."""
    from ray import serve

    from ray_apps.app import APP_NAME, build_app

    wd, url = served_split
    serve.delete(APP_NAME)
    # one replica: the burst's requests meet in its batches, and it starts in half the CPU time of two
    serve.run(build_app({"workdir": str(wd.root), "fused_calls": "batched", "min_replicas": 1, "max_replicas": 1,
                         **BURST_ROOM}), name=APP_NAME, route_prefix="/", blocking=False)
    return wd, url


def test_fused_batched_calls_answer_every_request(served_fused_batched):
    wd, url = served_fused_batched
    assert httpx.get(f"{url}/readyz", timeout=60).json()["ready"]
    _, tx = _raw(wd)
    import concurrent.futures as cf

    cids = [_buyer(wd, 1), "not-a-customer", *tx["customer_id"].unique()[:14]]
    with cf.ThreadPoolExecutor(8) as pool:  # concurrent requests share encode and rank batches
        answers = list(pool.map(lambda c: httpx.post(f"{url}/v1/recommend", json={"customer_id": c, "k": 12},
                                                     timeout=60), cids))
    for cid, r in zip(cids, answers, strict=True):
        assert r.status_code == 200, r.text
        items = [i["article_id"] for i in r.json()["items"]]
        assert len(set(items)) == 12
        assert not set(items) & set(tx.loc[tx["customer_id"] == cid, "article_id"])
