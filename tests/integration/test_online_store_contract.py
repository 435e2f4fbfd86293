"""One contract for every OnlineStore: the in-memory fake and the real MySQL store behave alike."""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator

import numpy as np
import pymysql
import pytest

from feature_store.online.base import (
    InMemoryOnlineStore,
    OnlineStore,
    SchemaMismatch,
    TableNotFound,
    TableSpec,
)
from feature_store.online.mysql import MySQLOnlineStore

ALL_TYPES = {"id": "int64", "n": "int64", "x": "float64", "s": "string", "j": "json"}


@pytest.fixture(params=["memory", pytest.param("mysql", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> Iterator[OnlineStore]:
    if request.param == "memory":
        s: OnlineStore = InMemoryOnlineStore()
    else:
        db = request.getfixturevalue("mariadb")
        s = MySQLOnlineStore.from_config(db.cfg, db.password)
    s.test_prefix = f"c{uuid.uuid4().hex[:10]}_"  # type: ignore[attr-defined]
    yield s
    try:
        for name in s.list_tables():
            if name.startswith(s.test_prefix):  # type: ignore[attr-defined]
                s.drop_table(TableSpec(name, "k", {"k": "int64"}))
    finally:
        s.close()


def make_spec(
    store: OnlineStore, name: str, key: str = "id", columns: dict[str, str] | None = None
) -> TableSpec:
    """A table spec with a name unique to this test, created in `store`."""
    spec = TableSpec(store.test_prefix + name, key, dict(columns or ALL_TYPES))  # type: ignore[attr-defined]
    store.ensure_table(spec)
    return spec


def test_round_trip_of_all_column_types(store: OnlineStore) -> None:
    spec = make_spec(store, "types")
    rows = [
        {"id": 1, "n": 2**62, "x": 0.1, "s": "plain", "j": [101, 202, 303]},
        {"id": -2, "n": -(2**63), "x": 1 / 3, "s": "ünïcødé ✓ 🎉", "j": {"a": [1, 2.5, None], "b": "x"}},
        {"id": 3, "n": None, "x": float("nan"), "s": None, "j": None},
        {"id": 4, "n": np.int64(7), "x": np.float32(0.5), "s": "", "j": np.array([5, 6, 7])},
        {"id": np.int64(5), "x": 1e300, "j": []},  # missing columns are stored as None
        {"id": 6, "n": 0, "x": -0.0, "s": "quote ' back\\slash \" ;--", "j": "a json string"},
    ]
    assert store.write_batch(spec, rows) == len(rows)
    got = store.read_batch(spec, [1, -2, 3, 4, 5, 6])
    assert got == {
        1: {"id": 1, "n": 2**62, "x": 0.1, "s": "plain", "j": [101, 202, 303]},
        -2: {"id": -2, "n": -(2**63), "x": 1 / 3, "s": "ünïcødé ✓ 🎉", "j": {"a": [1, 2.5, None], "b": "x"}},
        3: {"id": 3, "n": None, "x": None, "s": None, "j": None},
        4: {"id": 4, "n": 7, "x": 0.5, "s": "", "j": [5, 6, 7]},
        5: {"id": 5, "n": None, "x": 1e300, "s": None, "j": []},
        6: {"id": 6, "n": 0, "x": -0.0, "s": "quote ' back\\slash \" ;--", "j": "a json string"},
    }
    assert all(type(k) is int for k in got)
    assert type(got[4]["n"]) is int and type(got[4]["x"]) is float


def test_string_keys_are_exact_and_case_sensitive(store: OnlineStore) -> None:
    spec = make_spec(store, "skeys", key="cid", columns={"cid": "string", "v": "float64", "items": "json"})
    rows = [{"cid": "abc", "v": 1.0}, {"cid": "ABC", "v": 2.0}, {"cid": "x" * 64, "items": ["0108775015"]}]
    store.write_batch(spec, rows)
    got = store.read_batch(spec, ["abc", "ABC", "x" * 64, "nope"], columns=["v", "items"])
    assert got == {
        "abc": {"v": 1.0, "items": None},
        "ABC": {"v": 2.0, "items": None},
        "x" * 64: {"v": None, "items": ["0108775015"]},
    }


def test_upsert_overwrites_whole_rows(store: OnlineStore) -> None:
    spec = make_spec(store, "upsert")
    store.write_batch(spec, [{"id": 1, "n": 1, "x": 1.0, "s": "a", "j": [1]}, {"id": 2, "n": 2}])
    store.write_batch(spec, [{"id": 1, "n": 10, "s": "b"}, {"id": 3, "j": [3]}])
    got = store.read_batch(spec, [1, 2, 3])
    assert got[1] == {"id": 1, "n": 10, "x": None, "s": "b", "j": None}
    assert got[2] == {"id": 2, "n": 2, "x": None, "s": None, "j": None}
    assert got[3]["j"] == [3]
    # the same key twice in one batch: the last row wins
    store.write_batch(spec, [{"id": 4, "n": 1}, {"id": 4, "n": 2}])
    assert store.read_batch(spec, [4], columns=["n"]) == {4: {"n": 2}}


def test_read_of_missing_keys_duplicates_and_column_subsets(store: OnlineStore) -> None:
    spec = make_spec(store, "reads")
    store.write_batch(spec, [{"id": i, "n": i * 10, "j": [i]} for i in range(5)])
    assert store.read_batch(spec, [100, 101]) == {}
    assert store.read_batch(spec, []) == {}
    got = store.read_batch(spec, [np.int64(1), 1, 4, 99], columns=["j", "n"])
    assert got == {1: {"j": [1], "n": 10}, 4: {"j": [4], "n": 40}}
    assert list(got[1]) == ["j", "n"]  # in the requested order
    with pytest.raises(ValueError, match="'nope'"):
        store.read_batch(spec, [1], columns=["nope"])
    with pytest.raises(ValueError, match="invalid key"):
        store.read_batch(spec, ["not-an-int"])


def test_one_query_per_read_whatever_the_number_of_keys(store: OnlineStore) -> None:
    spec = make_spec(store, "onequery")
    store.write_batch(spec, [{"id": i, "n": i, "x": i / 7, "j": [i, i + 1]} for i in range(2000)])
    for n_keys in (1, 100, 1500):
        before = store.statement_count()
        got = store.read_batch(spec, list(range(n_keys)) + [10_000_000])
        assert store.statement_count() - before == 1, n_keys
        assert len(got) == n_keys


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"n": 1}, r"row 2: missing key column 'id'"),
        ({"id": 9, "bogus": 1}, r"row 2: unknown column 'bogus'"),
        ({"id": 9, "n": "seven"}, r"row 2: column 'n' \(int64\)"),
        ({"id": 9, "x": float("inf")}, r"row 2: column 'x' \(float64\)"),
        ({"id": 9, "s": "y" * 256}, r"row 2: column 's' \(string\)"),
        ({"id": 9, "j": {1, 2}}, r"row 2: column 'j' \(json\)"),
        ({"id": None}, r"row 2: column 'id'"),
    ],
)
def test_a_bad_row_means_nothing_is_written(store: OnlineStore, bad_row: dict, expected: str) -> None:
    spec = make_spec(store, "atomic")
    store.write_batch(spec, [{"id": 1, "n": 1}])
    with pytest.raises(ValueError, match=expected):
        store.write_batch(spec, [{"id": 1, "n": 100}, {"id": 2, "n": 2}, bad_row, {"id": 3}])
    assert store.read_batch(spec, [1, 2, 3]) == {1: {"id": 1, "n": 1, "x": None, "s": None, "j": None}}


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda: TableSpec("bad-name", "id", {"id": "int64"}), "bad-name"),
        (lambda: TableSpec("t; DROP TABLE x", "id", {"id": "int64"}), "t; DROP TABLE x"),
        (lambda: TableSpec("t", "id", {"id": "int64", "x y": "float64"}), "x y"),
        (lambda: TableSpec("t", "id", {"id": "int64", "`x`": "float64"}), "`x`"),
        (lambda: TableSpec("t", "id", {"id": "int64", "x": "blob"}), "blob"),
        (lambda: TableSpec("t", "k", {"id": "int64"}), "k"),
        (lambda: TableSpec("t", "id", {"id": "float64"}), "float64"),
        (lambda: TableSpec("t" * 65, "id", {"id": "int64"}), "t" * 65),
    ],
)
def test_invalid_identifiers_are_rejected_by_name(make, bad: str) -> None:
    with pytest.raises(ValueError) as e:
        make()
    assert repr(bad) in str(e.value)


