"""Shedding by queue delay: refuse what waited too long, but only in a standing overload.

Why: a bound on the queue's length has to choose. Small bounds keep accepted requests fast when
the app is offered twice what it serves, but also refuse requests when the 2-core machine stalls
for a moment at a rate it sustains; large bounds ride out the stalls and let accepted requests
wait in overload (docs/scaling.md F36). The two differ in time, not in length: a stall's backlog
drains within a fraction of a second, an overload's stands.

The rule is the "controlled delay" of request queues in Facebook's servers (B. Maurer, "Fail at
Scale", ACM Queue 13(8), 2015), after CoDel: while some request in the last `interval_ms` waited
at most `delay_ms`, every request is let through (HAProxy's bounds still hold); once none has
for `interval_ms`, a request that waited longer than `delay_ms` gets a 503 with Retry-After at
once, before any parsing, to drain the standing queue. Measured on 2 cores with two replicas
(docs/scaling.md F37) it drained less than that: a request that finds a free slot waits less
than `delay_ms` and reopens the gate while others wait longer, so it is off by default.

How long a request waited: HAProxy stamps the time it received the request
(`RECEIVED_HEADER`, microseconds since the epoch, `rayrec-haproxy`), replacing any value a
client sent, and the replica compares it with its clock when the request reaches the app (after
HAProxy's queue, the replica's queue and its event loop). In a cluster that relies on the
nodes' clocks agreeing to within a fraction of `delay_ms`; a request without the header (Serve's
own proxy, a direct call) is never shed.
"""
from __future__ import annotations

import contextvars
import json
import time
from dataclasses import dataclass, field

RECEIVED_HEADER = "X-Rayrec-Received-Us"
REFUSED_HEADER = "X-Rayrec-Refused"  # why a 503: queue-full, queue-timeout (HAProxy), queue-delay (shed)
REASON = "queue-delay"
# When HAProxy received the request being handled (None without the header): set by the app's
# guard, read by a recommend's debug timings (how long it waited before the app saw it).
RECEIVED_US: contextvars.ContextVar[int | None] = contextvars.ContextVar("rayrec_received_us", default=None)
MESSAGE = json.dumps({"message": "the service is overloaded: the request waited too long in the queue, retry later"})


@dataclass
class QueueDelayShedder:
    """One replica's shedding state (not thread-safe: the replica's request loop calls it)."""

    delay_ms: float
    interval_ms: float
    last_short: float = field(default_factory=time.time)  # when a request last waited <= delay_ms

    def __post_init__(self) -> None:
        if self.delay_ms <= 0 or self.interval_ms <= 0:
            raise ValueError(f"delay_ms ({self.delay_ms}) and interval_ms ({self.interval_ms}) must be > 0")

    def admit(self, received_us: int, now: float) -> bool:
        """Whether a request HAProxy received at `received_us` may go on at time `now` (s)."""
        waited_ms = now * 1000.0 - received_us / 1000.0
        if waited_ms <= self.delay_ms:
            self.last_short = now
            return True
        return (now - self.last_short) * 1000.0 <= self.interval_ms


def received_us(value: str | None) -> int | None:
    """The header's value, or None when absent or not a plain integer."""
    if value is None or not (value.isascii() and value.isdigit()):  # isdigit() alone takes "²"
        return None
    return int(value)
