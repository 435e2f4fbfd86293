"""Bring your own data: a dataset config (YAML) maps users / items / interactions files to roles.

The loader turns any such dataset into the canonical tables the rest of the pipeline reads
(the H&M names, so nothing downstream forks on the source): `customers` keyed by
`customer_id`, `articles` keyed by `article_id`, `transactions` with `t_dat` (the day),
`customer_id`, `article_id`, `price` (NaN without a price column) and `sales_channel_id`
(1 without a channel column). The declared categorical / numeric / text columns ride along
under lower-case names, and `Roles` says which they are, so the model's feature lists, the
feature groups, the ranker features and the index table follow the config instead of code.

`dataset.hm` names a folder of H&M Kaggle files: those go through `load_hm` (id
normalisation, extras for the business rules) and the built-in H&M feature set.

Every column a config names is checked against its file before any row is parsed, so a typo
fails at once, naming the file and the column; unparseable values name file, line and field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feature_store.sources import (
    DataError,
    FileReport,
    LoadReport,
    _drop_blank,
    _ids,
    _numbers,
    _Table,
    check_hm_files,
    load_hm,
)

Format = Literal["csv", "tsv", "dat", "parquet"]
DEFAULT_SEPS = {"csv": ",", "tsv": "\t", "dat": "::"}
# Columns the pipeline derives itself: a declared attribute may not take these names.
RESERVED_USER = {"customer_id", "region", "postal_bucket", "age_group", "event_time"}
RESERVED_ITEM = {"article_id", "price", "sales_total", "sales_7d", "sales_30d", "sales_trend", "first_seen",
                 "sales_day", "daily_sales", "stock", "in_stock", "min_age", "regions", "event_time"}


class DatasetConfigError(ValueError):
    """A dataset config that cannot be used; the message names the file and the key or column."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSpec(_Strict):
    """Where a table is and how to read it. `format` defaults from the file suffix."""

    path: str
    format: Format | None = None
    sep: str | None = Field(None, min_length=1, description="default: ',' csv, tab tsv, '::' dat")
    header: bool | None = Field(None, description="first line names the columns (default: true, false for dat)")
    names: list[str] | None = Field(None, description="column names of a file without a header line")
    encoding: str = "utf-8"

    def fmt(self) -> Format:
        if self.format:
            return self.format
        suffix = Path(self.path).suffix.lower().lstrip(".")
        return suffix if suffix in ("csv", "tsv", "dat", "parquet") else "csv"  # type: ignore[return-value]

    def has_header(self) -> bool:
        return self.header if self.header is not None else (self.fmt() != "dat" and self.names is None)


class Columns(_Strict):
    """Roles of a users or items file's columns (each a column name of that file)."""

    id: str
    categorical: list[str] = []
    numeric: list[str] = []
    text: list[str] = []


class EntityFile(FileSpec):
    columns: Columns


class Timestamp(_Strict):
    """`format`: unix_s | unix_ms | iso | a strftime pattern such as '%Y-%m-%d'."""

    column: str
    format: str = "iso"


class Score(_Strict):
    """A rating or weight column; interactions below `min_positive` are not positives and are dropped."""

    column: str
    min_positive: float | None = None


class InteractionsFile(FileSpec):
    user: str
    item: str
    timestamp: Timestamp
    rating: Score | None = None
    weight: Score | None = None
    price: str | None = None
    channel: str | None = Field(None, description="an integer request context such as a sales channel")

    @model_validator(mode="after")
    def _one_score(self) -> InteractionsFile:
        if self.rating is not None and self.weight is not None:
            raise ValueError("give either rating or weight, not both")
        return self


class HMFiles(_Strict):
    path: str = Field(..., description="folder with articles.csv, customers.csv, transactions_train.csv (+ extras)")


