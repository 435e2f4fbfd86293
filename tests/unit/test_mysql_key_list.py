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


def test_a_statement_the_server_rolled_back_for_a_deadlock_is_run_again():
    from pymysql.err import OperationalError

    from feature_store.online.mysql import _TXN_ATTEMPTS, _retry_deadlocks

    calls: list[tuple] = []

    def flaky(*args: object) -> int:
        calls.append(args)
        if len(calls) < 3:
            raise OperationalError(1213 if len(calls) == 1 else 1205, "try restarting transaction")
        return 7

    assert _retry_deadlocks(flaky, "sql", [b"v"]) == 7 and calls == [("sql", [b"v"])] * 3

    def always() -> None:
        calls.append(())
        raise OperationalError(1213, "Deadlock found")

    calls.clear()
    with pytest.raises(OperationalError):
        _retry_deadlocks(always)
    assert len(calls) == _TXN_ATTEMPTS

    def other() -> None:  # any other error is not retried
        calls.append(())
        raise OperationalError(1045, "Access denied")

    calls.clear()
    with pytest.raises(OperationalError, match="Access denied"):
        _retry_deadlocks(other)
    assert len(calls) == 1
