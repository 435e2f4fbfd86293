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
