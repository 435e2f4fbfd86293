"""The packed online row: every type round-trips verbatim, rows concatenate and split."""
from __future__ import annotations

import math

import numpy as np
import pytest

from feature_store.codec import MAX_PACKED_BYTES, CodecError, Field, RowCodec, split_packed

FIELDS = [
    Field("i", "int64"),
    Field("x", "float64"),
    Field("b", "bool"),
    Field("s", "string", 255),
    Field("tags", "list_string", 10),
    Field("counts", "list_int64", 30),
    Field("w", "list_float64", 5),
    Field("j", "json", 1000),
]
TRICKY = ["quote ' \" back\\slash", "a;b; DROP TABLE x;--", "SELECT * FROM t WHERE 1=1", "ünïcødé ✓ 🎉",
          "sep\x1fin\x1ethe middle", "", "NULL", "%s %(x)s"]


def _row(**over):
    row = {"i": -(2**63), "x": 1 / 3, "b": True, "s": "plain", "tags": ["north", "south"], "counts": [0, 5, 2**40],
           "w": [0.5, -1e300], "j": {"a": [1, 2.5, None], "b": "x"}}
    row.update(over)
    return row


@pytest.mark.parametrize("key_type,key", [("string", "0108775015"), ("int64", -5), ("string", "k\x1fey")])
def test_round_trip_of_every_type(key_type, key):
    c = RowCodec(key_type, FIELDS)
    for row in (_row(), {f.name: None for f in FIELDS}, _row(tags=[], counts=[], w=[], s="", j=[]),
                _row(tags=[""]), _row(tags=["", "x", ""]), *(_row(s=t, tags=[t, t], j={"v": t}) for t in TRICKY)):
        got_key, got = c.decode(c.encode(key, row))
        assert got_key == key and got == row


def test_concatenated_rows_decode_to_columns_in_buffer_order():
    c = RowCodec("string", FIELDS)
    rows = {f"k{i}": _row(i=i, s=TRICKY[i % len(TRICKY)], x=None if i % 3 == 0 else i / 2) for i in range(20)}
    buf = b"".join(c.encode(k, r) for k, r in rows.items())
    assert [c.decode(p)[0] for p in split_packed(buf)] == list(rows)
    assert c.decode_concat(buf) == rows
    keys, cols = c.decode_columns(buf, arrays=True)
    assert keys == list(rows)
    x = cols[1]
    assert isinstance(x, np.ndarray) and x.dtype == np.float64 and math.isnan(x[0]) and x[1] == 0.5
    assert cols[0].dtype == np.int64 and cols[0].tolist() == list(range(20))
    keys, cols = c.decode_columns(buf, wanted={3})
    assert cols[3] == [r["s"] for r in rows.values()] and cols[5] is None  # only wanted features decoded


def test_nulls_in_numeric_array_columns():
    c = RowCodec("string", [Field("n", "int64"), Field("b", "bool")])
    buf = c.encode("a", {"n": 1, "b": True}) + c.encode("b", {"n": None, "b": None})
    _, (n, b) = c.decode_columns(buf, arrays=True)
    assert n.dtype == np.float64 and n[0] == 1 and math.isnan(n[1])
    assert b.tolist() == [True, None]
    _, (n, b) = c.decode_columns(buf)
    assert n == [1, None] and b == [True, None] and type(n[0]) is int


def test_empty_buffer_and_truncation():
    c = RowCodec("string", FIELDS)
    assert c.decode_columns(b"")[0] == []
    packed = c.encode("a", _row())
    with pytest.raises(ValueError, match="truncated"):
        c.decode_columns(packed[:-3])