def test_invalid_database_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="'no-such db'"):
        MySQLOnlineStore("127.0.0.1", 1, "no-such db", "u", "p")


def test_table_lifecycle(store: OnlineStore) -> None:
    spec = make_spec(store, "life")
    store.ensure_table(spec)  # idempotent
    assert spec.name in store.list_tables()
    with pytest.raises(SchemaMismatch, match="'extra'"):
        store.ensure_table(TableSpec(spec.name, "id", {**ALL_TYPES, "extra": "float64"}))
    with pytest.raises(SchemaMismatch, match="'x' is float64, spec wants string"):
        store.ensure_table(TableSpec(spec.name, "id", {**ALL_TYPES, "x": "string"}))
    # a compatible subset of the columns is fine and leaves the other columns alone
    store.write_batch(spec, [{"id": 1, "n": 1, "s": "keep"}])
    narrow = TableSpec(spec.name, "id", {"id": "int64", "n": "int64"})
    store.ensure_table(narrow)
    store.write_batch(narrow, [{"id": 1, "n": 2}])
    assert store.read_batch(spec, [1], columns=["n", "s"]) == {1: {"n": 2, "s": "keep"}}
    store.drop_table(spec)
    store.drop_table(spec)  # idempotent
    assert spec.name not in store.list_tables()
    with pytest.raises(TableNotFound):
        store.read_batch(spec, [1])
    with pytest.raises(TableNotFound):
        store.write_batch(spec, [{"id": 1}])


