"""The feature store against the real MariaDB: online/offline consistency, all-or-nothing
inserts (validation failure, connection killed mid-write), verbatim values, one query per group,
real-time events."""
from __future__ import annotations

import threading
import uuid

import pandas as pd
import pymysql
import pytest

from common.workdir import Workdir
from feature_store.events import PurchaseEvent, apply_purchase_event
from feature_store.feature_view import FeatureSelection, FeatureView
from feature_store.offline import latest_per_key
from feature_store.online.mysql import MySQLOnlineStore
from feature_store.schema import Feature, FeatureGroup, in_range
from feature_store.sources import generate, load_hm
from feature_store.store import FeatureStore, read_online, to_online_rows
from feature_store.transforms import article_features, customer_features, customer_history
from feature_store.validation import ValidationFailed

pytestmark = pytest.mark.integration

TRICKY = ["it's", 'say "hi"', "a;b;c", "'; DROP TABLE fs_feature_groups; --", "SELECT * FROM x WHERE 1=1 OR ''=''",
          "back\\slash \\' \\\"", "%s %(name)s {}", "NULL", "ünïcødé ✓ 🎉", "tab\tnew\nline", "\x1f\x1e separators"]


def _group(name: str, **kw) -> FeatureGroup:
    return FeatureGroup(name, "item", (Feature("item", "string"), Feature("price", "float64"),
                                       Feature("label", "string"), Feature("tags", "list_string"),
                                       Feature("meta", "json")), **kw)


@pytest.fixture
def store(mariadb):
    s = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password, chunk_size=2)
    yield s
    s.close()


@pytest.fixture
def fs(store, tmp_path):
    return FeatureStore(Workdir.at(tmp_path), store)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _frame(items, prices, times, labels=None):
    return pd.DataFrame({"item": items, "price": prices, "label": labels or [f"l{p}" for p in prices],
                         "tags": [[str(p)] for p in prices], "meta": [{"p": p} for p in prices],
                         "event_time": pd.to_datetime(times, format="ISO8601")})


def assert_consistent(fgv) -> dict:
    latest = latest_per_key(fgv.read(internal=True), fgv.group.key, fgv.group.event_time)
    expected = {r[fgv.group.key]: r for r in to_online_rows(fgv.group, latest)}
    assert fgv.read_online(list(expected)) == expected
    assert fgv.fs.online.table_stats(fgv.spec)["rows"] == len(expected)  # and no online row offline lacks
    return expected


def test_online_rows_equal_the_latest_offline_rows(fs):
    fgv = fs.create_feature_group(_group(unique("cons")))
    fgv.insert(_frame(["a", "b", "a", "c"], [1.0, 2.0, 3.0, 4.0], ["2020-01-01", "2020-01-01", "2020-01-02", "2020-01-05"]))
    fgv.insert(_frame(["a", "b", "c"], [9.0, 5.0, None], ["2020-01-01T12:00", "2020-01-01", "2020-01-06"]))
    fgv.insert(_frame(["d"], [7.0], ["2019-12-31"]))
    got = assert_consistent(fgv)
    assert {k: r["price"] for k, r in got.items()} == {"a": 3.0, "b": 5.0, "c": None, "d": 7.0}


def test_hm_groups_online_equal_offline(fs, tmp_path):
    data = tmp_path / "hm"
    generate(data, seed=2, customers=150, articles=80, days=25)
    hm = load_hm(data)
    frames = {"customers": customer_features(hm.customers, hm.extras.get("postal_regions")),
              "articles": article_features(hm.articles, hm.transactions, None, hm.extras),
              "customer_history": customer_history(hm.transactions, hm.articles, None)}
    for name, frame in frames.items():
        ref = fs.write(name, frame, progress=False, validation="strict")
        group = fs.get_feature_group(name, ref.version).group
        rows = to_online_rows(group, frame)
        assert read_online(fs.online, ref, name, [r[group.key] for r in rows]) == {r[group.key]: r for r in rows}


