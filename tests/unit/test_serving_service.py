"""Plain parts of serving: the store circuit breaker, the last-good cache, popularity, the
prediction log and its join with later events (no Ray, no database)."""
import json
import time
import types
from pathlib import Path

import pandas as pd
import pytest

from common.config import FilterConfig
from ray_apps.service import LastGood, StoreGuard, StoreUnavailable
from training.feedback import PredictionLog, labelled_impressions, read_predictions
from training.popularity import is_cold, popular_articles, popular_ranked


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_store_guard_pauses_after_a_failure_then_retries_by_itself():
    clock, calls = Clock(), []
    guard = StoreGuard(retry_s=1.0, clock=clock)

    def down():
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(StoreUnavailable, match="refused"):
        guard.call(down)
    with pytest.raises(StoreUnavailable, match="paused"):
        guard.call(down)  # refused without touching the store
    assert len(calls) == 1 and guard.open
    clock.t += 1.01
    assert guard.call(lambda: "back") == "back" and not guard.open
    with pytest.raises(ValueError):  # a bug is not an outage: it propagates and does not trip
        guard.call(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert not guard.open


def test_last_good_keeps_the_most_recent_rows_within_its_size():
    lg = LastGood(size=2)
    lg.put("a", 1)
    lg.put("b", 2)
    lg.get("a")
    lg.put("a", 3)
    lg.put("c", 4)
    assert lg.get("b") is None and lg.get("a") == 3 and lg.get("c") == 4


def test_last_good_rows_are_returned_equal_and_give_the_garbage_collector_nothing_to_walk():
    """A full cache must not lengthen the replica's full collections: the rows come back equal
    (and as copies a caller may change), but what the cache holds is not tracked by the GC."""
    import gc

    lg = LastGood(size=10)
    row = ({"customer_id": "c1", "age": 31.0}, {"purchased": ["a1", "a2"], "type_counts": {"Dress": 2}})
    lg.put("c1", row)
    got = lg.get("c1")
    assert got == row and got is not row
    got[1]["purchased"].append("a3")
    assert lg.get("c1") == row
    assert not any(gc.is_tracked(v) for v in lg._rows.values()) and len(lg) == 1


def _tx():
    rows = [("2020-09-01", "old", "A")] * 5 + [("2020-09-20", "kid", "B")] * 3 + [("2020-09-21", "adult", "C")] * 3 \
        + [("2020-09-21", "kid", "C")]
    tx = pd.DataFrame(rows, columns=["t_dat", "customer_id", "article_id"])
    tx["t_dat"] = pd.to_datetime(tx["t_dat"])
    customers = pd.DataFrame({"customer_id": ["old", "kid", "adult"], "age": [70.0, 15.0, 30.0]})
    return tx, customers


def test_popular_articles_are_last_weeks_per_age_group_filled_by_all_time():
    tx, customers = _tx()
    pop = popular_articles(tx, customers, days=7, top=3)
    assert pop["overall"] == ["C", "B", "A"]  # last week's sales first, all-time fills up
    assert pop["by_age_group"]["0-18"] == ["B", "C", "A"] and pop["by_age_group"]["26-35"] == ["C", "B", "A"]
    assert pop["as_of"] == "2020-09-21"


def test_popular_ranked_applies_the_business_rules():
    tx, customers = _tx()
    pop = popular_articles(tx, customers, days=7, top=3)
    rows = {"B": {"stock": 0.0}, "C": {"min_age": 18}, "A": {"stock": 5.0}}
    out = popular_ranked(pop, {"age": 15.0}, {"purchased": []}, rows, FilterConfig(), k=3)
    assert [i["article_id"] for i in out["items"]] == ["A"]  # B sold out, C age-restricted for a 15-year-old
    assert out["removed"]["sold_out"] == 1 and out["removed"]["age_restricted"] == 1
    adult = popular_ranked(pop, {"age": 30.0}, {"purchased": ["A"]}, rows, FilterConfig(), k=3)
    assert [i["article_id"] for i in adult["items"]] == ["C"]  # A already bought
    assert is_cold(None, None) and is_cold(None, {"purchased": []}) and not is_cold(None, {"purchased": ["A"]})


def test_prediction_log_writes_in_the_background_and_joins_with_events(tmp_path):
    log = PredictionLog(tmp_path / "p", flush_s=0.05)
    for rid, items in (("r1", ["A", "B", "C"]), ("r2", ["D"])):
        assert log.log({"request_id": rid, "ts": "2020-09-22T10:00:00", "customer_id": "c1", "source": "ranked",
                        "items": [{"article_id": a, "position": i, "score": 1.0 - i, "features": {"price": 0.1}}
                                  for i, a in enumerate(items)]})
    log.close()
    shown = read_predictions(tmp_path / "p")
    assert shown["request_id"].tolist() == ["r1", "r1", "r1", "r2"] and "f_price" in shown.columns
    buys = pd.DataFrame({"customer_id": ["c1", "c1"], "article_id": ["B", "D"],
                         "t_dat": pd.to_datetime(["2020-09-23", "2020-10-30"])})  # D: too late
    clicks = pd.DataFrame({"customer_id": ["c1"], "article_id": ["A"], "type": ["click"],
                           "ts": pd.to_datetime(["2020-09-22T10:01:00"])})
    out = labelled_impressions(shown, buys, clicks).set_index("article_id")
    assert out["bought"].to_dict() == {"A": 0, "B": 1, "C": 0, "D": 0}
    assert out["clicked"].to_dict() == {"A": 1, "B": 0, "C": 0, "D": 0}


def test_prediction_log_drops_and_counts_when_full(tmp_path):
    log = PredictionLog(tmp_path / "p", max_queue=1, flush_s=5)
    results = [log.log({"request_id": str(i), "ts": "2020-09-22T00:00:00", "items": []}) for i in range(50)]
    assert not all(results) and log.dropped == results.count(False)
    log.close()
    lines = (tmp_path / "p" / "2020-09-22.jsonl").read_text().splitlines()
    assert len(lines) == results.count(True) and json.loads(lines[0])["request_id"] == "0"
    time.sleep(0)


def test_prediction_log_writes_what_arrived_within_flush_s_in_one_append(tmp_path):
    log = PredictionLog(tmp_path / "p", flush_s=0.5)
    for i in range(20):
        assert log.log({"request_id": f"r{i}", "ts": "2020-09-22T10:00:00", "score": float("nan"),
                        "items": [{"article_id": "A", "position": 0, "score": 0.5, "features": {"t": "it's; DROP"}}]})
    path = tmp_path / "p" / "2020-09-22.jsonl"
    deadline = time.time() + 20
    while log.written < 20 and time.time() < deadline:
        time.sleep(0.05)
    assert log.written == 20 and log.batches == 1  # one wake-up and one append, not 20
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["request_id"] for r in lines] == [f"r{i}" for i in range(20)]
    assert lines[0]["score"] is None and lines[0]["items"][0]["features"] == {"t": "it's; DROP"}
    log.close()


