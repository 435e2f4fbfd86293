"""The prediction log: what serving showed, joined later with what customers then did.

Serving appends one JSON line per answered request to `<workdir>/logs/predictions/<day>.jsonl`:

    {"request_id", "ts", "customer_id", "endpoint", "model", "index_version", "source",
     "degraded", "items": [{"article_id", "position", "score", "features": {...}}],
     "candidates": [[article_id, ranker score], ...]}

`items` are the articles shown, with the ranker's feature values for each (the features used);
`candidates` are every candidate the ranker scored, with its score (retrieval order; null in
popularity answers). Writes go through a bounded queue to a
background thread, so logging never slows a request; when the queue is full a record is
dropped and counted rather than blocking. The thread wakes once per `flush_s` at most and
writes what came meanwhile in one append per day file: a wake-up, an open, a lock and a
write per request would cost a replica more than the encoding itself. Records are JSON-encoded
by pydantic-core (same text as `json.dumps` with compact separators, about 5x faster for
these records; NaN is written as null, not as the invalid `NaN`). `labelled_impressions` joins shown items with the
click and purchase events that followed, the training data of a ranker learned from feedback.

The log is bounded: a day's file is closed at `segment_bytes` and the next one opened
(`<day>.jsonl`, then `<day>.1.jsonl`, `<day>.2.jsonl`, ...), and when the folder holds more than
`max_bytes` the oldest files are removed, whole, and reported (`removed_files`). At 150 answers
a second the demo run logged about 1.4 MB/s (9 kB per answer, before the scored candidates were
added to it: an id and a 5-decimal score each), so without a bound a day of load
would fill the disk, and a full disk would cost the event log its durable writes too.
"""
from __future__ import annotations

import fcntl
import json
import os
import queue
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic_core import to_json

from feature_store.offline import to_event_times

LABEL_WINDOW = pd.Timedelta(days=7)


class PredictionLog:
    """Appends records to day files from a background thread, in batches of what arrived within
    `flush_s` (a record is on disk at most about `flush_s` after `log`; `close` writes at once)."""

    def __init__(self, folder: Path, max_queue: int = 10_000, flush_s: float = 0.5,
                 segment_bytes: int = 64 << 20, max_bytes: int | None = 2 << 30):
        """`segment_bytes`: size at which a day's file is closed and the next one opened;
        `max_bytes`: size of the folder past which the oldest files go (None: keep everything)."""
        if segment_bytes <= 0 or (max_bytes is not None and max_bytes < segment_bytes):
            raise ValueError(f"prediction log: segment_bytes ({segment_bytes}) must be > 0 and at most "
                             f"max_bytes ({max_bytes})")
        self.folder = Path(folder)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.removed_files = 0  # old files removed to stay under max_bytes
        self._segment: dict[str, int] = {}  # day -> number of the file being appended to
        self.dropped = 0
        self.written = 0
        self.batches = 0  # appends made (each one write per day file present in the batch)
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self._flush_s = flush_s
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prediction-log")
        self._thread.start()

    def log(self, record: Mapping[str, Any]) -> bool:
        """Queue one record; False (and counted) when the queue is full."""
        try:
            self._q.put_nowait(dict(record))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the thread."""
        self._closing.set()  # cut the batching wait short
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:  # the thread is draining a full queue: it stops at _closing
            pass
        self._thread.join(timeout)

    def _run(self) -> None:
        done = False
        while not done:
            item = self._q.get()  # sleep until the first record of a batch
            # Let the batch fill for flush_s without waking per record (a queue get would).
            self._closing.wait(self._flush_s)
            batch: list[dict[str, Any]] = []
            try:
                while True:
                    if item is None:
                        done = True
                        break
                    batch.append(item)
                    item = self._q.get_nowait()
            except queue.Empty:
                pass
            done = done or (self._closing.is_set() and self._q.empty())
            if batch:
                try:
                    self._write(batch)
                except OSError as e:  # a full disk must not take serving down
                    self.dropped += len(batch)
                    print(f"[prediction-log] dropped {len(batch)} records: {e}", flush=True)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        by_day: dict[str, list[bytes]] = {}
        for rec in batch:
            by_day.setdefault(str(rec.get("ts", ""))[:10] or "unknown", []).append(to_json(rec, fallback=str, inf_nan_mode="null"))
        rolled = False
        for day, lines in by_day.items():
            path = self._current(day)
            with open(path, "ab") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # every replica appends to the same day file
                try:
                    f.write(b"\n".join(lines) + b"\n")
                    f.flush()
                    full = f.tell() >= self.segment_bytes
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
            if full:  # the next batch goes to the day's next file (another replica may open it first)
                self._segment[day] += 1
                segment_path(self.folder, day, self._segment[day]).touch()
                rolled = True
        self.written += len(batch)
        self.batches += 1
        if rolled and self.max_bytes is not None:
            try:
                self._prune()
            except OSError as e:  # the batch is written: a failed clean-up must not count it as dropped
                print(f"[prediction-log] could not remove old files: {e}", flush=True)

    def _current(self, day: str) -> Path:
        """The day's file to append to: the newest one, which another replica may have opened."""
        n = self._segment.get(day)
        if n is None:
            n = max((k for d, k, _ in log_files(self.folder) if d == day), default=0)
        while segment_path(self.folder, day, n + 1).exists():
            n += 1
        self._segment[day] = n
        return segment_path(self.folder, day, n)

    def _prune(self) -> None:
        """Remove the oldest files, whole, until the folder holds at most `max_bytes`."""
        files = []
        for _, _, p in log_files(self.folder):
            try:
                files.append((p, p.stat().st_size))
            except FileNotFoundError:  # another replica removed it meanwhile
                pass
        total, removed = sum(size for _, size in files), []
        for p, size in files[:-1]:  # never the newest
            if total <= self.max_bytes:
                break
            try:
                p.unlink()
            except FileNotFoundError:  # another replica removed it first
                pass
            total -= size
            removed.append(p.name)
        if removed:
            self.removed_files += len(removed)
            print(f"[prediction-log] removed {len(removed)} oldest file(s) ({', '.join(removed[:3])}"
                  f"{', ...' if len(removed) > 3 else ''}) to keep {self.folder} under "
                  f"{self.max_bytes >> 20} MB (serve.prediction_log_max_mb)", flush=True)


