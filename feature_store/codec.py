"""The packed online row: all features of one feature-group row in one bytes value.

pymysql decodes every column of every result row in Python, so a 30-column row costs far more
to read than one VARBINARY column (STACK.md). An online feature-group table therefore holds
the key, the event time and ONE packed column; this module packs and unpacks it.

Layout of a packed value (little-endian):

    u16  length of the rest
    head (one struct): u8 flags (bit 0: the text part is a JSON array), a u16 item count per
         numeric list, the null bitmap as u64 words (bit i: feature i in schema order is
         None), then the int64 ('q'), float64 ('d') and bool ('?') features in schema order,
         then the u32 code of each dict_string feature (feature_store.dictionary; 0: null)
    numeric lists: the values of each list_int64 / list_float64 feature. An item count's top
               two bits give the width of a list_int64 row's items: 0 int64, 1 int8, 2 int16,
               3 int32 (the narrowest that holds them: a 30-day daily sales list takes 30 bytes
               instead of 240); list_float64 items are float64 (0). Rows packed before the
               widths existed have 0 there and read unchanged.
    text part: UTF-8 of the key (int keys in decimal) and the string, list_string and json
               features, joined by U+001F (list items joined by U+001E, json as JSON text)

Each value carries its own length and key, so values concatenated in any order (what
`OnlineStore.read_concat` returns) can be split and matched to keys without a result row per
key. Decoding reads one u16 per row to find the rows; everything else is done for all rows
together, in C: numpy gathers the fixed-width heads into one structured array (numeric
columns are its fields; a feature view's key order is one reindexing of it; a dict_string
column is one take of its codes from the dictionary's values) and the numeric lists, and the
rows' text parts are joined, decoded and split once, then sliced into columns
by stride. A row whose strings contain U+001E or U+001F (or a list that is exactly [""]) is
stored with flag bit 0 set and its text part as a JSON array, so every value round-trips
verbatim.

Lists are bounded (`max_items`), strings by `max_chars`, json by `max_bytes`; the whole value
by `MAX_PACKED_BYTES`, so rows stay small enough for NDB.
"""
from __future__ import annotations

import json
import math
import numbers
import struct
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np
import pandas as pd

from feature_store.dictionary import Dictionary, UnknownValue
from feature_store.online.base import KEY_TRAILING_SPACE, MAX_BYTES, MAX_KEY_CHARS, encode_json

MAX_PACKED_BYTES = MAX_BYTES
SCALAR_NUMERIC = {"int64": "q", "float64": "d", "bool": "?"}
NUMERIC_LISTS = {"list_int64": "q", "list_float64": "d"}
TEXT_TYPES = ("string", "list_string", "json")
DICT_STRING = "dict_string"  # a string stored as its dictionary code (feature_store.dictionary)
CODEC_TYPES = (*SCALAR_NUMERIC, *NUMERIC_LISTS, *TEXT_TYPES, DICT_STRING)
_SEP, _ITEM_SEP = "\x1f", "\x1e"
_U16 = struct.Struct("<H")
_COUNT_MASK, _WIDTH_SHIFT = 0x3FFF, 14  # a numeric list's u16 head field: item count, width code
MAX_LIST_ITEMS = _COUNT_MASK
_INT_CODES = ((1, -(2**7), 2**7 - 1, "b"), (2, -(2**15), 2**15 - 1, "h"), (3, -(2**31), 2**31 - 1, "i"))
_ITEM_WIDTH = np.array([8, 1, 2, 4], dtype=np.intp)  # bytes per item by width code
_INT_DTYPES = ("<i8", "<i1", "<i2", "<i4")
_Q = struct.Struct("<q")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_NA, _NAT = pd.NA, pd.NaT  # pandas' missing-value singletons count as null
_KIND = {**dict.fromkeys(SCALAR_NUMERIC, "scalar"), **dict.fromkeys(NUMERIC_LISTS, "list"), DICT_STRING: "dict"}


@dataclass(frozen=True)
class Field:
    """One packed feature: name, codec type and its bound (chars, items or bytes)."""

    name: str
    dtype: str
    limit: int | None = None


class CodecError(ValueError):
    """A value cannot be packed (wrong type, out of bounds); the message names the feature."""


