"""Feature group schemas: typed features, a primary key, an event-time column, expectations.

Names of groups, features and views are lower-case identifiers (`[a-z][a-z0-9_]*`, at most 63
characters): they become table names, Parquet columns and dict keys, and SQL identifiers are
case-insensitive. A feature whose column in the source data is spelled otherwise (the H&M
customers' `FN` and `Active`) keeps its lower-case `name` and declares the source spelling as
`alias`: frames going in and rows coming out use the alias, storage uses the name.

Feature types (what the packed online row and the Parquet files hold):
    int64, float64, bool, string, list_string, list_int64, list_float64, json
Strings, lists and json values are bounded (`limit`: characters, items, bytes) so online rows
stay small enough for NDB.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from feature_store.codec import CODEC_TYPES, DICT_STRING, Field, RowCodec
from feature_store.dictionary import Dictionary

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_GROUP_NAME = 52  # fg_<name>_v<version> within 64 characters up to version 999999
DTYPES = tuple(t for t in CODEC_TYPES if t != DICT_STRING)
DEFAULT_LIMITS = {"string": 255, "list_string": 100, "list_int64": 100, "list_float64": 100, "json": 4096}
KEY_DTYPES = ("string", "int64")
# Columns of every online feature-group table besides the key (see FeatureGroup.table_spec).
ONLINE_TIME_COLUMN = "ts_us"
ONLINE_ROW_COLUMN = "packed"
RESERVED_NAMES = {ONLINE_TIME_COLUMN, ONLINE_ROW_COLUMN}


def check_name(name: Any, what: str) -> str:
    """Return `name` if it is a valid group/feature/view name, else raise ValueError naming it."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: names must match [a-z][a-z0-9_]* (lower-case letters, digits and "
            "underscores, starting with a letter, at most 63 characters)"
        )
    return name


