"""Shedding by queue delay (ray_apps.shedding): the rule, and the guard that applies it."""
from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from common.config import ServeConfig
from ray_apps import shedding
from ray_apps.app import Guard, _shedder
from ray_apps.metrics import NullMetrics
from ray_apps.shedding import QueueDelayShedder, received_us

T0 = 1_800_000_000.0  # seconds since the epoch


def us(seconds: float) -> int:
    return round(seconds * 1e6)


def test_a_short_wait_is_always_let_through_and_a_long_one_only_before_interval_passes():
    s = QueueDelayShedder(delay_ms=10, interval_ms=100, last_short=T0)
    assert s.admit(us(T0 + 0.050), T0 + 0.080)  # waited 30 ms, 80 ms after the last short wait
    assert s.admit(us(T0 + 0.060), T0 + 0.100)  # 100 ms after: still within the interval
    assert not s.admit(us(T0 + 0.070), T0 + 0.101)  # none waited <= 10 ms for 101 ms: standing
    assert not s.admit(us(T0 + 0.100), T0 + 0.150)
    assert s.admit(us(T0 + 0.145), T0 + 0.155)  # a 10 ms wait: the queue drained
    assert s.last_short == T0 + 0.155
    assert s.admit(us(T0 + 0.150), T0 + 0.200)  # so a long wait passes again, for an interval


def test_a_stall_shorter_than_the_interval_refuses_nothing():
    """150 req/s, 3 ms per request, and the app stalled for the first 80 ms: the backlog
    waits up to 80 ms and drains within about 100 ms more, inside an interval of 200 ms."""
    s = QueueDelayShedder(delay_ms=10, interval_ms=200, last_short=T0)
    free, waits = T0 + 0.080, []
    for i in range(150):
        arrived = T0 + i / 150
        seen = max(arrived, free)
        free = seen + 0.003
        waits.append(seen - arrived)
        assert s.admit(us(arrived), seen)
    assert max(waits) > 0.07 and waits[-1] == 0  # it did stall, and it drained


def test_requests_that_waited_less_than_the_delay_keep_the_shedder_open_in_an_overload():
    s = QueueDelayShedder(delay_ms=10, interval_ms=100, last_short=T0 - 1)
    now = T0
    refused = 0
    for i in range(100):  # alternate 40 ms and 5 ms waits, 10 ms apart
        now += 0.01
        waited = 0.04 if i % 2 else 0.005
        refused += not s.admit(us(now - waited), now)
    assert refused == 0


@pytest.mark.parametrize("bad", [(0, 100), (10, 0), (-1, 100)])
def test_settings_must_be_positive(bad):
    with pytest.raises(ValueError, match="must be > 0"):
        QueueDelayShedder(*bad)


@pytest.mark.parametrize("value, expected", [("1796078075081364", 1796078075081364), (None, None), ("", None),
                                             ("-5", None), ("12.5", None), ("1e6", None), ("\u00b2", None)])
def test_the_header_is_a_plain_integer_or_ignored(value, expected):
    assert received_us(value) == expected


def test_the_config_turns_shedding_on_and_app_args_override_it():
    assert _shedder(ServeConfig(), None, None, None) is None  # off by default
    on = _shedder(ServeConfig(shed_delay_ms=15, shed_interval_ms=300), None, None, None)
    assert (on.delay_ms, on.interval_ms) == (15, 300)
    assert _shedder(ServeConfig(shed_delay_ms=15), 0, None, on) is None  # the app's args turn it off
    assert _shedder(ServeConfig(shed_delay_ms=15, shed_interval_ms=300), None, None, on) is on  # a reload keeps state
    other = _shedder(ServeConfig(shed_delay_ms=15, shed_interval_ms=300), 20, None, on)
    assert other is not on and other.delay_ms == 20


def app_with(shedder: QueueDelayShedder | None) -> TestClient:
    app = FastAPI()
    app.add_middleware(Guard)
    app.state.shedder = shedder
    app.state.metrics = NullMetrics()
    app.state.retry_after_s = 2

    @app.get("/v1/seen")
    async def seen() -> dict:
        return {"received_us": shedding.RECEIVED_US.get()}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    return TestClient(app)


def test_the_guard_refuses_what_waited_too_long_in_a_standing_overload():
    c = app_with(QueueDelayShedder(delay_ms=10, interval_ms=50, last_short=time.time() - 10))
    old = {shedding.RECEIVED_HEADER: str(us(time.time() - 1))}  # waited a second
    r = c.get("/v1/seen", headers=old)
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.headers[shedding.REFUSED_HEADER] == shedding.REASON and r.content == shedding.MESSAGE.encode()
    assert c.get("/healthz", headers=old).status_code == 200  # health checks are never shed
    fresh = us(time.time())
    r = c.get("/v1/seen", headers={shedding.RECEIVED_HEADER: str(fresh)})
    assert r.status_code == 200 and r.json() == {"received_us": fresh}  # the handler sees when it came in
    assert c.get("/v1/seen", headers=old).status_code == 200  # a short wait reopened it for an interval


def test_without_the_header_or_a_shedder_nothing_is_shed():
    c = app_with(QueueDelayShedder(delay_ms=10, interval_ms=50, last_short=time.time() - 10))
    r = c.get("/v1/seen")
    assert r.status_code == 200 and r.json() == {"received_us": None}
    assert c.get("/v1/seen", headers={shedding.RECEIVED_HEADER: "junk"}).status_code == 200
    off = app_with(None)
    assert off.get("/v1/seen", headers={shedding.RECEIVED_HEADER: str(us(time.time() - 5))}).status_code == 200