class RowCodec:
    """Packs rows of fixed schema `fields` keyed by a string or int64 key."""

    def __init__(self, key_type: str, fields: Sequence[Field], dictionary: Dictionary | None = None):
        if key_type not in ("string", "int64"):
            raise ValueError(f"key type must be string or int64, not {key_type!r}")
        for f in fields:
            if f.dtype not in CODEC_TYPES:
                raise ValueError(f"feature {f.name!r}: type {f.dtype!r} cannot be packed; one of {CODEC_TYPES}")
        if dictionary is None and any(f.dtype == DICT_STRING for f in fields):
            raise ValueError("dictionary-encoded features need the store's dictionary")
        self.key_type = key_type
        self.dictionary = dictionary
        self.fields = list(fields)
        self.names = [f.name for f in self.fields]
        n = len(self.fields)
        self._null_words = max(1, (n + 63) // 64)
        self._scalars = [i for i, f in enumerate(self.fields) if f.dtype in SCALAR_NUMERIC]
        self._lists = [i for i, f in enumerate(self.fields) if f.dtype in NUMERIC_LISTS]
        self._texts = [i for i, f in enumerate(self.fields) if f.dtype in TEXT_TYPES]
        self._dicts = [i for i, f in enumerate(self.fields) if f.dtype == DICT_STRING]
        self._head = struct.Struct(
            "<B" + "H" * len(self._lists) + "Q" * self._null_words
            + "".join(SCALAR_NUMERIC[self.fields[i].dtype] for i in self._scalars) + "I" * len(self._dicts)
        )
        self._list_fmt = [NUMERIC_LISTS[self.fields[i].dtype] for i in self._lists]
        self._defaults = tuple(_zero(self.fields[i].dtype) for i in self._scalars)
        self._part = {i: j for part in (self._lists, self._texts) for j, i in enumerate(part)}  # list / text no.
        self._kind = [_KIND.get(f.dtype, "text") for f in self.fields]
        np_formats = {"q": "<i8", "d": "<f8", "?": "?"}
        names = ["flags", *(f"c{j}" for j in range(len(self._lists))), *(f"n{w}" for w in range(self._null_words)),
                 *(f"s{i}" for i in self._scalars), *(f"s{i}" for i in self._dicts)]
        formats = ["u1", *(["<u2"] * len(self._lists)), *(["<u8"] * self._null_words),
                   *(np_formats[SCALAR_NUMERIC[self.fields[i].dtype]] for i in self._scalars),
                   *(["<u4"] * len(self._dicts))]
        offsets, at = [], 0
        for fmt in formats:
            offsets.append(at)
            at += np.dtype(fmt).itemsize
        if at != self._head.size:
            raise AssertionError("head layout mismatch")
        # one row's u16 length and head, as numpy reads them from the concatenated rows
        self._row_dtype = np.dtype({"names": ["len", *names], "formats": ["<u2", *formats],
                                      "offsets": [0, *(o + 2 for o in offsets)], "itemsize": at + 2})
        null_head = np.zeros(1, dtype=self._row_dtype)  # a key not found: every feature null
        for w in range(self._null_words):
            null_head[f"n{w}"] = np.uint64(0xFFFFFFFFFFFFFFFF)
        self._null_head = null_head.view(np.uint8).reshape(1, self._row_dtype.itemsize)
        # the dictionary codes lie side by side at the end of the head: one [rows, codes] block
        self._dict_at = self._row_dtype.fields[f"s{self._dicts[0]}"][1] if self._dicts else 0
        self._scalar_fields = [self.fields[i] for i in self._scalars]
        self._dict_fields = [self.fields[i] for i in self._dicts]
        self._text_fields = [self.fields[i] for i in self._texts]
        self._list_fields = [self.fields[i] for i in self._lists]

    # encoding --------------------------------------------------------------------------
    def encode(self, key: Any, row: Mapping[str, Any]) -> bytes:
        """Pack one row (missing features are None).

        Raises:
            CodecError: naming the feature whose value has the wrong type or exceeds its bound.
        """
        return self.encode_values(key, [row.get(name) for name in self.names])

    def encode_values(self, key: Any, values: Sequence[Any]) -> bytes:
        """Pack one row given as values in schema order (None, NaN, pd.NA and NaT are null)."""
        nulls = 0
        bit = 1
        for v in values:
            if v is None or (type(v) is float and v != v) or v is _NA or v is _NAT:
                nulls |= bit
            bit <<= 1
        get = values.__getitem__
        scalars = []
        for i, f, d in zip(self._scalars, self._scalar_fields, self._defaults, strict=True):
            scalars.append(d if nulls >> i & 1 else _scalar(f, get(i)))
        for i, f in zip(self._dicts, self._dict_fields, strict=True):
            scalars.append(0 if nulls >> i & 1 else self._code(f, get(i)))
        words = [(nulls >> (64 * w)) & 0xFFFFFFFFFFFFFFFF for w in range(self._null_words)]
        parts = [b"", b""]
        texts: list[Any] = [_check_key(key) if self.key_type == "string" else str(_check_int_key(key))]
        plain = _SEP not in texts[0] and _ITEM_SEP not in texts[0]
        counts = []
        for i, f, fmt in zip(self._lists, self._list_fields, self._list_fmt, strict=True):
            items = [] if nulls >> i & 1 else _numeric_list(f, get(i))
            code = 0
            if fmt == "q" and items:
                code, fmt = _int_width(items)
            counts.append(len(items) | code << _WIDTH_SHIFT)
            parts.append(struct.pack(f"<{len(items)}{fmt}", *items))
        for i, f in zip(self._texts, self._text_fields, strict=True):
            if nulls >> i & 1:
                texts.append("" if f.dtype != "list_string" else [])
                continue
            t = _text_value(f, get(i))
            if f.dtype == "string":
                plain = plain and _SEP not in t and _ITEM_SEP not in t
            elif f.dtype == "list_string":
                plain = plain and t != [""] and not any(_SEP in x or _ITEM_SEP in x for x in t)
            texts.append(t)
        if plain:
            text = _SEP.join(_ITEM_SEP.join(t) if type(t) is list else t for t in texts)
        else:
            text = json.dumps(texts, ensure_ascii=False, separators=(",", ":"))
        parts[1] = self._head.pack(0 if plain else 1, *counts, *words, *scalars)
        parts.append(text.encode("utf-8"))
        length = sum(len(x) for x in parts)
        if length + 2 > MAX_PACKED_BYTES:
            raise CodecError(
                f"packed row of key {key!r} is {length + 2} bytes, above the limit of {MAX_PACKED_BYTES}: "
                "bound the long strings or lists of this group"
            )
        parts[0] = _U16.pack(length)
        return b"".join(parts)

    def _code(self, f: Field, v: Any) -> int:
        try:
            return self.dictionary.code(_text_value(f, v))  # type: ignore[union-attr]
        except UnknownValue:
            raise CodecError(
                f"feature {f.name!r} (dictionary): {str(v)[:40]!r} has no dictionary code yet; values get "
                "theirs when a frame holding them is inserted"
            ) from None

    # decoding --------------------------------------------------------------------------
    def decode(self, value: bytes) -> tuple[Any, dict[str, Any]]:
        """(key, row) of one packed value."""
        out = self.decode_concat(value)
        if len(out) != 1:
            raise ValueError(f"expected one packed row, found {len(out)}")
        return next(iter(out.items()))

    def decode_concat(self, buf: bytes) -> dict[Any, dict[str, Any]]:
        """Split concatenated packed values and decode each: key -> {feature: value}."""
        keys, cols = self.decode_columns(buf)
        names = self.names
        if not cols:
            return {k: {} for k in keys}
        return {k: dict(zip(names, vals, strict=True)) for k, vals in zip(keys, zip(*cols, strict=True), strict=True)}

    def decode_columns(
        self,
        buf: bytes,
        wanted: Collection[int] | None = None,
        arrays: bool = False,
        order: Sequence[Any] | None = None,
        arranged: str = "key",
    ) -> tuple[list[Any], list[Any]]:
        """Split concatenated packed values: (keys, one column per feature in schema order),
        rows in the order of `buf` or of `order`.

        Args:
            buf: packed values, concatenated.
            wanted: indexes of the features to decode (None: all); the others come back as None
                instead of a column (numeric lists and json are the costly ones to decode).
            arrays: numeric features as numpy arrays (float64 with NaN for nulls; int64, or
                float64 when the column has a null; bool, or object when it has a null) instead
                of lists of Python values with None for nulls.
            order: keys to return rows for, in this order: a key that is not in `buf` gets key
                None and every feature null (a feature view's missing keys need no second
                pass); a repeated key repeats its row.
            arranged: how the store usually arranges the rows of a read (its `concat_order`):
                "request" (the distinct keys of `order` in that order), "key" (ascending) or
                "any". A hint only: the rows are decoded in the place it gives them, the
                decoded keys are checked against `order`, and any other arrangement is
                reordered.
        Raises:
            ValueError: the values are truncated or corrupt.

        The per-row Python work is finding the row boundaries (one u16 per row), one slice per
        row for the text parts and one per numeric list of unequal lengths: the heads are
        gathered by numpy into one structured array (reordered by `order` in one step), the
        text parts are joined, decoded and split ONCE and sliced into columns by stride (rows
        in JSON form are decoded one by one).
        """
        n_fields = len(self.fields)
        starts = _row_starts(buf)
        n = len(starts)
        if (not n and order is None) or (order is not None and not len(order)):
            return [], [np.empty(0) if arrays and i in self._scalars else [] for i in range(n_fields)]
        st = np.array(starts, dtype=np.intp)
        ends = np.append(st[1:], len(buf))
        if order is not None and n and arranged in _POSITIONS:
            # When the rows come as the store usually arranges them, every row's place is
            # known before decoding and the rows are decoded in `order` directly (no
            # per-column reordering); the decoded keys confirm it, else the general path.
            idx = _POSITIONS[arranged](order, n)
            if idx is not None:
                keys, cols = self._decode_rows(buf, st[idx], ends[idx], wanted, arrays)
                if keys == list(order):
                    return keys, cols
        return self._decode_rows(buf, st, ends, wanted, arrays, order)

    def _decode_rows(
        self,
        buf: bytes,
        st: np.ndarray,
        ends: np.ndarray,
        wanted: Collection[int] | None,
        arrays: bool,
        order: Sequence[Any] | None = None,
    ) -> tuple[list[Any], list[Any]]:
        """decode_columns of the rows at offsets `st` (ending at `ends`), in that order, then
        reordered by the keys of `order` when given."""
        n_fields = len(self.fields)
        n = len(st)
        pos = st + self._row_dtype.itemsize  # after the u16 length and the head
        if n and int((ends - pos).min()) < 0:
            raise ValueError("corrupt packed values: a row is shorter than its head")
        u8 = np.frombuffer(buf, dtype=np.uint8)
        head_bytes = _gather(u8, st, self._row_dtype.itemsize)  # [rows, bytes]: reordered fast
        h = head_bytes.view(self._row_dtype).reshape(n)
        list_pos: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        for j in range(len(self._lists)):
            c = h[f"c{j}"].astype(np.intp)  # item count and width code
            if self._list_fmt[j] != "q" and n and bool((c >> _WIDTH_SHIFT).any()):
                raise ValueError("corrupt packed values: a float list with a width code")
            list_pos.append(pos)
            counts.append(c)
            pos = pos + (c & _COUNT_MASK) * _ITEM_WIDTH[c >> _WIDTH_SHIFT]
        if self._lists and n and bool((pos > ends).any()):
            raise ValueError("corrupt packed values: numeric lists overrun their row")
        text_cols = self._text_columns(buf, n, pos, ends, h["flags"])
        keys = text_cols[0] if self.key_type == "string" else [int(k) for k in text_cols[0]]
        pick: Callable[[list[Any]], list[Any]] = list
        if order is not None:
            h, pick, list_pos, counts = self._reorder(head_bytes, keys, order, list_pos, counts)
            keys = pick(keys)
        cols: list[Any] = [None] * n_fields
        dict_cols = self._dict_columns(h, wanted)
        null_words = [h[f"n{w}"] for w in range(self._null_words)]
        any_null = [int(np.bitwise_or.reduce(w)) for w in null_words]
        for i in range(n_fields):
            if wanted is not None and i not in wanted:
                continue
            w, bit = divmod(i, 64)
            mask = (null_words[w] >> np.uint64(bit)) & np.uint64(1) if any_null[w] >> bit & 1 else None
            kind = self._kind[i]
            if kind == "scalar":
                cols[i] = _numeric_column(h[f"s{i}"], mask, arrays)
                continue
            if kind == "dict":  # a null's code is 0, which reads as None
                cols[i] = dict_cols[i]
                continue
            j = self._part[i]
            if kind == "list":
                col = _list_column(u8, list_pos[j], counts[j], self._list_fmt[j] == "q")
            else:
                col = pick(text_cols[1 + j])
                dtype = self.fields[i].dtype
                if dtype == "list_string":
                    col = [t if type(t) is list else (t.split(_ITEM_SEP) if t else []) for t in col]
                elif dtype == "json":
                    col = [json.loads(t) if t else None for t in col]
            if mask is not None:
                for r in np.flatnonzero(mask).tolist():
                    col[r] = None
            cols[i] = col
        return keys, cols

    def _dict_columns(self, h: np.ndarray, wanted: Collection[int] | None) -> dict[int, list[Any]]:
        """The dictionary-coded features of the heads `h`: field index -> values, every column
        looked up in one numpy take (H&M articles have 12 such columns: one take each cost more)."""
        if not self._dicts or (wanted is not None and not any(i in wanted for i in self._dicts)):
            return {}
        raw = np.ascontiguousarray(h).view(np.uint8).reshape(len(h), self._row_dtype.itemsize)
        block = raw[:, self._dict_at : self._dict_at + 4 * len(self._dicts)]
        codes = np.ascontiguousarray(block).view("<u4")  # [rows, dictionary features]
        columns = self.dictionary.values(codes.T)  # type: ignore[union-attr]
        return dict(zip(self._dicts, columns, strict=True))

    def _text_columns(self, buf: bytes, n: int, starts: np.ndarray, ends: np.ndarray,
                      flags: np.ndarray) -> list[list[Any]]:
        """The key and the text features, one list per field, from the rows' text parts."""
        n_text = 1 + len(self._texts)
        if not n:
            return [[] for _ in range(n_text)]
        mv = memoryview(buf)
        bounds = zip(starts.tolist(), ends.tolist(), strict=True)
        if not flags.any():
            flat = b"\x1f".join([mv[a:b] for a, b in bounds]).decode("utf-8").split(_SEP)
            if len(flat) != n * n_text:
                raise ValueError("corrupt packed values: unexpected number of text fields")
            return [flat[j::n_text] for j in range(n_text)]
        rows = [json.loads(str(mv[a:b], "utf-8")) if f & 1 else str(mv[a:b], "utf-8").split(_SEP)
                for (a, b), f in zip(bounds, flags.tolist(), strict=True)]
        if any(len(r) != n_text for r in rows):
            raise ValueError("corrupt packed values: unexpected number of text fields")
        return [list(c) for c in zip(*rows, strict=True)]

    def _reorder(
        self, head_bytes: np.ndarray, keys: list[Any], order: Sequence[Any], list_pos: list[np.ndarray],
        counts: list[np.ndarray]
    ) -> tuple[np.ndarray, Callable[[list[Any]], list[Any]], list[np.ndarray], list[np.ndarray]]:
        """Heads, a list reorderer and the numeric lists' positions in the order of `order`;
        keys not found point at an appended all-null head (and a None appended to each list).
        The heads are reordered as raw bytes: numpy copies structured records field by field."""
        n = len(keys)
        idx = list(map(dict(zip(keys, range(n), strict=True)).get, order, repeat(n)))
        get = itemgetter(*idx) if len(idx) > 1 else (lambda c: (c[idx[0]],))
        if n in idx:
            head_bytes = np.concatenate([head_bytes, self._null_head])
            list_pos = [np.append(p, 0) for p in list_pos]
            counts = [np.append(c, 0) for c in counts]

            def pick(col: list[Any]) -> list[Any]:
                return list(get([*col, None]))
        else:

            def pick(col: list[Any]) -> list[Any]:
                return list(get(col))
        ix = np.array(idx, dtype=np.intp)
        h = head_bytes[ix].view(self._row_dtype).reshape(len(idx))
        return h, pick, [p[ix] for p in list_pos], [c[ix] for c in counts]


def _request_positions(order: Sequence[Any], n: int) -> np.ndarray | None:
    """Each requested key's row, if the `n` rows hold the distinct keys of `order` in the order
    of their first request; None when they cannot. Checked by the caller, like
    `_sorted_positions`."""
    m = len(order)
    if m == n:  # as many rows as keys: the keys are distinct (or the check fails)
        return np.arange(n, dtype=np.intp)
    try:
        rank = dict.fromkeys(order)
    except TypeError:
        return None
    if len(rank) != n:
        return None
    for i, k in enumerate(rank):
        rank[k] = i
    return np.fromiter(map(rank.__getitem__, order), dtype=np.intp, count=m)


def _sorted_positions(order: Sequence[Any], n: int) -> np.ndarray | None:
    """Each requested key's row, if the `n` rows hold exactly the distinct keys of `order` in
    ascending order; None when they cannot (another count, keys that do not sort together).
    The caller checks the decoded keys against `order`: this only says where to look."""
    m = len(order)
    try:
        if m == n:  # as many rows as keys: the keys are distinct (or the check fails)
            by_key = sorted(range(m), key=order.__getitem__)
            idx = np.empty(m, dtype=np.intp)
            idx[by_key] = np.arange(m, dtype=np.intp)
            return idx
        distinct = sorted(set(order))
    except TypeError:
        return None
    if len(distinct) != n:
        return None
    rank = dict(zip(distinct, range(n), strict=True))
    return np.fromiter(map(rank.__getitem__, order), dtype=np.intp, count=m)


_POSITIONS: dict[str, Callable[[Sequence[Any], int], np.ndarray | None]] = {
    "request": _request_positions, "key": _sorted_positions}


def _row_starts(buf: bytes) -> list[int]:
    """Offsets of the packed values concatenated in `buf` (each starts with its u16 length)."""
    starts: list[int] = []
    add = starts.append
    length = _U16.unpack_from
    off, end = 0, len(buf)
    try:
        while off < end:
            add(off)
            off += 2 + length(buf, off)[0]
    except struct.error:
        raise ValueError("truncated packed value") from None
    if off != end:
        raise ValueError("truncated packed value")
    return starts


def _gather(u8: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """The `width` bytes at each of `starts`, as an array [rows, width] (one numpy copy)."""
    if not len(starts):
        return np.zeros((0, width), dtype=np.uint8)
    windows = np.ndarray((len(u8) - width + 1, width), dtype=np.uint8, buffer=u8, strides=(1, 1))
    return windows[starts]


def _list_column(u8: np.ndarray, pos: np.ndarray, heads: np.ndarray, ints: bool) -> list[list[Any]]:
    """One numeric-list feature: a list of Python numbers per row. `heads` are the rows' u16
    count fields (item count, width code). Rows of equal count and width are gathered and split
    by numpy, in C; others are read per width with one slice per row."""
    n = len(pos)
    counts, codes = heads & _COUNT_MASK, heads >> _WIDTH_SHIFT
    if not n or not counts.any():
        return [[] for _ in range(n)]
    dtypes = _INT_DTYPES if ints else ("<f8",)
    if (heads == heads[0]).all():
        k, c = int(codes[0]), int(counts[0])
        return _gather(u8, pos, int(_ITEM_WIDTH[k]) * c).view(dtypes[k]).tolist()
    out: list[list[Any]] = [[] for _ in range(n)]
    mv = memoryview(u8)
    for k in np.unique(codes).tolist():
        rows = np.flatnonzero(codes == k)
        cl = counts[rows].tolist()
        width = int(_ITEM_WIDTH[k])
        flat = np.frombuffer(b"".join([mv[p : p + width * c] for p, c in zip(pos[rows].tolist(), cl, strict=True)]),
                             dtype=dtypes[k]).tolist()
        at = 0
        for r, c in zip(rows.tolist(), cl, strict=True):
            out[r] = flat[at : at + c]
            at += c
    return out


def _int_width(items: list[int]) -> tuple[int, str]:
    """The width code and struct format of the narrowest integer type holding every item."""
    lo, hi = min(items), max(items)
    for code, low, high, fmt in _INT_CODES:
        if low <= lo and hi <= high:
            return code, fmt
    return 0, "q"


def _numeric_column(col: np.ndarray, mask: np.ndarray | None, arrays: bool) -> Any:
    if not arrays:
        out = col.tolist()
        if mask is not None:
            for r in np.flatnonzero(mask).tolist():
                out[r] = None
        return out
    if mask is None:
        return col.copy()
    nulls = mask.astype(bool)
    if col.dtype.kind == "b":
        out = col.astype(object)
        out[nulls] = None
        return out
    out = col.astype(np.float64)
    out[nulls] = np.nan
    return out


def _zero(dtype: str) -> Any:
    return False if dtype == "bool" else (0.0 if dtype == "float64" else 0)


def _check_key(key: Any) -> str:
    if not isinstance(key, str):
        raise CodecError(f"key {key!r}: expected a str")
    if len(key) > MAX_KEY_CHARS or len(key.encode("utf-8")) > 255:
        raise CodecError(f"key {key[:20]!r}...: longer than {MAX_KEY_CHARS} characters")
    if key.endswith(" "):
        raise CodecError(f"key {key!r}: {KEY_TRAILING_SPACE}")
    return key


def _check_int_key(key: Any) -> int:
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise CodecError(f"key {key!r}: expected an integer")
    return int(key)


def _scalar(f: Field, v: Any) -> Any:
    t = type(v)
    if t is float and f.dtype == "float64":
        if v - v != 0:  # inf (NaN is a null and never gets here)
            raise CodecError(f"feature {f.name!r} (float64): infinite values cannot be stored")
        return v
    if t is int and f.dtype == "int64" and INT64_MIN <= v <= INT64_MAX:
        return v
    if f.dtype == "bool":
        if isinstance(v, bool) or (isinstance(v, numbers.Integral) and int(v) in (0, 1)):
            return bool(v)
        raise CodecError(f"feature {f.name!r} (bool): got {v!r}")
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise CodecError(f"feature {f.name!r} ({f.dtype}): expected a number, got {type(v).__name__}")
    if f.dtype == "int64":
        if not isinstance(v, numbers.Integral):
            fv = float(v)
            if not fv.is_integer():
                raise CodecError(f"feature {f.name!r} (int64): {v!r} is not an integer")
            v = int(fv)
        v = int(v)
        if not INT64_MIN <= v <= INT64_MAX:
            raise CodecError(f"feature {f.name!r} (int64): {v} out of range")
        return v
    v = float(v)
    if math.isinf(v):
        raise CodecError(f"feature {f.name!r} (float64): infinite values cannot be stored")
    return v


def _numeric_list(f: Field, v: Any) -> list[Any]:
    items = _as_list(f, v)
    if len(items) > MAX_LIST_ITEMS:
        raise CodecError(f"feature {f.name!r} ({f.dtype}): {len(items)} items exceed {MAX_LIST_ITEMS}")
    sub = Field(f.name, "int64" if f.dtype == "list_int64" else "float64")
    out = []
    for x in items:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            raise CodecError(f"feature {f.name!r} ({f.dtype}): list items cannot be null")
        out.append(_scalar(sub, x))
    return out


def _as_list(f: Field, v: Any) -> list[Any]:
    tolist = getattr(v, "tolist", None)
    if callable(tolist) and not isinstance(v, str | bytes):
        v = tolist()
    if not isinstance(v, list | tuple):
        raise CodecError(f"feature {f.name!r} ({f.dtype}): expected a list, got {type(v).__name__}")
    if f.limit is not None and len(v) > f.limit:
        raise CodecError(f"feature {f.name!r} ({f.dtype}): {len(v)} items exceed the bound of {f.limit}")
    if len(v) > 65_535:
        raise CodecError(f"feature {f.name!r}: too many items")
    return list(v)


def _text_value(f: Field, v: Any) -> Any:
    if f.dtype in ("string", DICT_STRING):
        if type(v) is str and v.isascii() and (f.limit is None or len(v) <= f.limit):
            return v
        if not isinstance(v, str):
            raise CodecError(f"feature {f.name!r} ({f.dtype}): expected a str, got {type(v).__name__}")
        if f.limit is not None and len(v) > f.limit:
            raise CodecError(f"feature {f.name!r} ({f.dtype}): {len(v)} characters exceed the bound of {f.limit}")
        _check_unicode(f, v)
        return v
    if f.dtype == "list_string":
        items = _as_list(f, v)
        for s in items:
            if not isinstance(s, str):
                raise CodecError(f"feature {f.name!r} (list_string): items must be str, got {type(s).__name__}")
            _check_unicode(f, s)
        return items
    try:
        text = encode_json(v)
    except (TypeError, ValueError) as e:
        raise CodecError(f"feature {f.name!r} (json): not JSON-serialisable: {e}") from None
    if f.limit is not None and len(text.encode("utf-8")) > f.limit:
        raise CodecError(f"feature {f.name!r} (json): JSON text exceeds the bound of {f.limit} bytes")
    return text


def _check_unicode(f: Field, s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise CodecError(f"feature {f.name!r}: string is not valid Unicode (lone surrogate)") from None


def split_packed(buf: bytes) -> Iterable[bytes]:
    """The packed values of a concatenation, in order (for tests and tools)."""
    off = 0
    while off < len(buf):
        (length,) = _U16.unpack_from(buf, off)
        yield buf[off : off + 2 + length]
        off += 2 + length
