"""Real-time writes: a purchase event updates the online rows it touches, once.

    result = apply_purchase_event(fs, manifest.feature_groups, PurchaseEvent(
        event_id="e-123", customer_id=c, article_id=a, price=0.0339, event_time="2020-09-23T10:00:00"))

One event, in ONE online transaction (`OnlineStore.update_rows`):
- records its `event_id` in `fs_applied_events`; an id seen before means the event was applied
  already and nothing else happens (a retried event is not counted twice);
- customer_history row: the article goes first in `purchased` (bounded to the group's limit),
  count, mean price, counts and shares per product type and index group, last purchase day
  overall and of the article's type (`type_last_day`, bounded as batch builds bound it);
- articles row: total sales, mean price, first-seen day, the daily sales counts and the 7/30-day
  sums and trend derived from them, stock (minus one, not below zero) and in_stock.
A customer without a history row gets one; an unknown article only updates the customer.
The event's time becomes the rows' event time when it is newer.

The event is also appended to the offline event log (`<offline_dir>/_events/purchases/<day>.jsonl`),
even when it was a duplicate online (the log is read deduplicated by event id);
`materialize_events` moves the logged events into the `transactions` group as one commit, so
the next training dataset sees them. Sales windows advance per article when it sells: between
events an article's sales_7d counts the 7 days up to its last sale day (`sales_day`), until the
next batch build recomputes every article as of the build.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from common.artifacts import FeatureGroupRef
from common.workdir import Workdir
from feature_store.groups import INDEX_GROUPS, MAX_PURCHASED, SALES_DAYS, recent_purchases, recent_type_days
from feature_store.offline import to_event_time, to_event_times
from feature_store.online.base import MAX_KEY_CHARS, TableSpec
from feature_store.schema import ONLINE_ROW_COLUMN, ONLINE_TIME_COLUMN

APPLIED_EVENTS = TableSpec(
    "fs_applied_events",
    "event_id",
    {"event_id": "string", "kind": "string", "event_time_us": "int64", "applied_us": "int64"},
)


@dataclass(frozen=True)
class PurchaseEvent:
    """One purchase. `event_id` is the idempotency key (any string of up to 64 characters)."""

    event_id: str
    customer_id: str
    article_id: str
    price: float
    event_time: Any
    sales_channel_id: int = 2

    def check(self) -> None:
        for name in ("event_id", "customer_id", "article_id"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v) > MAX_KEY_CHARS or v.endswith(" "):
                raise ValueError(f"purchase event: {name} must be a non-empty string of at most {MAX_KEY_CHARS} "
                                 f"characters, not ending with a space, got {v!r}")
        if isinstance(self.price, bool) or not isinstance(self.price, int | float) or not math.isfinite(
                self.price) or self.price < 0:
            raise ValueError(f"purchase event {self.event_id!r}: price must be a finite number >= 0, got {self.price!r}")
        if self.sales_channel_id not in (1, 2):
            raise ValueError(f"purchase event {self.event_id!r}: sales_channel_id must be 1 or 2")
        try:
            self.timestamp.value  # noqa: B018 - parsed (and kept) here to name a bad value early; in
            # nanoseconds since 1970, which the online rows' microseconds come from (years 1677-2262)
        except (ValueError, TypeError, OverflowError) as e:
            raise ValueError(f"purchase event {self.event_id!r}: bad event_time {self.event_time!r}: {e}") from None

    @cached_property
    def timestamp(self) -> pd.Timestamp:
        """`event_time` as naive UTC, parsed once (a frozen dataclass still takes a cached value)."""
        return to_event_time(self.event_time)

    def to_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "customer_id": self.customer_id, "article_id": self.article_id,
                "price": float(self.price), "t_dat": self.timestamp.isoformat(),
                "sales_channel_id": int(self.sales_channel_id)}


@dataclass
class EventResult:
    event_id: str
    applied: bool  # False: the event id was applied before (nothing changed online)
    online_ms: float
    known_article: bool


_READY: weakref.WeakSet = weakref.WeakSet()  # stores whose events table exists


def apply_purchase_event(fs, refs: Mapping[str, FeatureGroupRef], event: PurchaseEvent, *,
                         log: bool = True, type_column: str | None = "product_type_name") -> EventResult:
    """Apply one purchase to the online customer_history and articles rows (see the module doc).

    Args:
        fs: a FeatureStore with an online store (its workdir holds the event log).
        refs: the manifest's feature groups (needs "customer_history" and "articles").
        event: the purchase.
        log: also append it to the offline event log.
        type_column: the article attribute the history counts and dates per value
            (`Roles.type_column`: H&M's product type, a dataset config's first item categorical).
    Raises:
        ValueError: an invalid event, or refs without online tables.
    """
    from feature_store.store import online_table

    event.check()
    store = fs.online
    if store is None:
        raise ValueError("apply_purchase_event needs a FeatureStore with an online store")
    for name in ("customer_history", "articles"):
        if name not in refs or refs[name].online_table is None:
            raise ValueError(f"feature group {name!r} has no online table in the given references")
    hist = online_table(store, refs["customer_history"].online_table)
    arts = online_table(store, refs["articles"].online_table)
    if store not in _READY:
        store.ensure_table(APPLIED_EVENTS)
        _READY.add(store)
    ts = event.timestamp.value // 1000  # microseconds since the epoch (.value: nanoseconds)
    day = event.timestamp.strftime("%Y-%m-%d")
    known = {"article": False}

    def update(rows: list[dict[str, Any] | None]) -> list[tuple[TableSpec, dict[str, Any]]]:
        hist_row, art_row = rows
        article = arts.codec.decode(art_row[ONLINE_ROW_COLUMN])[1] if art_row is not None else None
        known["article"] = article is not None
        old = hist.codec.decode(hist_row[ONLINE_ROW_COLUMN])[1] if hist_row is not None else {}
        new_hist = updated_history(old, event, day, article or {}, hist.group.feature("purchased").limit,
                                   type_column)
        writes = [(hist.spec, {hist.spec.key: event.customer_id, ONLINE_TIME_COLUMN: _newer(hist_row, ts),
                               ONLINE_ROW_COLUMN: hist.codec.encode(event.customer_id, new_hist)})]
        if article is not None:
            new_art = updated_article(article, event, day)
            writes.append((arts.spec, {arts.spec.key: event.article_id, ONLINE_TIME_COLUMN: _newer(art_row, ts),
                                       ONLINE_ROW_COLUMN: arts.codec.encode(event.article_id, new_art)}))
        return writes

    t0 = time.perf_counter()
    applied = store.update_rows(
        [(hist.spec, event.customer_id), (arts.spec, event.article_id)],
        update,
        once=(APPLIED_EVENTS, {"event_id": event.event_id, "kind": "purchase", "event_time_us": ts,
                               "applied_us": int(time.time() * 1e6)}),
    )
    online_ms = (time.perf_counter() - t0) * 1000
    if log:
        append_event_log(fs.wd, event)
    return EventResult(event.event_id, applied, online_ms, known["article"])


def _newer(row: Mapping[str, Any] | None, ts: int) -> int:
    old = row.get(ONLINE_TIME_COLUMN) if row is not None else None
    return ts if old is None else max(int(old), ts)


def updated_history(old: Mapping[str, Any], event: PurchaseEvent, day: str, article: Mapping[str, Any],
                    limit: int | None, type_column: str | None = "product_type_name") -> dict[str, Any]:
    """The customer_history row after one more purchase (of `day`, YYYY-MM-DD)."""
    n_old = int(old.get("n_purchases") or 0)
    n = n_old + 1
    mean_old = old.get("mean_price")
    mean = float(event.price) if mean_old is None or n_old == 0 else (mean_old * n_old + float(event.price)) / n
    purchased = recent_purchases([event.article_id, *(old.get("purchased") or [])],
                                 MAX_PURCHASED if limit is None else limit)
    types = dict(old.get("type_counts") or {})
    type_days = dict(old.get("type_last_day") or {})
    groups = dict(old.get("index_group_counts") or {})
    ptype = article.get(type_column) if type_column else None
    if ptype is not None:
        ptype = str(ptype)
        types[ptype] = types.get(ptype, 0) + 1
        type_days[ptype] = max(day, type_days.get(ptype, day))
    if article.get("index_group_name") is not None:
        groups[article["index_group_name"]] = groups.get(article["index_group_name"], 0) + 1
    last = old.get("last_purchase")
    return {
        "purchased": purchased,
        "n_purchases": n,
        "mean_price": mean,
        "type_counts": types,
        "index_group_counts": groups,
        **{share: groups.get(g, 0) / n for g, share in INDEX_GROUPS.items()},
        "last_purchase": day if last is None or day > last else last,
        "type_last_day": recent_type_days(type_days),
    }


def updated_article(old: Mapping[str, Any], event: PurchaseEvent, day: str) -> dict[str, Any]:
    """The articles row after one more sale."""
    row = dict(old)
    total_old = int(row.get("sales_total") or 0)
    price_old = row.get("price")
    row["sales_total"] = total_old + 1
    row["price"] = float(event.price) if price_old is None or total_old == 0 else (
        (price_old * total_old + float(event.price)) / (total_old + 1))
    if row.get("first_seen") is None or day < row["first_seen"]:
        row["first_seen"] = day
    daily = list(row.get("daily_sales") or [])
    daily = (daily + [0] * SALES_DAYS)[:SALES_DAYS]
    head = row.get("sales_day")
    if head is None:
        head = day
    elif day > head:
        shift = (pd.Timestamp(day) - pd.Timestamp(head)).days
        daily = ([0] * shift + daily)[:SALES_DAYS]
        head = day
    ago = (pd.Timestamp(head) - pd.Timestamp(day)).days
    if 0 <= ago < SALES_DAYS:
        daily[ago] += 1
    row["sales_day"] = head
    row["daily_sales"] = daily
    row["sales_7d"] = sum(daily[:7])
    row["sales_30d"] = sum(daily)
    row["sales_trend"] = sum(daily[:7]) - sum(daily[7:14])
    stock = row.get("stock")
    if stock is not None:
        row["stock"] = max(float(stock) - 1.0, 0.0)
        row["in_stock"] = row["stock"] > 0
    return row


# ---------------------------------------------------------------------------------------------
# The offline event log


def event_log_dir(wd: Workdir) -> Path:
    return wd.offline_dir / "_events" / "purchases"


def append_event_log(wd: Workdir, event: PurchaseEvent, durable: bool = False) -> None:
    """Append the event as one JSON line to the day's log (flushed; fsync'ed when `durable`)."""
    append_log_lines(event_log_dir(wd), [(event.timestamp, event.to_dict())], durable)


def append_log_lines(folder: Path, records: list[tuple[pd.Timestamp, dict[str, Any]]], durable: bool) -> None:
    """Append records as JSON lines to `<folder>/<day>.jsonl` (one file per record's day):
    one locked write per file, then one fsync per file when `durable`, so a batch of events
    costs one disk flush rather than one per event."""
    by_day: dict[str, list[str]] = {}
    for ts, rec in records:
        by_day.setdefault(ts.strftime("%Y-%m-%d"), []).append(json.dumps(rec, separators=(",", ":")) + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    for day, lines in by_day.items():
        with open(folder / f"{day}.jsonl", "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write("".join(lines))
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


# Events that do not change features (view, click, add_to_cart): logged for training and for
# joining with the prediction log, in their own folder next to the purchases.
INTERACTION_TYPES = ("view", "click", "add_to_cart")


def interaction_log_dir(wd: Workdir) -> Path:
    return wd.offline_dir / "_events" / "interactions"


def append_interactions(wd: Workdir, records: list[dict[str, Any]], durable: bool = True) -> None:
    """Log non-purchase events: dicts with event_id, customer_id, article_id, type, ts."""
    for r in records:
        if r.get("type") not in INTERACTION_TYPES:
            raise ValueError(f"interaction event {r.get('event_id')!r}: type must be one of {INTERACTION_TYPES}")
    append_log_lines(interaction_log_dir(wd), [(to_event_time(r["ts"]), r) for r in records], durable)


def read_interactions(wd: Workdir) -> pd.DataFrame:
    """Logged views, clicks and add-to-carts, one row per event id (the first logged)."""
    cols = ["event_id", "customer_id", "article_id", "type", "ts"]
    rows = _read_jsonl(interaction_log_dir(wd))
    frame = pd.DataFrame(rows, columns=cols).drop_duplicates("event_id", keep="first").reset_index(drop=True)
    frame["ts"] = to_event_times(frame["ts"]) if len(frame) else pd.Series([], dtype="datetime64[us]")
    return frame


def _read_jsonl(d: Path) -> list[dict[str, Any]]:
    rows = []
    for p in sorted(d.glob("*.jsonl")) if d.is_dir() else []:
        rows += _read_jsonl_file(p)
    return rows


def _read_jsonl_file(p: Path) -> list[dict[str, Any]]:
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return rows


def read_event_log(wd: Workdir) -> pd.DataFrame:
    """Logged purchases, one row per event id (the first logged), in log order."""
    rows = _read_jsonl(event_log_dir(wd))
    cols = ["event_id", "customer_id", "article_id", "price", "t_dat", "sales_channel_id"]
    frame = pd.DataFrame(rows, columns=cols).drop_duplicates("event_id", keep="first").reset_index(drop=True)
    frame["t_dat"] = to_event_times(frame["t_dat"]) if len(frame) else pd.Series([], dtype="datetime64[us]")
    return frame


def add_logged_purchases(tx: pd.DataFrame, customers: pd.DataFrame, articles: pd.DataFrame, wd: Workdir,
                         max_gap_days: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """The transactions with the purchases serving logged in this workdir (`read_event_log`) added,
    as days like the data's: so the next training run sees what was bought since the data was
    exported, and a rebuilt group keeps what the events applied online.

    Left out and counted: events of customers or articles the data does not have, events dated
    more than `max_gap_days` after the data's last day (a log that does not continue this data),
    and events the data already holds (`in_data`: an export made after them). The data has no
    event ids, so a purchase counts as held when the data has as many rows of the same customer,
    article and day as the log has events up to it (a customer who bought the same article twice
    that day, once in the data, adds one).
    Returns the transactions (sorted by day, stable) and the counts."""
    log = read_event_log(wd)
    counts = {"logged": len(log), "added": 0, "unknown_customer": 0, "unknown_article": 0, "after_gap": 0,
              "in_data": 0}
    if log.empty:
        return tx, counts
    day = log["t_dat"].dt.normalize()
    known_c = log["customer_id"].isin(customers["customer_id"])
    known_a = log["article_id"].isin(articles["article_id"])
    near = day <= tx["t_dat"].max() + pd.Timedelta(days=max_gap_days)
    known = known_c & known_a & near
    keep = known & ~_held_by(tx, log["customer_id"], log["article_id"], day, known)
    counts.update(added=int(keep.sum()), unknown_customer=int((~known_c).sum()),
                  unknown_article=int((known_c & ~known_a).sum()), after_gap=int((known_c & known_a & ~near).sum()),
                  in_data=int((known & ~keep).sum()))
    if not keep.any():
        return tx, counts
    add = pd.DataFrame({"t_dat": day[keep].astype(tx["t_dat"].dtype), "customer_id": log.loc[keep, "customer_id"],
                        "article_id": log.loc[keep, "article_id"], "price": log.loc[keep, "price"].astype(float),
                        "sales_channel_id": log.loc[keep, "sales_channel_id"].fillna(2).astype("int64")})
    for col in tx.columns.difference(add.columns):
        add[col] = pd.NA
    add = add[list(tx.columns)].astype(tx.dtypes.to_dict())
    out = pd.concat([tx, add], ignore_index=True).sort_values("t_dat", kind="stable").reset_index(drop=True)
    return out, counts


def _held_by(tx: pd.DataFrame, customer: pd.Series, article: pd.Series, day: pd.Series,
             among: pd.Series) -> pd.Series:
    """Which of the events (`among` them) the transactions already hold: the n-th event of a
    (customer, article, day) is held when the data has at least n rows of it."""
    key = pd.DataFrame({"c": customer, "a": article, "d": day.astype(tx["t_dat"].dtype)})[among]
    in_data = tx[tx["customer_id"].isin(key["c"])].groupby(["customer_id", "article_id", "t_dat"]).size()
    in_data.index = in_data.index.set_names(["c", "a", "d"])
    have = key.join(in_data.rename("n"), on=["c", "a", "d"])["n"].fillna(0)
    nth = key.groupby(["c", "a", "d"], sort=False).cumcount()
    return (nth < have).reindex(customer.index, fill_value=False)


def event_log_summary(wd: Workdir) -> dict[str, Any]:
    """What serving logged in the workdir: purchases (with the first and last event time) and
    interactions, one per event id: what the next pipeline run or feature build reads."""
    log, inter = read_event_log(wd), read_interactions(wd)
    times = log["t_dat"]
    return {"purchases": len(log), "first_purchase": times.min().isoformat() if len(log) else None,
            "last_purchase": times.max().isoformat() if len(log) else None, "interactions": len(inter)}


def describe_added(counts: dict[str, int]) -> str:
    """One line for the progress output (the data report keeps the counts)."""
    left = {k: v for k, v in counts.items() if k not in ("logged", "added") and v}
    out = f"serving's event log: {counts['added']} of {counts['logged']} logged purchases added to the transactions"
    return out + (f" (left out: {', '.join(f'{v} {k}' for k, v in left.items())})" if left else "")


def logged_purchases(wd: Workdir, modified_within_s: float | None = None) -> list[PurchaseEvent]:
    """Purchases of the event log (first logged per event id, in log order), from the day files
    written to within the last `modified_within_s` seconds (None: every file)."""
    folder = event_log_dir(wd)
    cutoff = None if modified_within_s is None else time.time() - modified_within_s
    seen: set[str] = set()
    out = []
    for p in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if cutoff is not None and p.stat().st_mtime < cutoff:
            continue
        for rec in _read_jsonl_file(p):
            if rec.get("event_id") in seen:
                continue
            seen.add(rec["event_id"])
            out.append(PurchaseEvent(rec["event_id"], rec["customer_id"], rec["article_id"], float(rec["price"]),
                                     rec["t_dat"], int(rec.get("sales_channel_id") or 2)))
    return out


def unapplied_events(fs, events: list[PurchaseEvent]) -> list[PurchaseEvent]:
    """The events whose ids the online store has not recorded as applied (one query)."""
    from feature_store.online.base import TableNotFound

    if not events:
        return []
    try:
        applied = fs.online.read_batch(APPLIED_EVENTS, [e.event_id for e in events], ["event_id"])
    except TableNotFound:
        return list(events)
    return [e for e in events if e.event_id not in applied]


def materialize_events(fs, version: int | None = None):
    """Insert logged events not yet in the `transactions` group (version: latest) as one
    commit; returns the InsertResult, or None when there was nothing new."""
    fgv = fs.get_feature_group("transactions", version)
    events = read_event_log(fs.wd)
    if events.empty:
        return None
    have = fgv.read()
    seen = set(have["event_id"].dropna()) if "event_id" in have.columns else set()
    new = events[~events["event_id"].isin(seen)]
    if new.empty:
        return None
    return fgv.insert(new.reset_index(drop=True), validation="strict")
