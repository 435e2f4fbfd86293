import math

import pandas as pd
import pytest

import feature_store.store as store_module
from common.artifacts import new_manifest, read_manifest, write_manifest
from common.workdir import Workdir
from feature_store.online.base import InMemoryOnlineStore
from feature_store.store import FeatureStore, read_online


def _history():
    return pd.DataFrame({
        "customer_id": ["c1", "c2"],
        "purchased": [["a2", "a1"], []],
        "n_purchases": [2, 0],
        "mean_price": [0.02, float("nan")],
        "type_counts": [{"Dress": 2}, {}],
        "index_group_counts": [{"Ladieswear": 2}, {}],
        "share_ladieswear": [1.0, 0.0],
        "share_divided": [0.0, 0.0],
        "share_menswear": [0.0, 0.0],
        "share_baby_children": [0.0, 0.0],
        "share_sport": [0.0, 0.0],
        "last_purchase": ["2020-01-02", None],
        "type_last_day": [{"Dress": "2020-01-02"}, {}],
    })


def test_write_offline_and_online_then_read_back(tmp_path):
    wd = Workdir.at(tmp_path)
    online = InMemoryOnlineStore()
    fs = FeatureStore(wd, online)
    ref = fs.write("customer_history", _history(), progress=False)
    assert ref.version == 1 and ref.online_table == "fg_customer_history_v1"
    off = fs.read_offline("customer_history", ref)
    assert off.loc[0, "purchased"] == ["a2", "a1"] and off.loc[0, "type_counts"] == {"Dress": 2}
    rows = read_online(online, ref, "customer_history", ["c1", "c2", "nobody"])
    assert set(rows) == {"c1", "c2"}
    assert rows["c1"]["purchased"] == ["a2", "a1"]
    assert rows["c2"]["mean_price"] is None or math.isnan(rows["c2"]["mean_price"])
    some = read_online(online, ref, "customer_history", ["c1", "c2"], columns=["type_counts", "n_purchases"])
    assert some == {c: {"type_counts": r["type_counts"], "n_purchases": r["n_purchases"]} for c, r in rows.items()}


def test_each_write_is_a_new_version_and_old_one_stays(tmp_path):
    wd = Workdir.at(tmp_path)
    online = InMemoryOnlineStore()
    fs = FeatureStore(wd, online)
    r1 = fs.write("customer_history", _history(), progress=False)
    changed = _history().assign(n_purchases=[5, 1])
    r2 = fs.write("customer_history", changed, progress=False)
    assert r2.version == 2
    assert read_online(online, r1, "customer_history", ["c1"])["c1"]["n_purchases"] == 2
    assert read_online(online, r2, "customer_history", ["c1"])["c1"]["n_purchases"] == 5