def test_prediction_log_close_writes_at_once_without_waiting_for_the_batch_window(tmp_path):
    log = PredictionLog(tmp_path / "p", flush_s=600)
    assert log.log({"request_id": "r1", "ts": "2020-09-22T10:00:00", "items": []})
    log.close(timeout=10)
    assert not log._thread.is_alive()  # a close that waited out flush_s would still be joining
    assert json.loads((tmp_path / "p" / "2020-09-22.jsonl").read_text())["request_id"] == "r1"


def _logged(log: PredictionLog, n: int, day: str = "2020-09-22", start: int = 0) -> None:
    """Log n ~0.5 kB answers, each in an append of its own (as answers spread over time are)."""
    for i in range(n):
        assert log.log({"request_id": f"r{start + i}", "ts": f"{day}T10:00:00", "customer_id": "c1",
                        "items": [{"article_id": "A", "position": 0, "score": 0.5, "features": {"pad": "x" * 400}}]})
        deadline = time.time() + 10
        while log.written < i + 1 and time.time() < deadline:
            time.sleep(0.002)
    log.close()


def test_prediction_log_opens_a_days_next_file_at_the_segment_size_and_reads_them_all(tmp_path):
    log = PredictionLog(tmp_path / "p", flush_s=0.01, segment_bytes=2_000, max_bytes=None)
    _logged(log, 40)  # ~0.5 kB each: ~20 kB, several files
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert "2020-09-22.jsonl" in names and "2020-09-22.1.jsonl" in names and len(names) >= 3
    assert all(p.stat().st_size < 2_000 + 40 * 600 for p in (tmp_path / "p").iterdir())
    shown = read_predictions(tmp_path / "p")
    assert sorted(shown["request_id"], key=lambda r: int(r[1:])) == [f"r{i}" for i in range(40)]
    assert log.removed_files == 0