@pytest.mark.parametrize(
    "over,match",
    [
        ({"i": 1.5}, r"'i' \(int64\)"),
        ({"i": "7"}, r"'i' \(int64\)"),
        ({"x": float("inf")}, r"'x' \(float64\)"),
        ({"b": "yes"}, r"'b' \(bool\)"),
        ({"s": "y" * 256}, r"'s' \(string\): 256 characters"),
        ({"s": 5}, r"'s' \(string\)"),
        ({"tags": ["a"] * 11}, r"'tags' \(list_string\): 11 items"),
        ({"tags": [1]}, r"'tags' \(list_string\)"),
        ({"counts": [1, None]}, r"'counts' \(list_int64\)"),
        ({"j": {1, 2}}, r"'j' \(json\)"),
        ({"j": {"t": "x" * 2000}}, r"'j' \(json\).*bound"),
    ],
)
def test_bad_values_are_refused_naming_the_feature(over, match):
    with pytest.raises(CodecError, match=match):
        RowCodec("string", FIELDS).encode("k", _row(**over))


def test_row_size_is_bounded():
    c = RowCodec("string", [Field(f"s{i}", "string", 2000) for i in range(10)])
    with pytest.raises(CodecError, match=f"above the limit of {MAX_PACKED_BYTES}"):
        c.encode("k", {f"s{i}": "x" * 2000 for i in range(10)})
    with pytest.raises(CodecError, match="key"):
        c.encode("k" * 65, {})
    with pytest.raises(CodecError, match="cannot end with a space"):  # the server would take it for "k"
        c.encode("k ", {})


def _rows_by_key():
    return {
        "plain": _row(),
        "nulls": {f.name: None for f in FIELDS},
        "empty": _row(tags=[], counts=[], w=[], s="", j=[]),
        "big": _row(i=2**63 - 1, x=-1e-300, counts=[-(2**63), 2**63 - 1], w=[0.1] * 5),
        "uni": _row(s="ünïcødé ✓ 🎉", tags=["ü", ""], j={"ü": "✓"}),
        "sep": _row(s="sep\x1fin\x1ethe middle", tags=[""]),  # stored in JSON form
        **{f"t{i}": _row(s=t, tags=[t], x=None if i % 2 else i / 3, b=None if i % 3 else False)
           for i, t in enumerate(TRICKY)},
    }


@pytest.mark.parametrize("arrays", [False, True])
def test_decode_in_the_order_of_requested_keys_with_missing_ones_null(arrays):
    c = RowCodec("string", FIELDS)
    rows = _rows_by_key()
    buf = b"".join(c.encode(k, r) for k, r in rows.items())
    order = ["uni", "absent", *reversed(rows), "plain", "absent2"]  # a key twice, two not stored
    keys, cols = c.decode_columns(buf, arrays=arrays, order=order)
    assert keys == [None if k.startswith("absent") else k for k in order]
    for f, col in zip(FIELDS, cols, strict=True):
        got = col.tolist() if isinstance(col, np.ndarray) else col
        want = [rows[k][f.name] if k in rows else None for k in order]
        if arrays and f.dtype in ("int64", "float64"):  # nulls are NaN, ints with a null float
            assert isinstance(col, np.ndarray) and col.dtype == np.float64
            want = [math.nan if v is None else v for v in want]
            assert np.array_equal(col, np.array(want, dtype=np.float64), equal_nan=True)
        else:
            assert got == want, f.name
    assert c.decode_columns(buf, order=[]) == ([], [[] for _ in FIELDS])
    keys, cols = c.decode_columns(b"", arrays=True, order=["a", "b"])  # nothing stored
    assert keys == [None, None] and math.isnan(cols[1][1]) and cols[3] == [None, None]


def _assert_same_columns(got: list, want: list) -> None:
    """Decoded columns equal value for value (NaN equal to NaN), numpy ones with the same dtype."""
    for f, a, b in zip(FIELDS, got, want, strict=True):
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype, f.name
            a, b = (np.nan_to_num(a, nan=0.5), np.nan_to_num(b, nan=0.5)) if a.dtype.kind == "f" else (a, b)
            a, b = a.tolist(), b.tolist()
        assert a == b, f.name