def test_strict_failure_leaves_both_stores_untouched(fs):
    fgv = fs.create_feature_group(_group(unique("strict"), expectations=(in_range("price", 0, 10),)))
    fgv.insert(_frame(["a"], [1.0], ["2020-01-01"]))
    with pytest.raises(ValidationFailed, match="price: range"):
        fgv.insert(_frame(["a", "b"], [2.0, 50.0], ["2020-01-02", "2020-01-02"]))
    assert len(fgv.offline.commits()) == 1 and len(fgv.read()) == 1
    assert fgv.read_online(["a", "b"]) == {"a": {"item": "a", "price": 1.0, "label": "l1.0", "tags": ["1.0"],
                                                 "meta": {"p": 1.0}}}


def test_a_batch_interrupted_by_a_killed_connection_is_not_half_visible(fs, mariadb, monkeypatch):
    fgv = fs.create_feature_group(_group(unique("killed")))
    fgv.insert(_frame(["a"], [1.0], ["2020-01-01"]))
    admin = pymysql.connect(host=mariadb.host, port=mariadb.port, user=mariadb.user,
                            password=mariadb.password.encode(), database=mariadb.database, autocommit=True)
    original = pymysql.cursors.Cursor.executemany
    calls = {"n": 0}

    def kill_mid_batch(cur, query, args):
        calls["n"] += 1
        if calls["n"] % 2 == 0 and "fg_killed" in query:  # the second chunk of each attempt
            with admin.cursor() as c:
                c.execute("KILL CONNECTION %s", (cur.connection.thread_id(),))
        return original(cur, query, args)

    monkeypatch.setattr(pymysql.cursors.Cursor, "executemany", kill_mid_batch)
    items = [f"k{i}" for i in range(8)]
    with pytest.raises(ConnectionError):
        fgv.insert(_frame(items, [float(i) for i in range(8)], ["2020-01-02"] * 8))
    monkeypatch.undo()
    assert calls["n"] >= 4  # both attempts were cut after their first chunk
    other = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)
    try:
        fresh = FeatureStore(fs.wd, other).get_feature_group(fgv.name, fgv.version)
        assert fresh.read_online(items) == {}  # no row of the batch is visible
        assert len(fresh.offline.commits()) == 1 and len(fresh.read()) == 1
        fgv.insert(_frame(items, [float(i) for i in range(8)], ["2020-01-02"] * 8))  # the retry succeeds
        assert len(fresh.read_online(items)) == 8
    finally:
        other.close()
        admin.close()


DIE_AFTER_ONLINE_COMMIT = """
import os, sys
import pandas as pd
from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store import offline
from feature_store.online.mysql import MySQLOnlineStore
from feature_store.store import FeatureStore

root, cfg_json, name, frame_path = sys.argv[1:5]
store = MySQLOnlineStore.from_config(DatabaseConfig.model_validate_json(cfg_json), os.environ["FS_TEST_DB_PASSWORD"])
fgv = FeatureStore(Workdir.at(root), store).get_feature_group(name, 1)
offline.OfflineTable.publish = lambda *args, **kwargs: os._exit(3)  # the process dies right after the online commit
fgv.insert(pd.read_pickle(frame_path))
"""


def test_an_insert_whose_process_died_after_the_online_commit_lands_in_both_stores(fs, mariadb, tmp_path):
    """A real process death between the online transaction and the offline publish: the next
    reader finds the staged commit, sees its marker in MariaDB and publishes it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fgv = fs.create_feature_group(_group(unique("died")))
    fgv.insert(_frame(["a", "b"], [1.0, 2.0], ["2020-01-01", "2020-01-01"]))
    batch = tmp_path / "batch.pkl"
    _frame(["a", "c"], [3.0, 4.0], ["2020-01-02", "2020-01-03"]).to_pickle(batch)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", DIE_AFTER_ONLINE_COMMIT, str(fs.wd.root), mariadb.cfg.model_dump_json(),
                           fgv.name, str(batch)], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FS_TEST_DB_PASSWORD": mariadb.password, "PYTHONPATH": str(repo)})
    assert done.returncode == 3, done.stderr[-2000:]
    assert {k: r["price"] for k, r in fgv.read_online(["a", "b", "c"]).items()} == {"a": 3.0, "b": 2.0, "c": 4.0}
    assert len(fgv.offline.commits()) == 1 and [c.commit for c in fgv.offline.pending()] == [2]
    other = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)
    try:
        fresh = FeatureStore(fs.wd, other).get_feature_group(fgv.name, fgv.version)
        assert [c["commit"] for c in fresh.offline.commits()] == [1, 2] and fresh.offline.pending() == []
        assert sorted(fresh.read()["price"]) == [1.0, 2.0, 3.0, 4.0]
        assert assert_consistent(fresh).keys() == {"a", "b", "c"}
    finally:
        other.close()


DIE_BETWEEN_TRANSACTIONS = """
import os, sys
import pandas as pd
from common.config import DatabaseConfig
from common.workdir import Workdir
from feature_store.online.mysql import MySQLOnlineStore
from feature_store.store import FeatureStore