def test_prediction_log_removes_its_oldest_files_to_stay_under_max_bytes(tmp_path, capsys):
    folder = tmp_path / "p"
    _logged(PredictionLog(folder, flush_s=0.01, segment_bytes=2_000, max_bytes=None), 20, day="2020-09-21")
    log = PredictionLog(folder, flush_s=0.01, segment_bytes=2_000, max_bytes=6_000)
    _logged(log, 60, day="2020-09-22", start=100)
    files = sorted(folder.iterdir())
    assert sum(p.stat().st_size for p in files) <= 6_000 + 2_000  # the bound, plus the file being written
    assert log.removed_files > 0 and not any(p.name.startswith("2020-09-21") for p in files)  # oldest day first
    ids = set(read_predictions(folder)["request_id"])
    assert "r159" in ids and "r0" not in ids  # the newest answers are kept
    assert "removed" in capsys.readouterr().out


def test_prediction_log_appends_to_the_newest_file_another_writer_opened(tmp_path):
    folder = tmp_path / "p"
    _logged(PredictionLog(folder, flush_s=0.01, segment_bytes=1_000, max_bytes=None), 10)
    newest = max(int(p.name.split(".")[1]) if p.name.count(".") == 2 else 0 for p in folder.iterdir())
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    _logged(PredictionLog(folder, flush_s=0.01, segment_bytes=1_000_000, max_bytes=None), 1, start=50)
    grown = [p.name for p in folder.iterdir() if p.stat().st_size != before.get(p.name)]
    assert grown == [f"2020-09-22.{newest}.jsonl"]  # not the day's first file, not a new one


def test_prediction_log_bound_must_hold_a_file():
    from common.config import ServeConfig

    with pytest.raises(ValueError, match="prediction_log_max_mb"):
        ServeConfig(prediction_log_max_mb=10, prediction_log_segment_mb=64)
    assert ServeConfig(prediction_log_max_mb=0).prediction_log_args()["max_bytes"] is None
    with pytest.raises(ValueError, match="segment_bytes"):
        PredictionLog(Path("unused"), segment_bytes=0)


def test_purchase_events_count_and_date_types_by_the_runs_dataset_roles():
    from common.artifacts import new_manifest
    from ray_apps.service import Recommender

    def recommender(extra):
        rec = object.__new__(Recommender)  # only the manifest is read
        rec.manifest = new_manifest("run")
        rec.manifest.extra.update(extra)
        return rec

    assert recommender({}).type_column == "product_type_name"  # H&M (a run from before roles were recorded)
    roles = {"kind": "generic", "user_categorical": ["gender"], "item_categorical": ["genres", "decade"],
             "has_price": False}
    assert recommender({"dataset": {"name": "ml", "roles": roles}}).type_column == "genres"
    assert recommender({"dataset": {"name": "ml", "roles": {**roles, "item_categorical": []}}}).type_column is None


class CountingMetrics:
    def __init__(self):
        self.events = []

    def event(self, kind, result):
        self.events.append((kind, result))


def test_events_retried_are_acknowledged_not_logged_again_and_pending_ones_are_counted_as_pending(tmp_path):
    """A retried view is `applied: false` and not appended again; a purchase the store could not
    take is counted `pending`, not `duplicate`."""
    import threading
    from collections import OrderedDict

    from common.workdir import Workdir
    from feature_store.events import event_log_dir, interaction_log_dir
    from ray_apps.service import Recommender

    class DownGuard:
        def call(self, fn, *args):
            raise StoreUnavailable("down")

    rec = object.__new__(Recommender)  # the event path only: a workdir, a guard, metrics
    rec.wd, rec.guard, rec.metrics, rec._ranker = Workdir.at(tmp_path), DownGuard(), CountingMetrics(), None
    rec._pending, rec._events_lock, rec._logged_interactions = [], threading.Lock(), OrderedDict()
    rec._retry_pending_later = lambda: None
    view = {"event_id": "v1", "customer_id": "c1", "article_id": "a1", "type": "view", "ts": "2020-10-01T12:00:00"}
    buy = {"event_id": "p1", "customer_id": "c1", "article_id": "a1", "type": "purchase", "price": 0.02,
           "ts": "2020-10-01T12:01:00", "sales_channel": 2}
    first = rec.record_events([view, buy])
    assert first == [{"event_id": "v1", "type": "view", "applied": True, "pending": False},
                     {"event_id": "p1", "type": "purchase", "applied": False, "pending": True}]
    again = rec.record_events([view])
    assert again == [{"event_id": "v1", "type": "view", "applied": False, "pending": False}]
    lines = [ln for f in interaction_log_dir(rec.wd).glob("*.jsonl") for ln in f.read_text().splitlines() if ln]
    assert len(lines) == 1 and json.loads(lines[0])["event_id"] == "v1"
    assert len([ln for f in event_log_dir(rec.wd).glob("*.jsonl") for ln in f.read_text().splitlines() if ln]) == 1
    assert rec.metrics.events == [("purchase", "pending"), ("view", "applied"), ("purchase", "pending"),
                                  ("view", "duplicate")]