def test_concurrent_reads_from_threads(store: OnlineStore) -> None:
    spec = make_spec(store, "threads")
    store.write_batch(spec, [{"id": i, "n": i, "j": [i]} for i in range(300)])
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for r in range(20):
                keys = [(offset * 37 + r * 11 + k) % 300 for k in range(50)]
                got = store.read_batch(spec, keys, columns=["n", "j"])
                assert all(got[k] == {"n": k, "j": [k]} for k in keys)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# --- MySQL only ---------------------------------------------------------------------------


@pytest.fixture
def mysql_store(mariadb) -> Iterator[MySQLOnlineStore]:
    s = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password, chunk_size=2)
    yield s
    s.close()


@pytest.mark.integration
def test_mysql_failure_mid_transaction_rolls_back(mysql_store, monkeypatch) -> None:
    spec = TableSpec(f"c{uuid.uuid4().hex[:10]}_rollback", "id", {"id": "int64", "n": "int64"})
    mysql_store.ensure_table(spec)
    try:
        mysql_store.write_batch(spec, [{"id": 0, "n": 0}])
        calls = {"n": 0}
        original = pymysql.cursors.Cursor.executemany

        def flaky(self, query, args):
            calls["n"] += 1
            if calls["n"] == 3:  # chunks 1 and 2 already went to the server
                raise RuntimeError("boom in chunk 3")
            return original(self, query, args)

        monkeypatch.setattr(pymysql.cursors.Cursor, "executemany", flaky)
        with pytest.raises(RuntimeError, match="boom"):
            mysql_store.write_batch(spec, [{"id": i, "n": -i} for i in range(6)])
        monkeypatch.undo()
        assert calls["n"] == 3
        assert mysql_store.read_batch(spec, range(6)) == {0: {"id": 0, "n": 0}}
        assert mysql_store.write_batch(spec, [{"id": i, "n": -i} for i in range(6)]) == 6
        assert len(mysql_store.read_batch(spec, range(6))) == 6
    finally:
        mysql_store.drop_table(spec)


@pytest.mark.integration
def test_mysql_server_info(mysql_store) -> None:
    info = mysql_store.server_info()
    assert info["engine"] in ("InnoDB", "NDBCLUSTER")
    assert "MariaDB" in info["version"] or info["version"][0].isdigit()
    assert "password" not in repr(info).lower() and "password" not in repr(mysql_store).lower()