root, cfg_json, name, frame_path = sys.argv[1:5]
store = MySQLOnlineStore.from_config(DatabaseConfig.model_validate_json(cfg_json), os.environ["FS_TEST_DB_PASSWORD"])
fgv = FeatureStore(Workdir.at(root), store, max_txn_rows=2).get_feature_group(name, 1)
write = store.write_batch

def write_then_die(spec, rows, **kwargs):
    n = write(spec, rows, **kwargs)
    if spec.name.startswith("fg_"):
        os._exit(3)  # the process dies after the first of the insert's transactions committed
    return n

store.write_batch = write_then_die
fgv.insert(pd.read_pickle(frame_path))
"""


def test_a_large_insert_whose_process_died_between_transactions_is_finished(fs, mariadb, tmp_path):
    """An insert over `max_txn_rows` keys goes in several transactions; a real process death
    after the first: the next reader writes the commit's rows again and publishes it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fgv = fs.create_feature_group(_group(unique("big")))
    fgv.insert(_frame(["a", "b"], [1.0, 2.0], ["2020-01-01", "2020-01-01"]))
    batch = tmp_path / "batch.pkl"
    _frame(["c", "a", "d", "e", "f"], [3.0, 4.0, 5.0, 6.0, 7.0], ["2020-01-02"] * 5).to_pickle(batch)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", DIE_BETWEEN_TRANSACTIONS, str(fs.wd.root),
                           mariadb.cfg.model_dump_json(), fgv.name, str(batch)], cwd=repo, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "FS_TEST_DB_PASSWORD": mariadb.password,
                                                       "PYTHONPATH": str(repo)})
    assert done.returncode == 3, done.stderr[-2000:]
    assert {k: r["price"] for k, r in fgv.read_online(["a", "b", "c", "d"]).items()} == {"a": 4.0, "b": 2.0, "c": 3.0}
    assert len(fgv.offline.commits()) == 1 and [c.commit for c in fgv.offline.pending()] == [2]
    other = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)
    try:
        fresh = FeatureStore(fs.wd, other, max_txn_rows=2).get_feature_group(fgv.name, fgv.version)
        assert [c["commit"] for c in fresh.offline.commits()] == [1, 2] and fresh.offline.pending() == []
        assert fresh.offline.commits()[1]["online_rows"] == 5
        assert sorted(fresh.read()["price"]) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        assert assert_consistent(fresh).keys() == {"a", "b", "c", "d", "e", "f"}
    finally:
        other.close()


def test_quotes_semicolons_and_sql_keywords_round_trip_verbatim(fs):
    fgv = fs.create_feature_group(_group(unique("tricky")))
    keys = [f"k{i}{t[:40]}" for i, t in enumerate(TRICKY)]
    frame = pd.DataFrame({"item": keys, "price": [float(i) for i in range(len(TRICKY))], "label": TRICKY,
                          "tags": [[t, t.upper()] for t in TRICKY], "meta": [{t: [t]} for t in TRICKY],
                          "event_time": pd.Timestamp("2020-01-01")})
    fgv.insert(frame)
    got = fgv.read_online(keys + ["missing'; --"])
    assert set(got) == set(keys)
    for k, t in zip(keys, TRICKY, strict=True):
        assert got[k]["label"] == t and got[k]["tags"] == [t, t.upper()] and got[k]["meta"] == {t: [t]}
    offline = fgv.read()
    assert offline["label"].tolist() == TRICKY


