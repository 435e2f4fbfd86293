"""How MySQL reads send their keys: inlined when escaping would not change them, else bound."""
from __future__ import annotations

import json

import numpy as np
import pytest

from feature_store.online.base import TableSpec
from feature_store.online.mysql import _distinct_keys, _rows_of

STR = TableSpec("t", "k", {"k": "string", "v": "bytes"})
INT = TableSpec("t", "k", {"k": "int64", "v": "bytes"})


def test_plain_keys_are_inlined_once_each_as_a_json_array():
    wanted = _distinct_keys(STR, ["0108775015", "a b", "a", "%s", "x;--", "a"])
    assert wanted == ["0108775015", "a b", "a", "%s", "x;--"]
    sql, params = _rows_of(STR, wanted, by_key=False)
    assert params is None
    assert sql.startswith("""JSON_TABLE('["0108775015","a b","a","%s","x;--"]', '$[*]' COLUMNS (k VARCHAR(64) """)
    assert sql.endswith("JOIN `t` AS t ON t.`k` = j.k")
    ints = _distinct_keys(INT, [3, np.int64(-5), 3, 2**63 - 1])
    assert ints == [3, -5, 2**63 - 1]
    assert _rows_of(INT, ints, by_key=False)[0].startswith(f"JSON_TABLE('[3,-5,{2**63 - 1}]', '$[*]' COLUMNS (k BIGINT ")


def test_ndb_reads_an_in_list():
    assert _rows_of(STR, ["a", "b"], by_key=True) == ("`t` AS t WHERE t.`k` IN ('a','b')", None)
    assert _rows_of(INT, [3, -5], by_key=True) == ("`t` AS t WHERE t.`k` IN (3,-5)", None)
    assert _rows_of(STR, ["it's", "b"], by_key=True) == ("`t` AS t WHERE t.`k` IN (%s,%s)", ["it's", "b"])


@pytest.mark.parametrize("tricky", ["it's", 'a"b', "back\\slash", "nul\x00", "new\nline", "\x1a", "ünï", "a\rb", "tab\t"])
def test_keys_needing_escapes_go_as_one_parameter(tricky):
    wanted = _distinct_keys(STR, ["a", tricky, "a"])
    sql, params = _rows_of(STR, wanted, by_key=False)
    assert sql.startswith("JSON_TABLE(%s, ")
    assert len(params) == 1 and json.loads(params[0]) == ["a", tricky]


def test_invalid_keys_are_refused():
    with pytest.raises(ValueError, match="invalid key"):
        _distinct_keys(INT, ["1; DROP TABLE t"])
    with pytest.raises(ValueError, match="invalid key"):
        _distinct_keys(INT, [True])
    with pytest.raises(ValueError, match="invalid key"):
        _distinct_keys(STR, [5])
    with pytest.raises(ValueError, match="invalid key 'a ': a string key cannot end with a space"):
        _distinct_keys(STR, ["é", "a "])  # (not plain ASCII: each key is checked)


class _Cursor:
    def __init__(self, conn):
        self.conn, self.last = conn, ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, sql, params=None):
        self.conn.statements.append(sql)
        self.last = sql

    def fetchone(self):
        return ("NDBCLUSTER",) if self.conn.ndb and "information_schema.ENGINES" in self.last else None

    def fetchall(self):  # information_schema.COLUMNS of the table just created
        return [("k", "varchar", "PRI"), ("v", "varbinary", "")]


class _Conn:
    def __init__(self, ndb):
        self.ndb, self.statements = ndb, []

    def cursor(self):
        return _Cursor(self)


@pytest.mark.parametrize(("ndb", "engine"), [(True, "NDBCLUSTER"), (False, "InnoDB")])
def test_tables_are_created_in_ndbcluster_when_the_server_offers_it(ndb, engine):
    """RonDB's engine when the server lists it as supported (what RonDB's MySQL servers do), else
    InnoDB; the server is asked once per store."""
    import threading

    from feature_store.online.mysql import MySQLOnlineStore

    store = object.__new__(MySQLOnlineStore)  # no server: a connection that records statements
    store._lock, store._closed, store._engine, store._where = threading.RLock(), False, None, "test"
    store._conn = conn = _Conn(ndb)
    store.ensure_table(STR)
    store.ensure_table(TableSpec("t2", "k", {"k": "string", "v": "bytes"}))
    creates = [s for s in conn.statements if s.startswith("CREATE TABLE")]
    assert len(creates) == 2 and all(f"ENGINE={engine} DEFAULT CHARSET=utf8mb4" in s for s in creates)
    assert creates[0].startswith("CREATE TABLE IF NOT EXISTS `t` (`k` VARCHAR(64)")
    assert sum("information_schema.ENGINES" in s for s in conn.statements) == 1