@pytest.mark.integration
def test_mysql_server_statement_count_sees_other_connections(mariadb, mysql_store) -> None:
    """The server-wide count (what serve_load divides by requests) includes every client's
    statements, unlike the session count."""
    other = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)
    try:
        before = mysql_store.server_statement_count()
        for _ in range(3):
            other.ping()
        seen = mysql_store.server_statement_count() - before - 1  # less its own second read
        assert seen >= 3
    finally:
        other.close()


@pytest.mark.integration
def test_mysql_wrong_password_is_a_connection_error(mariadb) -> None:
    with pytest.raises(ConnectionError, match="Access denied"):
        MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password + "x")


@pytest.mark.integration
def test_mysql_store_is_not_picklable(mysql_store) -> None:
    import pickle

    with pytest.raises(TypeError, match="from_config"):
        pickle.dumps(mysql_store)


@pytest.mark.integration
def test_mysql_reconnects_after_server_restart(mariadb, mysql_store) -> None:
    spec = TableSpec(f"c{uuid.uuid4().hex[:10]}_restart", "id", {"id": "int64", "x": "float64"})
    mysql_store.ensure_table(spec)
    try:
        mysql_store.write_batch(spec, [{"id": 1, "x": 1.5}])
        assert mysql_store.read_batch(spec, [1]) == {1: {"id": 1, "x": 1.5}}
        old_pid = mariadb.server.status()["pid"]
        assert mariadb.server.stop() is True
        with pytest.raises(ConnectionError):
            mysql_store.read_batch(spec, [1])
        mariadb.server.start()
        assert mariadb.server.status()["pid"] != old_pid
        # same store object, no re-creation: reads and writes work again
        assert mysql_store.read_batch(spec, [1]) == {1: {"id": 1, "x": 1.5}}
        assert mysql_store.write_batch(spec, [{"id": 2, "x": math.pi}]) == 1
        # a restart while the store is idle is also survived
        mariadb.server.stop()
        mariadb.server.start()
        assert mysql_store.read_batch(spec, [1, 2], columns=["x"]) == {1: {"x": 1.5}, 2: {"x": math.pi}}
    finally:
        if not mariadb.server.status()["running"]:
            mariadb.server.start()
        mysql_store.drop_table(spec)


# --- packed rows, conditional upserts, read-modify-write (feature store) ------------------------

PACKED = {"k": "string", "ts": "int64", "v": "bytes"}


def test_bytes_round_trip_and_read_concat(store: OnlineStore) -> None:
    spec = make_spec(store, "blobs", key="k", columns=PACKED)
    blobs = {"a": b"\x00\x01'\";--", "b": bytes(range(256)), "c": b""}
    store.write_batch(spec, [{"k": k, "ts": 1, "v": v} for k, v in blobs.items()])
    assert store.read_batch(spec, ["a", "b", "c"], columns=["v"]) == {k: {"v": v} for k, v in blobs.items()}
    got = store.read_concat(spec, ["b", "a", "zz", "a"], "v")  # order unspecified, duplicates read once
    assert got in (blobs["a"] + blobs["b"], blobs["b"] + blobs["a"])
    assert store.read_concat(spec, ["nope"], "v") == b""
    assert store.read_concat(spec, [], "v") == b""
    with pytest.raises(ValueError, match="not a bytes column"):
        store.read_concat(spec, ["a"], "ts")
    with pytest.raises(ValueError, match="bytes"):
        store.write_batch(spec, [{"k": "x", "v": "text"}])