_SEGMENT = re.compile(r"^(?P<day>[^.]+)(?:\.(?P<n>\d+))?\.jsonl$")


def segment_path(folder: Path, day: str, n: int) -> Path:
    """`<day>.jsonl` for a day's first file, `<day>.<n>.jsonl` for the next ones."""
    return folder / (f"{day}.jsonl" if n == 0 else f"{day}.{n}.jsonl")


def log_files(folder: Path) -> list[tuple[str, int, Path]]:
    """The log's files as (day, number, path), oldest first."""
    out = []
    for name in os.listdir(folder) if Path(folder).is_dir() else []:
        m = _SEGMENT.match(name)
        if m:
            out.append((m["day"], int(m["n"] or 0), Path(folder) / name))
    return sorted(out)


def read_predictions(folder: Path) -> pd.DataFrame:
    """One row per shown item: request_id, ts, customer_id, article_id, position, score,
    model, index_version, source, degraded, and one `f_<name>` column per logged feature."""
    rows = []
    for _, _, p in log_files(Path(folder)):
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:  # removed meanwhile by a replica keeping the log under its bound
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            base = {k: rec.get(k) for k in ("request_id", "ts", "customer_id", "endpoint", "model",
                                             "index_version", "source", "degraded")}
            for it in rec.get("items", []):
                feats = {f"f_{k}": v for k, v in (it.get("features") or {}).items()}
                rows.append({**base, "article_id": it["article_id"], "position": it["position"],
                             "score": it["score"], **feats})
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["ts"] = to_event_times(frame["ts"])
    return frame


def labelled_impressions(shown: pd.DataFrame, purchases: pd.DataFrame, interactions: pd.DataFrame,
                         window: pd.Timedelta = LABEL_WINDOW) -> pd.DataFrame:
    """Shown items with labels: `clicked` / `bought` is 1 when the same customer clicked (or
    added to cart) / bought the same article within `window` after it was shown.

    Args:
        shown: `read_predictions` output.
        purchases: `feature_store.events.read_event_log` (customer_id, article_id, t_dat).
        interactions: `feature_store.events.read_interactions` (customer_id, article_id, type, ts).
    """
    out = shown.copy()
    if out.empty:
        return out.assign(clicked=pd.Series(dtype="int64"), bought=pd.Series(dtype="int64"))
    clicks = interactions[interactions["type"].isin(["click", "add_to_cart"])].rename(columns={"ts": "t"}) \
        if len(interactions) else pd.DataFrame(columns=["customer_id", "article_id", "t"])
    buys = purchases.rename(columns={"t_dat": "t"}) if len(purchases) else pd.DataFrame(
        columns=["customer_id", "article_id", "t"])
    out["clicked"] = _followed(out, clicks[["customer_id", "article_id", "t"]], window)
    out["bought"] = _followed(out, buys[["customer_id", "article_id", "t"]], window)
    return out


def _followed(shown: pd.DataFrame, events: pd.DataFrame, window: pd.Timedelta) -> pd.Series:
    """1 where an event of the same (customer, article) came within `window` after the showing."""
    if events.empty:
        return pd.Series(0, index=shown.index, dtype="int64")
    ev = events.assign(t=to_event_times(events["t"]))
    m = shown[["customer_id", "article_id", "ts"]].reset_index().merge(ev, on=["customer_id", "article_id"])
    hit = m[(m["t"] >= m["ts"]) & (m["t"] <= m["ts"] + window)]["index"].unique()
    return pd.Series(shown.index.isin(hit).astype("int64"), index=shown.index)
