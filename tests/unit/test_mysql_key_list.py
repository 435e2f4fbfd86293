"""The IN list of MySQL reads: keys pymysql would not change are inlined, the rest escaped."""
from __future__ import annotations

import numpy as np
import pytest

from feature_store.online.base import TableSpec
from feature_store.online.mysql import _key_list

STR = TableSpec("t", "k", {"k": "string", "v": "bytes"})
INT = TableSpec("t", "k", {"k": "int64", "v": "bytes"})


def test_plain_keys_are_inlined_once_each():
    assert _key_list(STR, ["0108775015", "a b", "a", "%s", "x;--"]) == ("('0108775015','a b','a','%s','x;--')", None)
    assert _key_list(INT, [3, np.int64(-5), 3, 2**63 - 1]) == (f"(3,-5,{2**63 - 1})", None)
    assert _key_list(STR, []) is None and _key_list(INT, []) is None


@pytest.mark.parametrize("tricky", ["it's", 'a"b', "back\\slash", "nul\x00", "new\nline", "\x1a", "ünï", "a\rb"])
def test_keys_needing_escapes_go_through_pymysql(tricky):
    sql, params = _key_list(STR, ["a", tricky, "a"])
    assert sql == "(%s,%s)" and params == ["a", tricky]


def test_invalid_keys_are_refused():
    with pytest.raises(ValueError, match="invalid key"):
        _key_list(INT, ["1; DROP TABLE t"])
    with pytest.raises(ValueError, match="invalid key"):
        _key_list(INT, [True])
    with pytest.raises(ValueError, match="invalid key"):
        _key_list(STR, [5])
