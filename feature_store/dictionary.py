"""The string dictionary of dictionary-encoded features, as one process knows it.

A low-cardinality string feature (an article's colour or department name, a customer's club
status) declared with `Feature(..., dictionary=True)` is stored in the packed online row as a
4-byte code instead of its text. Reading 250 rows then makes no Python string per value: the
codes of a column become its strings in one numpy take over the dictionary's values, so the
decode costs less and the row is smaller.

The codes live in the online store (`OnlineStore.dictionary_assign` / `dictionary_entries`):
one table for all groups, code -> value, append-only, codes never reused or changed. So every
process decodes any row another process wrote: a code it does not know yet makes it read the
entries added since its last read (one query), then decode. Values get their codes when a frame
is inserted (`ensure`, one query for the values the process has not seen); an update function
(events) may only write values the dictionary already holds.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

Loader = Callable[[int], Sequence[tuple[int, str]]]
Assigner = Callable[[Sequence[str]], dict[str, int]]


class UnknownValue(KeyError):
    """A value the dictionary has no code for (insert the frame that holds it first)."""


class Dictionary:
    """code <-> value for one online store, loaded lazily and extended as codes appear.

    Args:
        load: the entries (code, value) with a code above the given one (the store's).
        assign: value -> code for the given values, assigning new codes (the store's).
    """

    def __init__(self, load: Loader, assign: Assigner):
        self._load = load
        self._assign = assign
        self._lock = threading.Lock()
        # (values, known) indexed by code; code 0 stands for a null. One tuple, read once by
        # `values`: `_add` replaces it whole (never edits the arrays), so a reader in another
        # thread sees the old pair or the new one.
        self._arrays = (np.array([None], dtype=object), np.ones(1, dtype=bool))
        self._codes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._codes)

    def code(self, value: str) -> int:
        """The code of a value this process knows (see `ensure`).

        Raises:
            UnknownValue: the value has no code here yet.
        """
        try:
            return self._codes[value]
        except KeyError:
            raise UnknownValue(value) from None

    def ensure(self, values: Iterable[str]) -> None:
        """Give every value a code: known ones cost nothing; the rest one read of the entries
        added since this process last read, then one assignment for the values still unknown."""
        todo = [v for v in dict.fromkeys(values) if v not in self._codes]
        if not todo:
            return
        with self._lock:
            self._add(self._load(len(self._arrays[0]) - 1))
            todo = [v for v in todo if v not in self._codes]
            if todo:
                self._add([(c, v) for v, c in self._assign(todo).items()])

    def values(self, codes: np.ndarray) -> list[Any]:
        """The values of `codes` (0: None) as nested lists of `codes`' shape (a 2-D array gives a
        list per row), reading the store's newer entries first when a code is not known here
        (two numpy calls check it).

        Raises:
            ValueError: a code the store does not hold either (a corrupt row).
        """
        values, known = self._arrays
        if codes.size and (int(codes.max()) >= len(known) or not known[codes].all()):
            lowest = min(int(c) for c in codes.ravel().tolist() if c >= len(known) or not known[c])
            with self._lock:
                self._add(self._load(lowest - 1))  # codes commit in any order: from the first unknown
            values, known = self._arrays
            if int(codes.max()) >= len(known) or not known[codes].all():
                raise ValueError(f"corrupt packed values: dictionary code {lowest} is not in the online store")
        return values[codes].tolist()

    def _add(self, entries: Iterable[tuple[int, str]]) -> None:
        pairs = [(int(c), v) for c, v in entries]
        if not pairs:
            return
        old_values, old_known = self._arrays
        size = max(len(old_values), max(c for c, _ in pairs) + 1)
        values = np.empty(size, dtype=object)
        values[: len(old_values)] = old_values
        known = np.zeros(size, dtype=bool)
        known[: len(old_known)] = old_known
        codes = dict(self._codes)
        for c, v in pairs:
            values[c], known[c], codes[v] = v, True, c
        self._arrays = (values, known)
        self._codes = codes
