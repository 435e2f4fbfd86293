"""Dictionary-encoded string features: codes in the packed row, values from the store's dictionary."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.workdir import Workdir
from feature_store.codec import DICT_STRING, CodecError, Field, RowCodec
from feature_store.dictionary import Dictionary
from feature_store.groups import ARTICLE_NAME_ATTRIBUTES, ARTICLES
from feature_store.online.base import InMemoryOnlineStore
from feature_store.schema import Feature, FeatureGroup
from feature_store.store import FeatureStore, store_dictionary

ODD = ["Ladieswear", "it's", "trailing ", "trailing", "TRAILING", "ünï ✓ 🎉", "\x1f\x1e separators", "", "a;DROP"]
FIELDS = [Field("colour", DICT_STRING, 255), Field("n", "int64"), Field("name", "string"),
          Field("dept", DICT_STRING, 255), Field("tags", "list_string")]


def _dictionary(store: InMemoryOnlineStore) -> Dictionary:
    return Dictionary(store.dictionary_entries, store.dictionary_assign)


def test_dictionary_strings_round_trip_verbatim_with_nulls():
    store = InMemoryOnlineStore()
    d = _dictionary(store)
    d.ensure(ODD)
    c = RowCodec("string", FIELDS, d)
    rows = {f"k{i}": {"colour": v, "n": i, "name": f"n{i}", "dept": None if i % 3 == 0 else ODD[-1 - i], "tags": [v]}
            for i, v in enumerate(ODD)}
    buf = b"".join(c.encode(k, r) for k, r in rows.items())
    assert c.decode_concat(buf) == rows
    keys, cols = c.decode_columns(buf, arrays=True, order=["k5", "absent", "k0"], arranged="request")
    assert keys == ["k5", None, "k0"]
    assert cols[0] == ["ünï ✓ 🎉", None, "Ladieswear"] and cols[3] == ["trailing", None, None]
    _, only_dept = c.decode_columns(buf, wanted={3}, order=["k1", "k2", "k0"])
    assert only_dept[3] == ["", "\x1f\x1e separators", None] and only_dept[0] is None
    plain = RowCodec("string", [Field(f.name, "string" if f.dtype == DICT_STRING else f.dtype, f.limit) for f in FIELDS])
    assert len(buf) < len(b"".join(plain.encode(k, r) for k, r in rows.items()))  # 4 bytes a value, not its text


def test_another_process_decodes_by_loading_the_new_codes_once():
    store = InMemoryOnlineStore()
    writer = RowCodec("string", FIELDS, _dictionary(store))
    writer.dictionary.ensure(["red", "blue", "Menswear"])
    buf = writer.encode("a", {"colour": "blue", "n": 1, "name": "x", "dept": "Menswear", "tags": []})
    reader = RowCodec("string", FIELDS, _dictionary(store))
    before = store.statement_count()
    assert reader.decode(buf)[1]["colour"] == "blue"
    assert reader.decode(buf)[1]["dept"] == "Menswear"
    assert store.statement_count() - before == 1  # one read of the entries, then none
    writer.dictionary.ensure(["green"])  # a value coded after the reader loaded
    buf2 = writer.encode("b", {"colour": "green", "n": 2, "name": "y", "dept": None, "tags": []})
    before = store.statement_count()
    assert reader.decode_concat(buf + buf2)["b"]["colour"] == "green"
    assert store.statement_count() - before == 1


def test_codes_committed_out_of_order_are_found():
    """Codes are assigned in parallel: a reader may see code 3 before code 2 exists; a row
    holding code 2 later makes it read from code 2 on, not only above the highest it knows."""
    entries = {1: "a", 3: "c"}
    d = Dictionary(lambda after: sorted((c, v) for c, v in entries.items() if c > after), lambda values: {})
    assert d.values(np.array([1, 3, 0], dtype=np.uint32)) == ["a", "c", None]
    entries[2] = "b"
    # a [features, rows] block, as the codec looks up all its coded columns at once: the unknown
    # code in the second column is found too
    assert d.values(np.array([[1, 0], [3, 2]], dtype=np.uint32)) == [["a", None], ["c", "b"]]
    assert d.values(np.array([2, 3], dtype=np.uint32)) == ["b", "c"]
    with pytest.raises(ValueError, match="dictionary code 9 is not in the online store"):
        d.values(np.array([1, 9], dtype=np.uint32))


def test_a_value_without_a_code_is_refused_naming_the_feature():
    c = RowCodec("string", FIELDS, _dictionary(InMemoryOnlineStore()))
    with pytest.raises(CodecError, match="'colour'.*no dictionary code"):
        c.encode("a", {"colour": "new", "n": 1, "name": "x", "dept": None, "tags": []})
    with pytest.raises(CodecError, match="'colour'.*expected a str"):
        c.encode("a", {"colour": 5, "n": 1, "name": "x", "dept": None, "tags": []})
    with pytest.raises(ValueError, match="need the store's dictionary"):
        RowCodec("string", FIELDS)


def test_store_dictionary_codes_are_unique_exact_and_stable():
    store = InMemoryOnlineStore()
    got = store.dictionary_assign(ODD + ODD[:2])
    assert sorted(got) == sorted(ODD) and len(set(got.values())) == len(ODD) and min(got.values()) > 0
    assert store.dictionary_assign(["it's", "new"]) == {"it's": got["it's"], "new": max(got.values()) + 1}
    assert store.dictionary_entries(got["it's"])[0] == (got["it's"] + 1, ODD[2])
    with pytest.raises(ValueError, match="expected a str"):
        store.dictionary_assign(["ok", 3])
    with pytest.raises(ValueError, match="bytes, above 1020"):
        store.dictionary_assign(["é" * 600])
    assert "ok" not in dict((v, c) for c, v in store.dictionary_entries())  # nothing of a refused call


def test_feature_definition_of_the_option():
    f = Feature("colour", "string", dictionary=True)
    assert Feature.from_dict(f.to_dict()) == f and f.to_dict()["dictionary"] is True
    assert "dictionary" not in Feature("colour", "string").to_dict()  # older definitions compare equal
    with pytest.raises(ValueError, match="only string features"):
        Feature("n", "int64", dictionary=True)
    with pytest.raises(ValueError, match="unknown type"):
        Feature("n", DICT_STRING)
    assert {f.name for f in ARTICLES.dictionary_features} == set(ARTICLE_NAME_ATTRIBUTES)


def test_insert_codes_the_values_and_reads_them_back(tmp_path):
    store = InMemoryOnlineStore()
    group = FeatureGroup("items", "item", (Feature("item", "string"), Feature("colour", "string", dictionary=True),
                                           Feature("size", "int64")))
    fs = FeatureStore(Workdir.at(tmp_path), store)
    fgv = fs.create_feature_group(group)
    frame = pd.DataFrame({"item": [f"i{j}" for j in range(len(ODD))], "colour": ODD, "size": range(len(ODD))})
    fgv.insert(frame, event_time="2020-01-01")
    assert {r["colour"] for r in fgv.read_online(list(frame["item"])).values()} == set(ODD)
    assert len(store_dictionary(store)) == len(ODD)
    before = store.statement_count()
    fgv.insert(frame.assign(size=1), event_time="2020-01-02")  # every value known: no dictionary call
    assert store.statement_count() - before == 1  # the online write alone
    bad = frame.head(2).assign(colour=["x" * 300, "fine"])
    with pytest.raises(ValueError, match="nothing written(.|\n)*colour: type string"):
        fgv.insert(bad, event_time="2020-01-03")
    assert fgv.read_online(["i0"])["i0"]["colour"] == ODD[0]  # the failed insert left the row as it was
    assert "fine" not in {v for _, v in store.dictionary_entries()}  # validated before any code is given