def test_read_concat_with_keys_that_need_escaping_and_int_keys(store: OnlineStore) -> None:
    spec = make_spec(store, "ckeys", key="k", columns=PACKED)
    keys = ["plain", "it's", 'a"b', "back\\slash", "nul\x00", "new\nline", "%s", "ünï ✓", "x' OR '1'='1"]
    store.write_batch(spec, [{"k": k, "ts": 1, "v": f"<{i}>".encode()} for i, k in enumerate(keys)])
    for wanted in (keys, keys[:1] + ["%s", "x;--"], keys[1:3]):
        got = store.read_concat(spec, wanted, "v")
        want = sorted(f"<{keys.index(k)}>".encode() for k in wanted if k in keys)
        assert sorted(got.replace(b"><", b">\n<").split(b"\n")) == want
    ints = make_spec(store, "cints", key="k", columns={"k": "int64", "v": "bytes"})
    store.write_batch(ints, [{"k": k, "v": str(k).encode() + b";"} for k in (-(2**63), -1, 0, 2**63 - 1)])
    got = store.read_concat(ints, [np.int64(-1), 2**63 - 1, 5, -(2**63)], "v")
    assert sorted(got.split(b";")[:-1]) == sorted([b"-1", str(2**63 - 1).encode(), str(-(2**63)).encode()])


def _pieces(got: bytes) -> list[bytes]:
    return got.replace(b"><", b">\n<").split(b"\n") if got else []


def test_read_concat_arranges_values_as_its_concat_order_says(store: OnlineStore) -> None:
    spec = make_spec(store, "corder", key="k", columns=PACKED)
    keys = ["m", "it's", "a", "ünï", "z\x00", "b", "%s"]
    store.write_batch(spec, [{"k": k, "ts": 1, "v": f"<{i}>".encode()} for i, k in enumerate(keys)])
    for asked in (["b", "zz", "it's", "a", "b", "m", "ünï", "z\x00"], ["m", "b", "a", "%s"], keys[::-1]):
        got = _pieces(store.read_concat(spec, asked, "v"))
        stored = [k for k in dict.fromkeys(asked) if k in keys]
        assert sorted(got) == sorted(f"<{keys.index(k)}>".encode() for k in stored)
        if store.concat_order == "request":
            assert got == [f"<{keys.index(k)}>".encode() for k in stored]
    ints = make_spec(store, "corder_i", key="k", columns={"k": "int64", "v": "bytes"})
    store.write_batch(ints, [{"k": k, "v": f"<{k}>".encode()} for k in (5, -3, 2**63 - 1, 0)])
    got = _pieces(store.read_concat(ints, [0, 7, 2**63 - 1, np.int64(-3), 0], "v"))
    want = [b"<0>", f"<{2**63 - 1}>".encode(), b"<-3>"]
    assert (got == want) if store.concat_order == "request" else (sorted(got) == sorted(want))


def test_dictionary_codes_are_unique_exact_and_stable(store: OnlineStore) -> None:
    tag = uuid.uuid4().hex[:8]  # the dictionary is one table for the whole database
    values = [f"{v}{tag}" for v in ("Ladieswear", "it's", "'; DROP TABLE x; --", "ünï ✓ 🎉", "\x1f\x1e")]
    values += [f"pad{tag} ", f"pad{tag}", f"PAD{tag}"]  # exact: trailing spaces and case count
    got = store.dictionary_assign(values + values[:2])
    assert sorted(got) == sorted(values) and len(set(got.values())) == len(values) and min(got.values()) > 0
    assert store.dictionary_assign(values[::-1]) == got  # stable
    later = store.dictionary_assign([f"new{tag}"])[f"new{tag}"]
    assert later > max(got.values())
    entries = dict(store.dictionary_entries(min(got.values()) - 1))
    assert all(entries[c] == v for v, c in got.items()) and entries[later] == f"new{tag}"
    assert store.dictionary_entries(later) == [] or min(c for c, _ in store.dictionary_entries(later)) > later
    with pytest.raises(ValueError, match="expected a str"):
        store.dictionary_assign([f"ok{tag}", 3])
    with pytest.raises(ValueError, match="bytes, above 1020"):
        store.dictionary_assign([f"ok{tag}", "é" * 600])
    assert f"ok{tag}" not in {v for _, v in store.dictionary_entries()}  # a refused call assigns nothing
    assert store.dictionary_assign([]) == {}