@pytest.mark.parametrize("key_type", ["string", "int64"])
def test_rows_in_key_order_decode_in_requested_order_like_any_other_buffer(key_type, monkeypatch):
    """A primary-key read returns the rows sorted by key: that buffer takes the direct path,
    and every request gives what the general path (rows in another order) gives."""
    c = RowCodec(key_type, FIELDS)
    rows = {(f"k{i:02d}" if key_type == "string" else i * 7 - 40): _row(i=i, s=TRICKY[i % len(TRICKY)],
                                                                      tags=[] if i % 4 else ["x"], x=None if i % 3 else i / 2)
            for i in range(12)}
    ascending = b"".join(c.encode(k, rows[k]) for k in sorted(rows))
    shuffled = b"".join(c.encode(k, rows[k]) for k in reversed(list(rows)))
    keys = list(rows)
    absent = "zz" if key_type == "string" else 10**6
    reordered = []
    general = RowCodec._reorder
    monkeypatch.setattr(RowCodec, "_reorder", lambda self, *a: reordered.append(1) or general(self, *a))
    for order in (keys[::-1], keys[5:] + keys[:5], [keys[3], *keys, keys[3]]):  # every stored key asked for
        c.decode_columns(ascending, order=order)
    assert not reordered  # decoded in the requested order directly
    for order in (keys[::-1], keys[5:] + keys[:5], [keys[3], *keys, keys[3]], keys[:4], [absent, *keys], keys[:1]):
        for arrays in (False, True):
            got_keys, got = c.decode_columns(ascending, arrays=arrays, order=order)
            want_keys, want = c.decode_columns(shuffled, arrays=arrays, order=order)
            assert got_keys == want_keys == [k if k in rows else None for k in order]
            _assert_same_columns(got, want)


def test_decode_with_order_keeps_dtypes_when_every_key_is_found():
    c = RowCodec("int64", [Field("n", "int64"), Field("b", "bool"), Field("x", "float64"), Field("l", "list_float64")])
    buf = b"".join(c.encode(k, {"n": k * 10, "b": k % 2 == 0, "x": k / 4, "l": [k / 2] * (k % 3)}) for k in range(5))
    keys, (n, b, x, lst) = c.decode_columns(buf, arrays=True, order=[np.int64(4), 0, 2])
    assert keys == [4, 0, 2] and n.dtype == np.int64 and n.tolist() == [40, 0, 20]
    assert b.dtype == bool and b.tolist() == [True, True, True] and x.tolist() == [1.0, 0.0, 0.5]
    assert lst == [[2.0], [], [1.0, 1.0]]  # lists of unequal lengths
    keys, (n, b, x, lst) = c.decode_columns(buf, arrays=True, order=[1, 99])
    assert keys == [1, None] and n.dtype == np.float64 and math.isnan(n[1]) and b.tolist() == [False, None]
    assert lst == [[0.5], None]


def test_decode_refuses_truncated_and_corrupt_buffers():
    c = RowCodec("string", FIELDS)
    a, b = c.encode("a", _row()), c.encode("b", _row(counts=[1] * 30))
    for bad in (a + b[:1], a + b[:-1], a[:-1] + b, b[:40]):
        with pytest.raises(ValueError, match="truncated|corrupt"):
            c.decode_columns(bad, order=["a", "b"])
    overrun = bytearray(a)
    overrun[3:5] = (60_000).to_bytes(2, "little")  # the first numeric list's item count
    with pytest.raises(ValueError, match="overrun"):
        c.decode_columns(bytes(overrun))
    short = (5).to_bytes(2, "little") + b"x" * 5  # a row shorter than its head
    with pytest.raises(ValueError, match="shorter than its head"):
        c.decode_columns(short)