def test_missing_columns_named(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    with pytest.raises(ValueError, match=r"customer_history.*mean_price"):
        fs.write("customer_history", _history().drop(columns=["mean_price"]), progress=False)


def test_manifest_round_trip_and_missing_manifest_message(tmp_path):
    wd = Workdir.at(tmp_path / "run")
    with pytest.raises(RuntimeError, match="rayrec pipeline --workdir"):
        read_manifest(wd)
    m = new_manifest("t")
    m.models["ranker"] = "models/ranker/ranker.cbm"
    write_manifest(wd, m)
    assert read_manifest(wd).models == {"ranker": "models/ranker/ranker.cbm"}


# --- feature groups: versions, inserts, online/offline consistency ------------------------------

from feature_store.offline import OfflineTable, latest_per_key  # noqa: E402
from feature_store.online.base import OnlineStore  # noqa: E402
from feature_store.schema import Feature, FeatureGroup  # noqa: E402
from feature_store.store import to_online_rows  # noqa: E402

PRICES = FeatureGroup("prices", "item", (Feature("item", "string"), Feature("price", "float64"),
                                         Feature("label", "string")))


def _prices(items, prices, times, labels=None):
    return pd.DataFrame({"item": items, "price": prices, "label": labels or [f"p{p}" for p in prices],
                         "event_time": pd.to_datetime(times, format="ISO8601")})


def assert_online_equals_latest_offline(fgv):
    latest = latest_per_key(fgv.read(internal=True), "item", "event_time")
    expected = {r["item"]: r for r in to_online_rows(fgv.group, latest)}
    assert fgv.read_online(list(expected)) == expected
    assert fgv.fs.online.table_stats(fgv.spec)["rows"] == len(expected)  # and no online row offline lacks
    return expected


def test_inserts_append_offline_by_event_date_and_upsert_latest_online(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    fgv = fs.create_feature_group(PRICES)
    fgv.insert(_prices(["a", "b", "a"], [1.0, 2.0, 3.0], ["2020-01-01", "2020-01-01", "2020-01-02"]))
    # late-arriving row for a (older than the stored one), a tie for b (same time: later insert wins)
    fgv.insert(_prices(["a", "b", "c"], [9.0, 4.0, 5.0], ["2020-01-01 12:00", "2020-01-01", "2020-01-03"]))
    assert sorted(p.name for p in fgv.root.glob("event_date=*")) == [
        "event_date=2020-01-01", "event_date=2020-01-02", "event_date=2020-01-03"]
    assert [c["commit"] for c in fgv.offline.commits()] == [1, 2]
    assert len(fgv.read()) == 6  # the offline store keeps every row
    online = assert_online_equals_latest_offline(fgv)
    assert {k: r["price"] for k, r in online.items()} == {"a": 3.0, "b": 4.0, "c": 5.0}
    assert fgv.read(latest=True, as_of="2020-01-01 18:00").set_index("item")["price"].to_dict() == {
        "a": 9.0, "b": 4.0}
    assert pd.read_parquet(fgv.root).shape[0] == 6  # a plain hive-partitioned Parquet dataset


def test_an_insert_packs_in_chunks_and_stages_days_out_of_order_in_frame_order(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "PACK_CHUNK_ROWS", 2)  # 5 rows: chunks of 2, 2 and 1
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    fgv = fs.create_feature_group(PRICES)
    days = ["2020-01-03", "2020-01-01", "2020-01-03 10:00", "2020-01-02", "2020-01-01 08:00"]
    fgv.insert(_prices(["a", "b", "c", "d", "e"], [1.0, 2.0, 3.0, 4.0, 5.0], days))
    online = assert_online_equals_latest_offline(fgv)
    assert {k: (r["price"], r["label"]) for k, r in online.items()} == {
        "a": (1.0, "p1.0"), "b": (2.0, "p2.0"), "c": (3.0, "p3.0"), "d": (4.0, "p4.0"), "e": (5.0, "p5.0")}
    stored = fs.online.read_batch(fgv.spec, list("abcde"), ["item", "ts_us"])  # each row's own event time
    assert [stored[k]["ts_us"] for k in "abcde"] == [pd.Timestamp(d).value // 1000 for d in days]
    per_day = {p.parent.name: pd.read_parquet(p)["item"].tolist() for p in fgv.root.glob("event_date=*/*.parquet")}
    assert per_day == {"event_date=2020-01-01": ["b", "e"], "event_date=2020-01-02": ["d"],
                       "event_date=2020-01-03": ["a", "c"]}


def test_versions_coexist_with_their_own_schema(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    v1 = fs.create_feature_group(PRICES)
    v1.insert(_prices(["a"], [1.0], ["2020-01-01"]))
    wider = FeatureGroup("prices", "item", (*PRICES.features, Feature("stock", "int64")))
    v2 = fs.create_feature_group(wider)
    v2.insert(_prices(["a"], [2.0], ["2020-01-02"]).assign(stock=[7]))
    assert fs.versions("prices") == [1, 2]
    assert fs.get_feature_group("prices", 1).read_online(["a"]) == {"a": {"item": "a", "price": 1.0, "label": "p1.0"}}
    assert fs.get_feature_group("prices").read_online(["a"])["a"]["stock"] == 7
    assert v2.ref.online_table == "fg_prices_v2" and v1.ref.offline_path.endswith("prices/v1")
    with pytest.raises(ValueError, match="already exists"):
        fs.create_feature_group(PRICES, version=1)
    with pytest.raises(LookupError, match="no version 3"):
        fs.get_feature_group("prices", 3)


class FailingWrites(InMemoryOnlineStore):
    def write_batch(self, spec, rows, *, newer_column=None, marker=None):
        if spec.name.startswith("fg_"):
            raise ConnectionError("lost the connection mid-write")
        return super().write_batch(spec, rows, newer_column=newer_column, marker=marker)


def test_a_failed_online_write_leaves_the_offline_store_unchanged(tmp_path):
    online: OnlineStore = FailingWrites()
    fgv = FeatureStore(Workdir.at(tmp_path), online).create_feature_group(PRICES)
    with pytest.raises(ConnectionError):
        fgv.insert(_prices(["a"], [1.0], ["2020-01-01"]))
    assert fgv.offline.commits() == [] and fgv.read().empty
    assert not list(fgv.root.glob("event_date=*/*.parquet")) and not (fgv.root / "_staging").exists()


class Died(BaseException):
    """The process dying at that point: nothing after it runs, no clean-up either."""


def _die(*args, **kwargs):
    raise Died


def _two_inserts_the_second_dying(tmp_path, monkeypatch, *where: str):
    """A version with one commit, then an insert that dies at `where` (OfflineTable methods, or
    "write" for the online write); the test's patches are undone before this returns."""
    online = InMemoryOnlineStore()
    fs = FeatureStore(Workdir.at(tmp_path), online)
    fgv = fs.create_feature_group(PRICES)
    fgv.insert(_prices(["a", "b"], [1.0, 2.0], ["2020-01-01", "2020-01-01"]))
    for name in where:
        if name == "write":
            monkeypatch.setattr(online, "write_batch", _die)
        else:
            monkeypatch.setattr(OfflineTable, name, (lambda *a, **k: None) if name == "abort" else _die)
    with pytest.raises(Died):
        fgv.insert(_prices(["a", "c"], [5.0, 6.0], ["2020-01-02", "2020-01-03"]))
    monkeypatch.undo()
    return fs, fgv


def test_an_insert_that_died_after_its_online_commit_is_published_by_the_next_open(tmp_path, monkeypatch):
    fs, fgv = _two_inserts_the_second_dying(tmp_path, monkeypatch, "publish")
    assert {k: r["price"] for k, r in fgv.read_online(["a", "b", "c"]).items()} == {"a": 5.0, "b": 2.0, "c": 6.0}
    assert [c["commit"] for c in fgv.offline.commits()] == [1]  # online holds the batch, offline not yet
    assert [c.commit for c in fgv.offline.pending()] == [2]
    fresh = FeatureStore(fs.wd, fs.online).get_feature_group("prices", 1)  # a reader settles it
    commits = fresh.offline.commits()
    assert [c["commit"] for c in commits] == [1, 2] and "recovered_at" in commits[1]
    assert commits[1]["rows"] == 2 and commits[1]["validation"]["ok"]
    assert fresh.offline.pending() == [] and not (fresh.root / "_staging").exists()
    assert sorted(fresh.read()["price"]) == [1.0, 2.0, 5.0, 6.0]
    assert_online_equals_latest_offline(fresh)
    assert fresh.insert(_prices(["d"], [7.0], ["2020-01-04"])).commit == 3


def test_an_insert_that_died_during_its_online_write_is_removed_by_the_next_insert(tmp_path, monkeypatch):
    fs, fgv = _two_inserts_the_second_dying(tmp_path, monkeypatch, "write", "abort")
    assert [c.commit for c in fgv.offline.pending()] == [2]  # staged, no marker online
    result = fgv.insert(_prices(["d"], [7.0], ["2020-01-04"]))
    assert result.commit == 2 and fgv.offline.pending() == []
    assert sorted(fgv.read()["price"]) == [1.0, 2.0, 7.0]  # the dead insert's rows nowhere
    assert_online_equals_latest_offline(fgv)
    assert fgv.fs.online.table_stats(fgv.spec)["rows"] == 3


def test_a_publish_that_died_half_way_is_finished(tmp_path, monkeypatch):
    from feature_store import offline

    moves = {"n": 0}
    real_replace = offline.os.replace

    def replace_once(src, dst):
        if str(dst).endswith("part-c000002.parquet"):
            moves["n"] += 1
            if moves["n"] == 2:  # the batch has two event dates: one file moved, then death
                raise Died
        real_replace(src, dst)

    monkeypatch.setattr(offline.os, "replace", replace_once)
    fs, fgv = _two_inserts_the_second_dying(tmp_path, monkeypatch)
    assert len(list(fgv.root.glob("event_date=*/part-c000002.parquet"))) == 1
    assert sorted(fgv.read()["price"]) == [1.0, 2.0]  # a file without its marker is not read
    assert fgv.recover() == [2]
    assert len(list(fgv.root.glob("event_date=*/part-c000002.parquet"))) == 2
    assert sorted(fgv.read()["price"]) == [1.0, 2.0, 5.0, 6.0]
    assert_online_equals_latest_offline(fgv)


def test_a_pending_commit_needs_the_online_store_to_settle(tmp_path, monkeypatch):
    fs, fgv = _two_inserts_the_second_dying(tmp_path, monkeypatch, "publish")
    offline_only = FeatureStore(fs.wd).get_feature_group("prices", 1)  # opens, settles nothing
    assert [c.commit for c in offline_only.offline.pending()] == [2]
    assert offline_only.stats()["pending_commits"] == 1  # what `rayrec features describe` shows
    with pytest.raises(RuntimeError, match="commit 2, left by an insert that did not finish"):
        offline_only.recover()
    assert [c.commit for c in offline_only.offline.pending()] == [2]


class LostAnswers(InMemoryOnlineStore):
    """Commits a feature group's batch, then loses the connection before the answer; with
    `down`, reads fail too (the store cannot be asked whether it committed)."""

    down = False

    def write_batch(self, spec, rows, *, newer_column=None, marker=None):
        n = super().write_batch(spec, rows, newer_column=newer_column, marker=marker)
        if spec.name.startswith("fg_"):
            raise ConnectionError("lost the connection after COMMIT")
        return n

    def read_batch(self, spec, keys, columns=None):
        if self.down:
            raise ConnectionError("the store is down")
        return super().read_batch(spec, keys, columns)


def test_a_write_whose_answer_was_lost_is_known_committed_by_its_marker(tmp_path):
    online = LostAnswers()
    fgv = FeatureStore(Workdir.at(tmp_path), online).create_feature_group(PRICES)
    result = fgv.insert(_prices(["a", "b"], [1.0, 2.0], ["2020-01-01", "2020-01-02"]))  # no error: it committed
    assert result.commit == 1 and result.online_rows == 2
    assert sorted(fgv.read()["price"]) == [1.0, 2.0] and fgv.offline.pending() == []
    assert_online_equals_latest_offline(fgv)

    online.down = True  # the next one cannot even be checked: it stays pending, the caller gets the error
    with pytest.raises(ConnectionError, match="after COMMIT"):
        fgv.insert(_prices(["c"], [3.0], ["2020-01-03"]))
    assert [c.commit for c in fgv.offline.pending()] == [2] and sorted(fgv.read()["price"]) == [1.0, 2.0]
    online.down = False
    assert fgv.recover() == [2]  # the store is back: its marker says commit 2 went through
    assert sorted(fgv.read()["price"]) == [1.0, 2.0, 3.0]
    assert_online_equals_latest_offline(fgv)


class Transactions(InMemoryOnlineStore):
    """Records each feature-group transaction (rows, with the marker?); `fail_at` (1-based) makes
    that one raise `fail_with` before it writes anything."""

    fail_at: int | None = None
    fail_with: BaseException = ConnectionError("lost the connection mid-write")

    def __init__(self):
        super().__init__()
        self.calls = []

    def write_batch(self, spec, rows, *, newer_column=None, marker=None):
        if spec.name.startswith("fg_"):
            self.calls.append(([r["item"] for r in rows], marker is not None))
            if len(self.calls) == self.fail_at:
                raise self.fail_with
        return super().write_batch(spec, rows, newer_column=newer_column, marker=marker)


_BIG = (["a", "b", "c", "a", "d", "e"], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        ["2020-01-02", "2020-01-01", "2020-01-01", "2020-01-01", "2020-01-03", "2020-01-03"])


def test_a_split_insert_sends_each_keys_latest_row_whatever_its_packed_bytes(tmp_path):
    """A key repeated in an insert split into transactions goes online once, with its latest row:
    here the later row's packed value sorts before the earlier one's (price 4.0 < 1.0 as bytes)."""
    online = Transactions()
    fgv = FeatureStore(Workdir.at(tmp_path), online, max_txn_rows=2).create_feature_group(PRICES)
    fgv.insert(_prices(["x", "y", "x"], [1.0, 2.0, 4.0], ["2020-01-01", "2020-01-01", "2020-01-02"]))
    assert sorted(k for keys, _ in online.calls for k in keys) == ["x", "y"]
    assert assert_online_equals_latest_offline(fgv)["x"]["price"] == 4.0


def test_an_insert_larger_than_one_transaction_is_written_in_several(tmp_path, capsys, monkeypatch):
    from feature_store import store as store_module

    online = Transactions()
    fgv = FeatureStore(Workdir.at(tmp_path), online, max_txn_rows=2).create_feature_group(PRICES)
    result = fgv.insert(_prices(*_BIG))
    # 5 keys (a's later row wins) in transactions of 2, the commit's marker with the last one
    assert online.calls == [(["a", "b"], False), (["c", "d"], False), (["e"], True)]
    assert result.online_rows == 5 and fgv.offline.commits()[0]["online_transactions"] == 3
    assert assert_online_equals_latest_offline(fgv)["a"]["price"] == 1.0
    assert capsys.readouterr().out == ""  # progress lines come every PROGRESS_EVERY_S (10 s)
    monkeypatch.setattr(store_module, "PROGRESS_EVERY_S", 0.0)
    fgv.insert(_prices(*_BIG))
    assert capsys.readouterr().out.splitlines() == [
        "[feature store] fg_prices_v1: 2 of 5 rows online (1 of 3 transactions)",
        "[feature store] fg_prices_v1: 4 of 5 rows online (2 of 3 transactions)"]
    online.calls.clear()
    fgv.insert(_prices(["f", "g"], [7.0, 8.0], ["2020-01-04", "2020-01-04"]))  # fits: one transaction
    assert online.calls == [(["f", "g"], True)]
    with pytest.raises(ValueError, match="max_txn_rows must be >= 1"):
        FeatureStore(Workdir.at(tmp_path), online, max_txn_rows=0)


def _large_insert_dying_after_its_first_transaction(tmp_path):
    online = Transactions()
    online.fail_at, online.fail_with = 2, Died()
    fs = FeatureStore(Workdir.at(tmp_path), online, max_txn_rows=2)
    fgv = fs.create_feature_group(PRICES)
    with pytest.raises(Died):
        fgv.insert(_prices(*_BIG))
    online.fail_at = None
    return fs, fgv, online


def test_a_large_insert_that_died_between_its_transactions_is_finished_by_the_next_open(tmp_path):
    fs, fgv, online = _large_insert_dying_after_its_first_transaction(tmp_path)
    assert set(fgv.read_online(["a", "b", "c", "d", "e"])) == {"a", "b"}  # the first transaction's rows
    assert fgv.offline.commits() == [] and [c.commit for c in fgv.offline.pending()] == [1]
    fresh = FeatureStore(fs.wd, online, max_txn_rows=3).get_feature_group("prices", 1)  # goes forward
    (commit,) = fresh.offline.commits()
    assert commit["online_rows"] == 5 and "recovered_at" in commit and fresh.offline.pending() == []
    assert online.calls[-2:] == [(["a", "b", "c"], False), (["d", "e"], True)]
    assert sorted(fresh.read()["price"]) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert assert_online_equals_latest_offline(fresh).keys() == {"a", "b", "c", "d", "e"}


def test_a_large_insert_is_finished_into_its_table_even_when_the_table_was_dropped(tmp_path):
    from feature_store.store import _TABLES

    fs, fgv, online = _large_insert_dying_after_its_first_transaction(tmp_path)
    online.drop_table(fgv.spec)
    _TABLES.clear()  # a fresh process
    fresh = FeatureStore(fs.wd, online, max_txn_rows=2).get_feature_group("prices", 1)
    assert [c["commit"] for c in fresh.offline.commits()] == [1]
    assert assert_online_equals_latest_offline(fresh).keys() == {"a", "b", "c", "d", "e"}


def test_a_large_insert_whose_online_write_failed_is_finished_by_the_next_insert(tmp_path):
    online = Transactions()
    online.fail_at = 3
    fgv = FeatureStore(Workdir.at(tmp_path), online, max_txn_rows=2).create_feature_group(PRICES)
    with pytest.raises(ConnectionError, match="mid-write") as failed:
        fgv.insert(_prices(*_BIG))
    assert "2 committed. It stays staged" in failed.value.__notes__[0]
    assert [c.commit for c in fgv.offline.pending()] == [1] and fgv.read().empty
    online.fail_at = None
    assert fgv.insert(_prices(["f"], [7.0], ["2020-01-04"])).commit == 2  # settles commit 1 first
    assert [c["commit"] for c in fgv.offline.commits()] == [1, 2] and fgv.offline.pending() == []
    assert len(fgv.read()) == 7
    assert_online_equals_latest_offline(fgv)


def test_a_large_insert_refused_before_any_transaction_is_removed(tmp_path):
    online = Transactions()
    online.fail_at, online.fail_with = 1, ValueError("row 0: bad value")
    fgv = FeatureStore(Workdir.at(tmp_path), online, max_txn_rows=2).create_feature_group(PRICES)
    with pytest.raises(ValueError, match="bad value"):
        fgv.insert(_prices(*_BIG))
    assert fgv.offline.pending() == [] and fgv.offline.commits() == [] and fgv.read_online(["a"]) == {}


def test_describe_lists_versions_rows_and_freshness(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    fgv = fs.create_feature_group(PRICES)
    fgv.insert(_prices(["a", "b", "a"], [1.0, 2.0, 3.0], ["2020-01-01", "2020-01-01", "2020-01-02"]))
    (row,) = fs.describe()
    assert row["group"] == "prices" and row["version"] == 1 and row["offline_rows"] == 3
    assert row["online_rows"] == 2 and row["online_max_event_time"] == "2020-01-02 00:00:00"
    assert row["freshness_s"] > 0 and row["pending_commits"] == 0


def test_registry_lets_another_store_instance_decode(tmp_path):
    online = InMemoryOnlineStore()
    ref = FeatureStore(Workdir.at(tmp_path), online).write("customer_history", _history(), progress=False)
    from feature_store.store import _TABLES

    _TABLES.clear()  # a fresh process: the definition comes from the online registry
    assert read_online(online, ref, "customer_history", ["c1"], ["purchased"]) == {"c1": {"purchased": ["a2", "a1"]}}


# --- retiring old versions from the online store -----------------------------------------------


def _three_versions(tmp_path):
    fs = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore())
    for i in range(3):
        fs.create_feature_group(PRICES).insert(_prices(["a", "b"], [1.0 + i, 2.0], ["2020-01-01", "2020-01-02"]))
    return fs


def test_retiring_drops_old_online_tables_and_keeps_their_offline_rows(tmp_path):
    fs = _three_versions(tmp_path)
    assert fs.retire_online(keep=2, dry_run=True) == [
        {"group": "prices", "version": 1, "online_table": "fg_prices_v1", "online_rows": 2}]
    assert "fg_prices_v1" in fs.online.list_tables()  # a dry run changes nothing
    assert fs.retire_online(keep=2) == [
        {"group": "prices", "version": 1, "online_table": "fg_prices_v1", "online_rows": 2}]
    assert sorted(fs.online.list_tables()) == ["fg_prices_v2", "fg_prices_v3", "fs_feature_groups", "fs_offline_commits"]
    assert fs.retire_online(keep=2) == []  # done: nothing left to do
    v1 = FeatureStore(Workdir.at(tmp_path), fs.online).get_feature_group("prices", 1)  # a fresh reader
    assert v1.retired_at is not None and not v1.online_enabled and v1.ref.online_table is None
    assert v1.read()["price"].tolist() == [1.0, 2.0]  # the Parquet files stay
    with pytest.raises(ValueError, match=r"'prices' v1 was retired from the online store at .*offline only"):
        v1.read_online(["a"])
    with pytest.raises(ValueError, match=r"'prices' v1 was retired .*takes no more rows: write a new version"):
        v1.insert(_prices(["c"], [3.0], ["2020-01-03"]))
    assert len(v1.read()) == 2 and v1.offline.pending() == []  # the refused insert staged nothing
    (row,) = [r for r in fs.describe() if r["version"] == 1]
    assert row["online"] is False and row["online_table"] is None and row["online_retired_at"] == v1.retired_at
    assert fs.get_feature_group("prices", 2).read_online(["a"])["a"]["price"] == 2.0  # the kept ones still serve
    assert fs.create_feature_group(PRICES).version == 4  # the number is not given out again


def test_retiring_never_touches_a_protected_version_and_checks_its_arguments(tmp_path):
    fs = _three_versions(tmp_path)
    assert [r["version"] for r in fs.retire_online(keep=1, protect={("prices", 1)})] == [2]
    assert sorted(t for t in fs.online.list_tables() if t.startswith("fg_")) == ["fg_prices_v1", "fg_prices_v3"]
    with pytest.raises(ValueError, match=r"'prices' v1 is what the manifest serves"):
        fs.retire_version("prices", 1, protect={("prices", 1)})
    assert fs.retire_version("prices", 1)["online_rows"] == 2
    for keep in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep must be an integer >= 1"):
            fs.retire_online(keep=keep)
    with pytest.raises(ValueError, match=r"no feature group 'nope'.*\['prices'\]"):
        fs.retire_online(keep=1, groups=["nope"])
    with pytest.raises(ValueError, match="open the feature store with its online store"):
        FeatureStore(fs.wd, None).retire_online(keep=1)


def test_an_insert_left_staged_is_settled_before_its_version_is_retired(tmp_path, monkeypatch):
    wd = Workdir.at(tmp_path)
    online = InMemoryOnlineStore()
    fgv = FeatureStore(wd, online).create_feature_group(PRICES)
    fgv.insert(_prices(["a"], [1.0], ["2020-01-01"]))
    monkeypatch.setattr(OfflineTable, "publish", _die)  # dies after its online commit, before the publish
    with pytest.raises(Died):
        fgv.insert(_prices(["b"], [2.0], ["2020-01-02"]))
    monkeypatch.undo()
    fs = FeatureStore(wd, online)
    fs.create_feature_group(PRICES)
    fs.retire_version("prices", 1)
    v1 = fs.get_feature_group("prices", 1)
    assert sorted(v1.read()["item"]) == ["a", "b"] and v1.offline.pending() == []


def test_a_retirement_that_died_before_the_drop_is_finished_by_the_next_one(tmp_path, monkeypatch):
    fs = _three_versions(tmp_path)
    monkeypatch.setattr(InMemoryOnlineStore, "drop_table", _die)
    with pytest.raises(Died):
        fs.retire_online(keep=2)
    monkeypatch.undo()
    fresh = FeatureStore(fs.wd, fs.online)
    assert fresh.get_feature_group("prices", 1).retired_at is not None  # recorded before the drop
    assert "fg_prices_v1" in fresh.online.list_tables()
    assert [r["version"] for r in fresh.retire_online(keep=2)] == [1]
    assert "fg_prices_v1" not in fresh.online.list_tables()


def test_an_insert_into_a_version_another_process_retired_is_refused_and_recreates_nothing(tmp_path):
    fs = _three_versions(tmp_path)
    stale = fs.get_feature_group("prices", 1)  # opened before the retirement
    FeatureStore(fs.wd, fs.online).retire_version("prices", 1)
    with pytest.raises(ValueError, match="was retired from the online store"):
        stale.insert(_prices(["c"], [3.0], ["2020-01-03"]))
    assert "fg_prices_v1" not in fs.online.list_tables() and stale.offline.pending() == []


def test_an_empty_insert_makes_an_empty_commit(tmp_path):
    """An empty frame, or one whose every row validation drops, is a commit of no rows, not a crash."""
    fgv = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore()).create_feature_group(PRICES)
    empty = _prices([], [], [])
    assert fgv.insert(empty).rows == 0
    assert fgv.insert(_prices([None], [1.0], ["2020-01-01"], ["x"]), validation="always").rows == 0
    assert [c["rows"] for c in fgv.offline.commits()] == [0, 0] and fgv.read().empty
    assert fgv.insert(_prices(["a"], [1.0], ["2020-01-01"])).rows == 1


def test_reads_bounded_by_times_with_an_offset_find_the_rows_of_every_utc_day(tmp_path):
    """The files are named by their rows' UTC dates: a bound at 00:30+03:00 on the 2nd is 21:30 UTC
    on the 1st, so the 1st's file must be read too."""
    fgv = FeatureStore(Workdir.at(tmp_path), InMemoryOnlineStore()).create_feature_group(PRICES)
    fgv.insert(_prices(["a", "b"], [1.0, 2.0], ["2020-01-01 22:00", "2020-01-02 02:00"]))
    assert fgv.read(start="2020-01-02T00:30:00+03:00")["item"].tolist() == ["a", "b"]
    assert fgv.read(end="2020-01-01T23:00:00-05:00")["item"].tolist() == ["a", "b"]
    assert fgv.read(start="2020-01-01T23:30:00-01:00")["item"].tolist() == ["b"]