def test_read_concat_is_one_query(store: OnlineStore) -> None:
    spec = make_spec(store, "concat1", key="k", columns=PACKED)
    store.write_batch(spec, [{"k": f"{i:06d}", "ts": i, "v": b"x" * 50} for i in range(1200)])
    before = store.statement_count()
    got = store.read_concat(spec, [f"{i:06d}" for i in range(1000)] + ["missing"], "v")
    assert store.statement_count() - before == 1
    assert got == b"x" * 50_000


def test_read_concat_many_reads_several_tables_in_one_statement(store: OnlineStore) -> None:
    a = make_spec(store, "many_a", key="k", columns=PACKED)
    b = make_spec(store, "many_b", key="k", columns={"k": "int64", "v": "bytes"})
    store.write_batch(a, [{"k": f"a{i}", "ts": 1, "v": f"<a{i}>".encode()} for i in range(5)])
    store.write_batch(b, [{"k": i, "v": f"<b{i}>".encode()} for i in range(5)])
    reads = [(a, ["a3", "a1", "zz"], "v"), (b, [], "v"), (b, [4, 0, 99], "v"), (a, ["nope"], "v")]
    before = store.statement_count()
    got = store.read_concat_many(reads)
    assert store.statement_count() - before == 1
    assert got == [store.read_concat(*r) for r in reads]
    assert sorted(got[0].replace(b"><", b">\n<").split(b"\n")) == [b"<a1>", b"<a3>"]
    assert sorted(got[2].replace(b"><", b">\n<").split(b"\n")) == [b"<b0>", b"<b4>"]
    assert got[1] == got[3] == b""
    # keys that must be bound as parameters next to inlined ones: still right, a read each
    odd = store.read_concat_many([(a, ["it's", "a2"], "v"), (b, [1], "v")])
    assert odd == [b"<a2>", b"<b1>"]
    with pytest.raises(ValueError, match="not a bytes column"):
        store.read_concat_many([(a, ["a1"], "v"), (a, ["a1"], "ts")])


def test_conditional_upsert_keeps_newer_rows(store: OnlineStore) -> None:
    spec = make_spec(store, "newer", key="k", columns=PACKED)
    store.write_batch(spec, [{"k": "a", "ts": 10, "v": b"a10"}, {"k": "b", "ts": 10, "v": b"b10"}], newer_column="ts")
    # a late row (older event time) does not replace; an equal time does (the later write wins)
    store.write_batch(spec, [{"k": "a", "ts": 5, "v": b"a5"}, {"k": "b", "ts": 10, "v": b"b10bis"},
                             {"k": "c", "ts": 1, "v": b"c1"}], newer_column="ts")
    # within one batch: the largest time wins, ties go to the later row
    store.write_batch(spec, [{"k": "d", "ts": 3, "v": b"d3"}, {"k": "d", "ts": 7, "v": b"d7"},
                             {"k": "d", "ts": 2, "v": b"d2"}, {"k": "e", "ts": 4, "v": b"e4a"},
                             {"k": "e", "ts": 4, "v": b"e4b"}], newer_column="ts")
    got = store.read_batch(spec, ["a", "b", "c", "d", "e"], columns=["ts", "v"])
    assert got == {"a": {"ts": 10, "v": b"a10"}, "b": {"ts": 10, "v": b"b10bis"}, "c": {"ts": 1, "v": b"c1"},
                   "d": {"ts": 7, "v": b"d7"}, "e": {"ts": 4, "v": b"e4b"}}
    with pytest.raises(ValueError, match="newer_column"):
        store.write_batch(spec, [{"k": "a", "ts": 1}], newer_column="v")


def test_a_marker_row_commits_with_its_batch_or_not_at_all(store: OnlineStore) -> None:
    spec = make_spec(store, "marked", columns={"id": "int64", "n": "int64"})
    markers = make_spec(store, "markers", key="m", columns={"m": "string", "n": "int64"})
    assert store.write_batch(spec, [{"id": 1, "n": 1}, {"id": 2, "n": 2}], marker=(markers, {"m": "one", "n": 2})) == 2
    assert store.read_batch(markers, ["one"]) == {"one": {"m": "one", "n": 2}}
    assert store.write_batch(spec, [], marker=(markers, {"m": "empty", "n": 0})) == 0  # written all the same
    assert store.write_batch(spec, [{"id": 1, "n": 9}], marker=(markers, {"m": "one", "n": 1})) == 1  # a retry
    assert store.read_batch(markers, ["one", "empty"]) == {"one": {"m": "one", "n": 1}, "empty": {"m": "empty", "n": 0}}
    with pytest.raises(ValueError, match="n"):  # a bad marker: nothing of the batch either
        store.write_batch(spec, [{"id": 3, "n": 3}], marker=(markers, {"m": "bad", "n": "x"}))
    assert store.read_batch(spec, [3]) == {} and store.read_batch(markers, ["bad"]) == {}