class DatasetSpec(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    hm: HMFiles | None = None
    users: EntityFile | None = None
    items: EntityFile | None = None
    interactions: InteractionsFile | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        generic = (self.users, self.items, self.interactions)
        if self.hm is not None and any(x is not None for x in generic):
            raise ValueError("give either hm or users/items/interactions, not both")
        if self.hm is None and self.interactions is None:
            raise ValueError("interactions is required (or hm: a folder of H&M files)")
        return self


class DatasetConfig(_Strict):
    """The file's root. `base` (the YAML's folder) is what relative paths resolve against."""

    dataset: DatasetSpec
    source: str = ""
    base: str = ""

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else Path(self.base) / p


@dataclass(frozen=True)
class Roles:
    """Which canonical columns are features. `kind` "hm": the built-in H&M feature set."""

    kind: Literal["hm", "generic"] = "hm"
    user_categorical: tuple[str, ...] = ()
    user_numeric: tuple[str, ...] = ()
    item_categorical: tuple[str, ...] = ()
    item_numeric: tuple[str, ...] = ()
    item_text: tuple[str, ...] = ()
    has_price: bool = True
    has_channel: bool = True

    @property
    def is_hm(self) -> bool:
        return self.kind == "hm"

    @property
    def type_column(self) -> str | None:
        """The item attribute per-customer type shares, recency and diversity group by."""
        if self.is_hm:
            return "product_type_name"
        return self.item_categorical[0] if self.item_categorical else None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Roles:
        """Roles as a manifest records them (`extra.dataset.roles`, lists for tuples); None: H&M's."""
        if not d:
            return cls()
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


HM_ROLES = Roles()


@dataclass
class Dataset:
    """Canonical tables (see the module doc) and the roles of their columns."""

    name: str
    articles: pd.DataFrame
    customers: pd.DataFrame
    transactions: pd.DataFrame
    extras: dict[str, pd.DataFrame]
    report: LoadReport
    roles: Roles = field(default_factory=Roles)


# ---------------------------------------------------------------------------------------------
# Config


def load_dataset_config(path: str | Path) -> DatasetConfig:
    """Read and validate a dataset YAML; errors name the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise DatasetConfigError(f"dataset config not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise DatasetConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise DatasetConfigError(f"{p}: top level must be a mapping with a 'dataset' key")
    try:
        return DatasetConfig.model_validate({**raw, "source": str(p), "base": str(p.resolve().parent)})
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise DatasetConfigError(f"{p}: invalid dataset config: {msgs}") from e


def hm_dataset_config(data_dir: Path, name: str = "hm") -> DatasetConfig:
    """The config equivalent of `--data DIR` (configs/datasets/hm.yaml with another folder)."""
    return DatasetConfig(dataset=DatasetSpec(name=name, hm=HMFiles(path=str(Path(data_dir).resolve()))))


def canonical_name(column: str) -> str:
    """A declared column's name in the feature groups: lower case, [a-z0-9_], starting with a letter."""
    name = re.sub(r"[^a-z0-9_]+", "_", column.strip().lower()).strip("_")
    return name if re.match(r"^[a-z]", name) else f"c_{name}"


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(cfg: DatasetConfig) -> Dataset:
    """Check every named column against its file, then load and map onto the canonical tables."""
    spec = cfg.dataset
    if spec.hm is not None:
        hm = load_hm(cfg.resolve(spec.hm.path))
        return Dataset(spec.name, hm.articles, hm.customers, hm.transactions, hm.extras, hm.report, HM_ROLES)
    assert spec.interactions is not None
    check_columns(cfg)
    report = LoadReport()
    users = items = None
    if spec.users is not None:
        users = _load_entity(cfg, spec.users, "users", "customer_id", RESERVED_USER, report)
    if spec.items is not None:
        items = _load_entity(cfg, spec.items, "items", "article_id", RESERVED_ITEM, report)
    tx = _load_interactions(cfg, spec.interactions, users, items, report)
    if users is None:
        users = pd.DataFrame({"customer_id": sorted(tx["customer_id"].unique())})
    if items is None:
        items = pd.DataFrame({"article_id": sorted(tx["article_id"].unique())})
    if tx.empty:
        raise DataError(f"{spec.interactions.path}: no interactions left after loading: "
                        + "; ".join(report.summary_lines()))
    roles = _roles(spec)
    return Dataset(spec.name, items, users, tx, {}, report, roles)


def _roles(spec: DatasetSpec) -> Roles:
    def names(entity: EntityFile | None, role: str) -> tuple[str, ...]:
        return tuple(canonical_name(c) for c in getattr(entity.columns, role)) if entity else ()

    inter = spec.interactions
    assert inter is not None
    return Roles("generic", names(spec.users, "categorical"), names(spec.users, "numeric"),
                 names(spec.items, "categorical"), names(spec.items, "numeric"), names(spec.items, "text"),
                 has_price=inter.price is not None, has_channel=inter.channel is not None)


def _entity_columns(f: EntityFile) -> list[tuple[str, str]]:
    c = f.columns
    return [(c.id, "columns.id"), *((x, "columns.categorical") for x in c.categorical),
            *((x, "columns.numeric") for x in c.numeric), *((x, "columns.text") for x in c.text)]


def _interaction_columns(f: InteractionsFile) -> list[tuple[str, str]]:
    out = [(f.user, "user"), (f.item, "item"), (f.timestamp.column, "timestamp.column")]
    for key in ("rating", "weight"):
        score = getattr(f, key)
        if score is not None:
            out.append((score.column, f"{key}.column"))
    out += [(getattr(f, k), k) for k in ("price", "channel") if getattr(f, k) is not None]
    return out


def check_columns(cfg: DatasetConfig) -> None:
    """Every column the config names exists in its file (only headers are read); raises
    DatasetConfigError naming the file, the column, the config key and the columns there are.
    For `hm`, that the Kaggle files are in its folder (FileNotFoundError)."""
    spec = cfg.dataset
    if spec.hm is not None:
        check_hm_files(cfg.resolve(spec.hm.path))
        return
    tables: list[tuple[str, FileSpec, list[tuple[str, str]]]] = []
    for key in ("users", "items"):
        f = getattr(spec, key)
        if f is not None:
            tables.append((key, f, _entity_columns(f)))
    assert spec.interactions is not None
    tables.append(("interactions", spec.interactions, _interaction_columns(spec.interactions)))
    for key, f, named in tables:
        path = cfg.resolve(f.path)
        available = _header(path, f)
        for column, role in named:
            if column not in available:
                raise DatasetConfigError(
                    f"{path}: no column {column!r} (dataset.{key}.{role} in {cfg.source or 'the dataset config'}); "
                    f"the file has: {', '.join(map(str, available))}")
        _check_names(cfg, key, f, named)


def _check_names(cfg: DatasetConfig, key: str, f: FileSpec, named: list[tuple[str, str]]) -> None:
    """Declared attributes get distinct, non-reserved canonical names."""
    if key == "interactions":
        return
    reserved = RESERVED_USER if key == "users" else RESERVED_ITEM
    seen: dict[str, str] = {}
    for column, role in named[1:]:
        name = canonical_name(column)
        if name in reserved or name in seen:
            clash = f"the pipeline's own {name!r}" if name in reserved else f"column {seen[name]!r}"
            raise DatasetConfigError(f"{cfg.source}: dataset.{key}.{role}: column {column!r} becomes {name!r}, "
                                     f"which clashes with {clash}; declare each column once, under one role")
        seen[name] = column


def _header(path: Path, f: FileSpec) -> list[str]:
    if not path.is_file():
        raise DatasetConfigError(f"{path}: file not found")
    if f.fmt() == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    if f.names is not None:
        return list(f.names)
    if not f.has_header():
        raise DatasetConfigError(f"{path}: a file without a header line needs `names: [...]` in its config")
    sep = _sep(f)
    try:
        head = pd.read_csv(path, sep=re.escape(sep) if len(sep) > 1 else sep, nrows=0, encoding=f.encoding,
                           engine="python" if len(sep) > 1 else "c")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetConfigError(f"{path}: cannot read the header line: {exc}") from exc
    return [str(c) for c in head.columns]


def _sep(f: FileSpec) -> str:
    return f.sep or DEFAULT_SEPS.get(f.fmt(), ",")


class _FileTable(_Table):
    """`_Table` (file, line and field in every error) for any supported format."""

    def __init__(self, path: Path, f: FileSpec, required: list[str]) -> None:  # noqa: D107
        self.name = path.name
        self.dropped_columns = []
        self._offset = 2 if f.has_header() else 1
        try:
            frame = self._read(path, f)
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{self.name}: cannot read as {f.fmt()} (sep {_sep(f)!r}, "
                            f"encoding {f.encoding}): {exc}") from exc
        frame = frame.reset_index(drop=True)
        self.raw = frame[required]
        self.rows = len(frame)
        self.dropped = {}

    @staticmethod
    def _read(path: Path, f: FileSpec) -> pd.DataFrame:
        if f.fmt() == "parquet":  # typed columns as text, so one set of parsers checks every format
            frame = pd.read_parquet(path)
            return frame.astype(str).where(frame.notna(), None)
        sep = _sep(f)
        kwargs: dict[str, Any] = dict(sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                                      skip_blank_lines=False, encoding=f.encoding)
        if len(sep) > 1:
            kwargs.update(engine="python", sep=re.escape(sep))  # a multi-character sep is a regex there
        if not f.has_header():
            kwargs.update(header=None, names=f.names)
        elif f.names is not None:
            kwargs.update(header=0, names=f.names)
        return pd.read_csv(path, **kwargs)

    def line_of(self, label: int) -> int:
        return label + self._offset


def _load_entity(cfg: DatasetConfig, f: EntityFile, key: str, id_name: str, reserved: set[str],
                 report: LoadReport) -> pd.DataFrame:
    c = f.columns
    path = cfg.resolve(f.path)
    table = _FileTable(path, f, list(dict.fromkeys([c.id, *c.categorical, *c.numeric, *c.text])))
    df = _drop_blank(table, table.raw.copy())
    out = pd.DataFrame({id_name: _ids(table, df[c.id], c.id)}, index=df.index)
    for col in c.categorical:
        out[canonical_name(col)] = df[col].str.strip()
    for col in c.numeric:
        out[canonical_name(col)] = _numbers(table, df[col], col, required=False)
    for col in c.text:
        out[canonical_name(col)] = df[col]
    out = table.drop(out, out[id_name].duplicated(), f"duplicate_{key}_id")
    report.files[path.name] = table.report(len(out))
    return out.reset_index(drop=True)


def _load_interactions(cfg: DatasetConfig, f: InteractionsFile, users: pd.DataFrame | None,
                       items: pd.DataFrame | None, report: LoadReport) -> pd.DataFrame:
    path = cfg.resolve(f.path)
    named = [c for c, _ in _interaction_columns(f)]
    table = _FileTable(path, f, list(dict.fromkeys(named)))
    df = _drop_blank(table, table.raw.copy())
    out = pd.DataFrame({"t_dat": _timestamps(table, df[f.timestamp.column], f.timestamp)}, index=df.index)
    out["customer_id"] = _ids(table, df[f.user], f.user)
    out["article_id"] = _ids(table, df[f.item], f.item)
    if f.price is not None:
        price = _numbers(table, df[f.price], f.price, required=True)
        table.fail(price < 0, f.price, "{value!r} is negative")
        out["price"] = price
    else:
        out["price"] = np.nan
    if f.channel is not None:
        ch = _numbers(table, df[f.channel], f.channel, required=True)
        table.fail(ch % 1 != 0, f.channel, "cannot parse {value!r} as an integer")
        out["sales_channel_id"] = ch.astype("int64")
    else:
        out["sales_channel_id"] = 1
    score = f.rating or f.weight
    if score is not None:
        value = _numbers(table, df[score.column], score.column, required=True)
        if score.min_positive is not None:
            out = table.drop(out, value < score.min_positive, f"below_min_positive_{score.min_positive:g}")
    if users is not None:
        out = table.drop(out, ~out["customer_id"].isin(users["customer_id"]), "unknown_user")
    if items is not None:
        out = table.drop(out, ~out["article_id"].isin(items["article_id"]), "unknown_item")
    report.files[path.name] = table.report(len(out))
    out = out.sort_values("t_dat", kind="stable")
    return out[["t_dat", "customer_id", "article_id", "price", "sales_channel_id"]].reset_index(drop=True)


def _timestamps(table: _Table, s: pd.Series, ts: Timestamp) -> pd.Series:
    """Interaction times as days (the pipeline's time unit, as H&M's t_dat)."""
    col = ts.column
    table.fail(s.isna(), col, "missing value")
    text = s.str.strip()
    if ts.format in ("unix_s", "unix_ms"):
        num = pd.to_numeric(text, errors="coerce")
        table.fail(num.isna(), col, f"cannot parse {{value!r}} as a {ts.format} timestamp")
        parsed = pd.to_datetime(num, unit="s" if ts.format == "unix_s" else "ms", errors="coerce")
    elif ts.format == "iso":
        parsed = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True).dt.tz_localize(None)
    else:
        parsed = pd.to_datetime(text, format=ts.format, errors="coerce")
    table.fail(parsed.isna(), col, f"cannot parse {{value!r}} as a time ({ts.format})")
    return parsed.dt.normalize()


__all__ = ["DatasetConfig", "DatasetConfigError", "Dataset", "Roles", "HM_ROLES", "load_dataset",
           "load_dataset_config", "hm_dataset_config", "check_columns", "canonical_name", "FileReport"]