def test_a_key_with_a_trailing_space_neither_overwrites_nor_reads_the_key_without_it(fs):
    """The server's PAD SPACE collation compares 'a ' equal to 'a' (so would InnoDB, NDB and MySQL
    8's utf8mb4_bin): such keys are refused on the way in and read as missing, never as a's row."""
    fgv = fs.create_feature_group(_group(unique("padded")))
    fgv.insert(_frame(["a", "b"], [1.0, 2.0], ["2020-01-01"] * 2))
    with pytest.raises(ValidationFailed, match="no trailing space"):
        fgv.insert(_frame(["a "], [9.0], ["2020-01-02"]))
    assert fgv.read_online(["a"])["a"]["price"] == 1.0 and len(fgv.read()) == 2
    with fs.online._lock:  # what the server itself says: the same row for both spellings
        with (fs.online._conn or fs.online._connect()).cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM `{fgv.spec.name}` WHERE `item` = %s", ("a ",))
            assert cur.fetchone()[0] == 1
    fv = fs.create_feature_view(FeatureView(unique("pv"), (FeatureSelection(fgv.name, ("price",)),)))
    got = fv.get_feature_vectors(["a ", "b", "a"])
    assert got.status == ["missing", "complete", "complete"] and got.columns["price"][1:].tolist() == [2.0, 1.0]
    assert fgv.read_online(["a ", "b"]).keys() == {"b"}


@pytest.mark.parametrize("bad", ["Items", "items; drop table x", "it-ems", "1items", "ítems"])
def test_names_outside_the_pattern_are_refused(fs, bad):
    with pytest.raises(ValueError, match=r"must match \[a-z\]\[a-z0-9_\]\*"):
        fs.create_feature_group(FeatureGroup(bad, "item", (Feature("item", "string"),)))
    with pytest.raises(ValueError, match=r"must match \[a-z\]\[a-z0-9_\]\*"):
        Feature(bad, "string")


def test_feature_vectors_one_query_per_group(fs):
    a = fs.create_feature_group(_group(unique("gfv_a")))
    a.insert(_frame([f"i{i}" for i in range(300)], [float(i) for i in range(300)], ["2020-01-01"] * 300))
    users = FeatureGroup(unique("gfv_u"), "uid", (Feature("uid", "int64"), Feature("age", "float64")))
    u = fs.create_feature_group(users)
    u.insert(pd.DataFrame({"uid": [1, 2], "age": [30.0, 40.0], "event_time": pd.Timestamp("2020-01-01")}))
    fv = fs.create_feature_view(FeatureView(unique("v"), (FeatureSelection(a.name, ("price", "label")),
                                                          FeatureSelection(users.name, ("age",)))))
    fv.get_feature_vectors([{"item": "i0", "uid": 1}])  # warm: registry lookups
    keys = [{"item": f"i{i}", "uid": 1 + i % 3} for i in range(250)] + [{"item": "nope", "uid": 1}]
    before = fs.online.statement_count()
    v = fv.get_feature_vectors(keys)
    assert fs.online.statement_count() - before == 1  # both groups in one statement
    assert v.columns["price"][:4].tolist() == [0.0, 1.0, 2.0, 3.0] and v.columns["label"][-1] is None
    assert v.status[:3] == ["complete", "complete", "missing"] and v.missing_groups[-1] == (a.name,)
    # keys no row can have are missing rows too, not a failed call
    odd = fv.get_feature_vectors([{"item": "i5", "uid": 2}, {"item": "é" * 65, "uid": 2**64}])
    assert odd.status == ["complete", "missing"] and odd.missing_groups[1] == (a.name, users.name)
    assert odd.columns["price"][0] == 5.0 and odd.columns["age"][0] == 40.0