def test_table_stats(store: OnlineStore) -> None:
    spec = make_spec(store, "stats", key="k", columns=PACKED)
    assert store.table_stats(spec, "ts") == {"rows": 0, "max": None}
    store.write_batch(spec, [{"k": str(i), "ts": i * 10, "v": b""} for i in range(5)])
    assert store.table_stats(spec, "ts") == {"rows": 5, "max": 40}
    assert store.table_stats(spec)["rows"] == 5


def test_update_rows_is_atomic_and_once(store: OnlineStore) -> None:
    spec = make_spec(store, "rmw", key="k", columns={"k": "string", "n": "int64"})
    once = make_spec(store, "once", key="event_id", columns={"event_id": "string", "at": "int64"})
    store.write_batch(spec, [{"k": "a", "n": 1}])

    def add_one(rows):
        a, b = rows
        return [(spec, {"k": "a", "n": a["n"] + 1}), (spec, {"k": "b", "n": (b["n"] if b else 0) + 1})]

    assert store.update_rows([(spec, "a"), (spec, "b")], add_one, once=(once, {"event_id": "e1", "at": 1})) is True
    assert store.update_rows([(spec, "a"), (spec, "b")], add_one, once=(once, {"event_id": "e1", "at": 2})) is False
    assert store.read_batch(spec, ["a", "b"], columns=["n"]) == {"a": {"n": 2}, "b": {"n": 1}}

    def boom(rows):
        raise RuntimeError("boom in update")

    with pytest.raises(RuntimeError, match="boom"):
        store.update_rows([(spec, "a")], boom, once=(once, {"event_id": "e2", "at": 3}))
    with pytest.raises(ValueError, match="column 'n'"):
        store.update_rows([(spec, "a")], lambda rows: [(spec, {"k": "a", "n": "x"})], once=(once, {"event_id": "e3"}))
    # neither failure left anything behind: the event ids are free, the rows unchanged
    assert store.read_batch(once, ["e2", "e3"]) == {}
    assert store.read_batch(spec, ["a"], columns=["n"]) == {"a": {"n": 2}}


def test_upper_case_identifiers_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'FN'.*\[a-z_\]"):
        TableSpec("t", "id", {"id": "int64", "FN": "float64"})
    with pytest.raises(ValueError, match="'Articles'"):
        TableSpec("Articles", "id", {"id": "int64"})


@pytest.mark.integration
def test_mysql_update_rows_applies_a_concurrent_event_once(mariadb) -> None:
    """Two connections apply the same event at once: exactly one applies it."""
    prefix = f"c{uuid.uuid4().hex[:10]}_"
    spec = TableSpec(prefix + "cnt", "k", {"k": "string", "n": "int64"})
    once = TableSpec(prefix + "ev", "event_id", {"event_id": "string", "at": "int64"})
    stores = [MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password) for _ in range(2)]
    try:
        stores[0].ensure_table(spec)
        stores[0].ensure_table(once)
        barrier = threading.Barrier(2)
        results: list[bool] = []

        def bump(rows):
            return [(spec, {"k": "a", "n": (rows[0]["n"] if rows[0] else 0) + 1})]

        def worker(s: MySQLOnlineStore) -> None:
            barrier.wait()
            results.append(s.update_rows([(spec, "a")], bump, once=(once, {"event_id": "same", "at": 1})))

        threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]
        assert stores[0].read_batch(spec, ["a"], columns=["n"]) == {"a": {"n": 1}}
    finally:
        stores[0].drop_table(spec)
        stores[0].drop_table(once)
        for s in stores:
            s.close()