@dataclass(frozen=True)
class Feature:
    """One typed feature.

    Attributes:
        name: the stored name (lower-case identifier).
        dtype: one of DTYPES.
        limit: bound of a string (characters), list (items) or json value (bytes); default per type.
        alias: the column's spelling in frames and returned rows when it is not `name`.
        description: free text.
        optional: an inserted frame may lack the column (stored as null).
        dictionary: (strings) stored online as a code of the store's dictionary instead of the
            text, for low-cardinality values (a colour or department name): smaller rows, and
            reads make no string per value (feature_store.dictionary).
    """

    name: str
    dtype: str
    limit: int | None = None
    alias: str | None = None
    description: str = ""
    optional: bool = False
    dictionary: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "feature name")
        if self.dtype not in DTYPES:
            raise ValueError(f"feature {self.name!r}: unknown type {self.dtype!r}; expected one of {DTYPES}")
        if self.dictionary and self.dtype != "string":
            raise ValueError(f"feature {self.name!r}: only string features can be dictionary-encoded, not {self.dtype!r}")
        if self.limit is None and self.dtype in DEFAULT_LIMITS:
            object.__setattr__(self, "limit", DEFAULT_LIMITS[self.dtype])
        if self.alias is not None and (not isinstance(self.alias, str) or self.alias.lower() != self.name):
            raise ValueError(f"feature {self.name!r}: alias {self.alias!r} must spell the same name in another case")

    @property
    def column(self) -> str:
        """The name in frames and returned rows."""
        return self.alias or self.name

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype, "limit": self.limit, "alias": self.alias,
             "description": self.description, "optional": self.optional}
        if self.dictionary:  # only then: definitions registered before the option still compare equal
            d["dictionary"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Feature:
        return cls(d["name"], d["dtype"], d.get("limit"), d.get("alias"), d.get("description", ""),
                   bool(d.get("optional", False)), bool(d.get("dictionary", False)))

    @property
    def codec_type(self) -> str:
        return DICT_STRING if self.dictionary else self.dtype


@dataclass(frozen=True)
class Expectation:
    """A data-quality rule on one feature, checked on insert (see feature_store.validation).

    rule: "not_null" | "range" (min/max, inclusive; None: open) | "allowed" (values) |
    "max_length" (strings: characters, lists: items; `max`). Nulls pass every rule but not_null.
    """

    feature: str
    rule: str
    min: float | None = None
    max: float | None = None
    values: tuple[Any, ...] | None = None

    RULES = ("not_null", "range", "allowed", "max_length")

    def __post_init__(self) -> None:
        if self.rule not in self.RULES:
            raise ValueError(f"expectation on {self.feature!r}: unknown rule {self.rule!r}; one of {self.RULES}")
        if self.rule == "allowed":
            if self.values is None:
                raise ValueError(f"expectation 'allowed' on {self.feature!r} needs values")
            object.__setattr__(self, "values", tuple(self.values))
        if self.rule == "range" and self.min is None and self.max is None:
            raise ValueError(f"expectation 'range' on {self.feature!r} needs min or max")
        if self.rule == "max_length" and self.max is None:
            raise ValueError(f"expectation 'max_length' on {self.feature!r} needs max")

    def describe(self) -> str:
        if self.rule == "range":
            return f"range [{self.min}, {self.max}]"
        if self.rule == "allowed":
            return f"allowed {list(self.values or ())}"
        if self.rule == "max_length":
            return f"max_length {self.max}"
        return self.rule

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "rule": self.rule, "min": self.min, "max": self.max,
                "values": list(self.values) if self.values is not None else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Expectation:
        values = d.get("values")
        return cls(d["feature"], d["rule"], d.get("min"), d.get("max"), tuple(values) if values is not None else None)


def not_null(feature: str) -> Expectation:
    return Expectation(feature, "not_null")


def in_range(feature: str, min: float | None = None, max: float | None = None) -> Expectation:  # noqa: A002
    return Expectation(feature, "range", min=min, max=max)


def allowed(feature: str, values: Sequence[Any]) -> Expectation:
    return Expectation(feature, "allowed", values=tuple(values))


@dataclass(frozen=True)
class FeatureGroup:
    """A feature group definition (the schema of its versions).

    Attributes:
        name: the group's name (lower-case identifier); online tables are `fg_<name>_v<version>`.
        primary_key: name of the key feature (string or int64 for online groups).
        features: every feature, the key included, in order.
        event_time: the event-time column of the frames (a timestamp; not a feature). For each key,
            the online row is the one with the latest event time; point-in-time joins compare it
            with the label's event time.
        online: whether inserts also upsert the online table.
        expectations: rules checked on insert (types, the key and the event time not null are
            always checked).
    """

    name: str
    primary_key: str
    features: tuple[Feature, ...]
    event_time: str = "event_time"
    online: bool = True
    description: str = ""
    expectations: tuple[Expectation, ...] = field(default=())

    def __post_init__(self) -> None:
        check_name(self.name, "feature group name")
        if len(self.name) > MAX_GROUP_NAME:  # its online tables are fg_<name>_v<version>, 64 characters at most
            raise ValueError(f"invalid feature group name {self.name!r}: at most {MAX_GROUP_NAME} characters "
                             f"(its online table fg_{self.name}_v<version> must fit the 64 a table name may have)")
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "expectations", tuple(self.expectations))
        if not self.features:
            raise ValueError(f"feature group {self.name!r} has no features")
        names: set[str] = set()
        columns: set[str] = set()
        for f in self.features:
            if f.name in names or f.column in columns:
                raise ValueError(f"feature group {self.name!r}: feature {f.name!r} is declared twice")
            names.add(f.name)
            columns.add(f.column)
        check_name(self.event_time, f"event-time column of feature group {self.name!r}")
        if self.event_time in names:
            raise ValueError(f"feature group {self.name!r}: event-time column {self.event_time!r} is also a feature")
        if self.primary_key not in names:
            raise ValueError(f"feature group {self.name!r}: primary key {self.primary_key!r} is not a feature")
        if self.online:
            if self.key_feature.dtype not in KEY_DTYPES:
                raise ValueError(
                    f"feature group {self.name!r}: primary key {self.primary_key!r} has type "
                    f"{self.key_feature.dtype!r}; online groups need one of {KEY_DTYPES}"
                )
            if self.primary_key in RESERVED_NAMES:
                raise ValueError(f"feature group {self.name!r}: {self.primary_key!r} is reserved")
        for e in self.expectations:
            if e.feature not in names:
                raise ValueError(f"feature group {self.name!r}: expectation on unknown feature {e.feature!r}")

    # names ---------------------------------------------------------------------------------
    @property
    def key_feature(self) -> Feature:
        return self.feature(self.primary_key)

    @property
    def key(self) -> str:
        """The key's column name in frames and rows."""
        return self.key_feature.column

    @property
    def columns(self) -> dict[str, str]:
        """Column (frame spelling) -> type, the key included, in order."""
        return {f.column: f.dtype for f in self.features}

    @property
    def value_features(self) -> list[Feature]:
        return [f for f in self.features if f.name != self.primary_key]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name or f.column == name:
                return f
        raise KeyError(f"feature group {self.name!r} has no feature {name!r}")

    def table_name(self, version: int) -> str:
        return f"fg_{self.name}_v{int(version)}"

    # online layout ---------------------------------------------------------------------------
    def codec(self, dictionary: Dictionary | None = None) -> RowCodec:
        """The packed-row codec of the online table: every feature except the key
        (`dictionary`: the online store's, needed when a feature is dictionary-encoded)."""
        return RowCodec(self.key_feature.dtype, [Field(f.column, f.codec_type, f.limit) for f in self.value_features],
                        dictionary)

    @property
    def dictionary_features(self) -> list[Feature]:
        return [f for f in self.value_features if f.dictionary]

    def table_spec(self, version: int):  # -> TableSpec (import kept local: online.base is lower level)
        from feature_store.online.base import TableSpec

        return TableSpec(
            self.table_name(version),
            self.primary_key,
            {self.primary_key: self.key_feature.dtype, ONLINE_TIME_COLUMN: "int64", ONLINE_ROW_COLUMN: "bytes"},
        )

    # serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "primary_key": self.primary_key,
            "event_time": self.event_time,
            "online": self.online,
            "description": self.description,
            "features": [f.to_dict() for f in self.features],
            "expectations": [e.to_dict() for e in self.expectations],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureGroup:
        return cls(
            name=d["name"],
            primary_key=d["primary_key"],
            features=tuple(Feature.from_dict(f) for f in d["features"]),
            event_time=d.get("event_time", "event_time"),
            online=bool(d.get("online", True)),
            description=d.get("description", ""),
            expectations=tuple(Expectation.from_dict(e) for e in d.get("expectations", [])),
        )