def test_retired_versions_leave_the_database_and_stay_readable_offline(fs, store, mariadb, tmp_path):
    group = _group(unique("ret"))
    versions = [fs.create_feature_group(group) for _ in range(3)]
    for i, fgv in enumerate(versions):
        fgv.insert(_frame(["a", "b"], [float(i), 9.0], ["2020-01-01", "2020-01-02"]))
    pinned = fs.create_feature_view(FeatureView(unique("v"), (FeatureSelection(group.name, ("price",), version=1),)))
    assert pinned.get_feature_vectors(["a"]).columns["price"][0] == 0.0
    assert [r["version"] for r in fs.retire_online(keep=2, groups=[group.name])] == [1]
    tables = set(store.list_tables())
    assert versions[0].spec.name not in tables and {v.spec.name for v in versions[1:]} <= tables
    fresh = FeatureStore(fs.wd, MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password))  # another process
    try:
        v1 = fresh.get_feature_group(group.name, 1)
        assert v1.read()["price"].tolist() == [0.0, 9.0]  # offline rows stay
        with pytest.raises(ValueError, match=rf"'{group.name}' v1 was retired from the online store"):
            fresh.get_feature_view(pinned.view.name).get_feature_vectors(["a"])
        assert_consistent(fresh.get_feature_group(group.name, 3))
        # the registry keeps the number: another workdir on this database does not take v1 again
        other = FeatureStore(Workdir.at(tmp_path / "other"), fresh.online)
        assert other.create_feature_group(group).version == 4
    finally:
        fresh.online.close()


def _event_groups(fs, path, seed: int, customers: int, articles: int):
    """Generated H&M data written as the articles and customer_history groups: (hm, refs, a
    customer who bought, an article)."""
    generate(path, seed=seed, customers=customers, articles=articles, days=20)
    hm = load_hm(path)
    refs = {"articles": fs.write("articles", article_features(hm.articles, hm.transactions, None, hm.extras),
                                 progress=False),
            "customer_history": fs.write("customer_history", customer_history(hm.transactions, hm.articles, None),
                                         progress=False)}
    return hm, refs, hm.transactions["customer_id"].iloc[0], hm.articles["article_id"].iloc[0]


def test_purchase_event_on_mysql_applies_once(fs, tmp_path):
    hm, refs, cid, aid = _event_groups(fs, tmp_path / "hm2", seed=4, customers=60, articles=40)
    before_h = read_online(fs.online, refs["customer_history"], "customer_history", [cid])[cid]
    before_a = read_online(fs.online, refs["articles"], "articles", [aid])[aid]
    ev = PurchaseEvent(unique("ev"), cid, aid, 0.02, pd.Timestamp.now(tz="UTC").isoformat())
    assert apply_purchase_event(fs, refs, ev).applied
    assert not apply_purchase_event(fs, refs, ev).applied
    after_h = read_online(fs.online, refs["customer_history"], "customer_history", [cid])[cid]
    after_a = read_online(fs.online, refs["articles"], "articles", [aid])[aid]
    assert after_h["n_purchases"] == before_h["n_purchases"] + 1 and after_h["purchased"][0] == aid
    ptype = hm.articles.set_index("article_id").loc[aid, "product_type_name"]
    assert after_h["type_last_day"][ptype] == ev.timestamp.strftime("%Y-%m-%d")  # in the same transaction
    assert after_h["type_counts"][ptype] == before_h["type_counts"].get(ptype, 0) + 1
    assert after_a["sales_total"] == before_a["sales_total"] + 1 and after_a["sales_7d"] >= 1


def test_a_fresh_process_decodes_dictionary_codes_inside_an_event(fs, mariadb, tmp_path):
    """A serving replica's first event reads its article row inside the event's transaction:
    the codes it has not seen are read there too, on the same connection (no deadlock)."""
    hm, refs, cid, aid = _event_groups(fs, tmp_path / "hm3", seed=5, customers=40, articles=30)
    fresh = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)  # its own (empty) dictionary
    fresh_fs = FeatureStore(Workdir.at(tmp_path), fresh)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(apply_purchase_event(
        fresh_fs, refs, PurchaseEvent(unique("ev"), cid, aid, 0.02, pd.Timestamp.now(tz="UTC").isoformat()))),
        daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # deadlocked: its store cannot even be closed (the thread holds its lock)
        pytest.fail("the event did not finish in 60 s: a dictionary read inside update_rows deadlocked")
    try:
        assert done and done[0].applied and done[0].known_article
        after = read_online(fresh, refs["articles"], "articles", [aid])[aid]
        want = hm.articles.set_index("article_id").loc[aid]
        for c in ("product_type_name", "colour_group_name", "index_group_name", "department_name"):
            assert after[c] == want[c], c
        ptype = want["product_type_name"]
        hist = read_online(fresh, refs["customer_history"], "customer_history", [cid])[cid]
        assert hist["type_counts"][ptype] >= 1
    finally:
        fresh.close()