@pytest.mark.integration
def test_mysql_concurrent_writers_get_the_same_codes(mariadb) -> None:
    """Four connections assign overlapping new values at once: one code per value, whoever won."""
    tag = uuid.uuid4().hex[:8]
    values = [f"v{i}-{tag}" for i in range(60)]
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        s = MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password)
        try:
            results.append(s.dictionary_assign(values[offset:] + values[:offset]))
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            s.close()

    threads = [threading.Thread(target=writer, args=(15 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4
    assert all(r == results[0] for r in results) and len(set(results[0].values())) == len(values)


@pytest.mark.integration
def test_mysql_reads_an_in_list_under_ndb(mysql_store, mariadb) -> None:
    """Under NDBCLUSTER the keys go as an IN list (NDB batches its primary-key lookups);
    MariaDB runs that statement too, so its results are checked here against the JSON form."""
    spec = TableSpec(f"c{uuid.uuid4().hex[:10]}_ndb", "k", PACKED)
    mysql_store.ensure_table(spec)
    try:
        keys = ["m", "it's", "a", "ünï", "z\x00", "b", "%s", "back\\slash"]
        mysql_store.write_batch(spec, [{"k": k, "ts": 1, "v": f"<{i}>".encode()} for i, k in enumerate(keys)])
        asks = [["b", "zz", "it's", "a", "b", "m"], ["m", "b", "a", "%s"], keys[::-1]]
        assert mysql_store.concat_order == "request"
        as_json = [mysql_store.read_concat(spec, asked, "v") for asked in asks]
        mysql_store._engine = "NDBCLUSTER"  # what _engine_for finds on RonDB
        assert mysql_store.concat_order == "key"
        for asked, by_json in zip(asks, as_json, strict=True):
            got = mysql_store.read_concat(spec, asked, "v")
            assert sorted(_pieces(got)) == sorted(_pieces(by_json))
            assert got == b"".join(f"<{keys.index(k)}>".encode() for k in sorted(set(asked) & set(keys)))
        mysql_store._engine = None
        for form, order in (("in", "key"), ("json", "request")):  # the form asked for, whatever the engine
            with MySQLOnlineStore.from_config(mariadb.cfg, mariadb.password, key_form=form) as forced:
                assert forced.concat_order == order
                for asked, by_json in zip(asks, as_json, strict=True):
                    assert sorted(_pieces(forced.read_concat(spec, asked, "v"))) == sorted(_pieces(by_json))
        with pytest.raises(ValueError, match="key_form"):
            MySQLOnlineStore("127.0.0.1", 1, "db", "u", "p", key_form="IN")
    finally:
        mysql_store._engine = None
        mysql_store.drop_table(spec)


@pytest.mark.integration
def test_mysql_read_concat_falls_back_to_rows_when_the_server_cuts_the_value(mysql_store) -> None:
    spec = TableSpec(f"c{uuid.uuid4().hex[:10]}_cut", "k", PACKED)
    mysql_store.ensure_table(spec)
    try:
        blobs = {f"k{i}": bytes([i]) * 300 for i in range(5)}
        mysql_store.write_batch(spec, [{"k": k, "ts": 1, "v": v} for k, v in blobs.items()])

        def shrink(conn) -> None:
            with conn.cursor() as cur:
                cur.execute("SET SESSION group_concat_max_len = 1000")

        mysql_store._run(shrink)  # as if the result were longer than the server allows
        before = mysql_store.statement_count()
        got = mysql_store.read_concat(spec, list(blobs), "v")
        assert mysql_store.statement_count() - before == 2  # the cut value, then the rows
        assert sorted(got[i : i + 300] for i in range(0, len(got), 300)) == sorted(blobs.values())
        before = mysql_store.statement_count()  # two tables in one statement: both read as rows
        small, big = mysql_store.read_concat_many([(spec, ["k1"], "v"), (spec, list(blobs), "v")])
        assert mysql_store.statement_count() - before == 3 and small == blobs["k1"]
        assert sorted(big[i : i + 300] for i in range(0, len(big), 300)) == sorted(blobs.values())
    finally:
        mysql_store.drop_table(spec)