def test_a_purchase_whose_update_fails_while_the_store_is_up_keeps_the_others_and_is_tried_again(tmp_path):
    """An error other than the store being down (a lock wait, a server error) concerns that event
    only: the purchases after it are applied, it stays pending, and after MAX_APPLY_ATTEMPTS it is
    left to the event log with its error in the answer (before, every pending purchase was dropped)."""
    import threading
    from collections import OrderedDict

    from common.workdir import Workdir
    from ray_apps.service import MAX_APPLY_ATTEMPTS, Recommender

    applied: list[str] = []

    class Guard:
        def call(self, fn, event):
            if event.event_id == "bad":
                raise RuntimeError("Lock wait timeout exceeded")
            applied.append(event.event_id)
            return types.SimpleNamespace(applied=True)

    rec = object.__new__(Recommender)
    rec.wd, rec.guard, rec.metrics, rec._ranker = Workdir.at(tmp_path), Guard(), CountingMetrics(), None
    rec._pending, rec._events_lock, rec._logged_interactions = [], threading.Lock(), OrderedDict()
    rec._apply_failures, rec._retry_pending_later = {}, lambda: None

    def buy(event_id):
        return {"event_id": event_id, "customer_id": "c1", "article_id": "a1", "type": "purchase", "price": 0.02,
                "ts": "2020-10-01T12:01:00", "sales_channel": 2}

    first = rec.record_events([buy("bad"), buy("good")])
    assert first[0] == {"event_id": "bad", "type": "purchase", "applied": False, "pending": True,
                        "error": "RuntimeError: Lock wait timeout exceeded"}
    assert first[1] == {"event_id": "good", "type": "purchase", "applied": True, "pending": False}
    assert applied == ["good"] and [p.event_id for p in rec._pending] == ["bad"]
    for _ in range(MAX_APPLY_ATTEMPTS - 2):
        rec.record_events([])  # what the retry thread does
        assert [p.event_id for p in rec._pending] == ["bad"]
    last = rec.record_events([buy("later")])
    assert rec._pending == [] and applied == ["good", "later"] and rec._apply_failures == {}
    assert last == [{"event_id": "later", "type": "purchase", "applied": True, "pending": False}]
    assert rec.metrics.events.count(("purchase", "pending")) == MAX_APPLY_ATTEMPTS - 1  # one per try of "bad"
    assert rec.metrics.events.count(("purchase", "failed")) == 1


def test_settle_heap_freezes_what_is_loaded_and_still_collects_garbage_first():
    import gc
    import weakref

    from ray_apps.app import settle_heap

    class Node:
        pass

    loaded = [Node() for _ in range(1000)]  # stays: what a replica loaded
    cycle = Node()
    cycle.me = cycle  # garbage only a collection frees
    dead = weakref.ref(cycle)
    del cycle
    gc.disable()  # no automatic collection may free the cycle before settle_heap does
    try:
        settle_heap()
        assert dead() is None  # collected before freezing: garbage is not kept forever
        assert gc.get_freeze_count() >= len(loaded)
        later = Node()
        later.me = later
        gone = weakref.ref(later)
        del later
        settle_heap()  # another run loaded: unfreezes, collects, freezes again
        assert gone() is None and gc.get_freeze_count() >= len(loaded)
    finally:
        gc.enable()
        gc.unfreeze()