def test_integer_lists_take_the_narrowest_width_and_read_back_exactly(monkeypatch):
    c = RowCodec("string", [Field("counts", "list_int64", 40), Field("w", "list_float64", 5)])
    lists = [[0, 1, 127, -128], [128], [-129, 5], [32767, -32768], [32768], [-(2**31), 2**31 - 1], [2**31],
             [-(2**63), 2**63 - 1], [], [3] * 30, [300] * 30, [7] * 30]
    rows = {f"k{i:02d}": {"counts": v, "w": [0.25] * (i % 3)} for i, v in enumerate(lists)}
    buf = b"".join(c.encode(k, r) for k, r in rows.items())
    keys, (counts, w) = c.decode_columns(buf)
    assert keys == list(rows) and counts == lists and w == [r["w"] for r in rows.values()]
    assert all(type(x) is int for v in counts for x in v)
    # rows of one count and width are gathered together; the same counts in another width too
    same = b"".join(c.encode(f"s{i}", {"counts": [i] * 30, "w": []}) for i in (1, 2, 3))
    assert c.decode_columns(same)[1][0] == [[1] * 30, [2] * 30, [3] * 30]
    small = len(c.encode("k", {"counts": [5] * 30, "w": []}))
    # rows packed before widths existed (every list int64, width code 0) read unchanged
    monkeypatch.setattr("feature_store.codec._int_width", lambda items: (0, "q"))
    old = b"".join(c.encode(k, r) for k, r in rows.items())
    assert len(c.encode("k", {"counts": [5] * 30, "w": []})) - small == 30 * 7  # 240 bytes, now 30
    assert c.decode_columns(old)[1] == [lists, [r["w"] for r in rows.values()]]
    assert c.decode_columns(old + buf)[1][0] == lists + lists


def test_a_float_list_with_a_width_code_is_corrupt():
    c = RowCodec("string", [Field("w", "list_float64", 5)])
    row = bytearray(c.encode("k", {"w": [1.0]}))
    row[3:5] = (1 | 1 << 14).to_bytes(2, "little")
    with pytest.raises(ValueError, match="corrupt"):
        c.decode_columns(bytes(row))


@pytest.mark.parametrize("key_type", ["string", "int64"])
def test_rows_in_request_order_decode_directly_and_a_wrong_hint_still_decodes(key_type, monkeypatch):
    """A JSON_TABLE read returns the distinct requested keys in the order asked
    (arranged="request"): that buffer takes the direct path; whatever the hint says, every
    request gives what the general path gives."""
    c = RowCodec(key_type, FIELDS)
    rows = {(f"k{i:02d}" if key_type == "string" else i * 7 - 40): _row(i=i, s=TRICKY[i % len(TRICKY)],
                                                                      tags=[] if i % 4 else ["x"], x=None if i % 3 else i / 2)
            for i in range(12)}
    keys = list(rows)
    absent = "zz" if key_type == "string" else 10**6
    reordered = []
    general = RowCodec._reorder
    monkeypatch.setattr(RowCodec, "_reorder", lambda self, *a: reordered.append(1) or general(self, *a))
    asked = [keys[::-1], keys[5:] + keys[:5], [keys[3], *keys, keys[3]], keys[:4], [absent, *keys], keys[:1]]
    for order in asked[:3]:  # every asked key stored: the buffer in the order of its first request
        as_read = b"".join(c.encode(k, rows[k]) for k in dict.fromkeys(order))
        c.decode_columns(as_read, order=order, arranged="request")
    assert not reordered  # decoded in the requested order directly
    shuffled = b"".join(c.encode(k, rows[k]) for k in sorted(rows, key=str))
    for order in asked:
        as_read = b"".join(c.encode(k, rows[k]) for k in dict.fromkeys(order) if k in rows)
        want_keys, want = c.decode_columns(shuffled, arrays=True, order=order, arranged="any")
        assert want_keys == [k if k in rows else None for k in order]
        for buf, arranged in ((as_read, "request"), (shuffled, "request"), (as_read, "key"), (as_read, "any")):
            got_keys, got = c.decode_columns(buf, arrays=True, order=order, arranged=arranged)
            assert got_keys == want_keys, arranged
            _assert_same_columns(got, want)
