"""Hot reload without failed requests: the run a reload replaced is closed only once the requests
that came in while it was current have answered.

A request reads the replica's run (its recommender, store connection and index) when it starts
and keeps using it across its awaits; closing that run at the switch would fail it mid-way
(a closed store connection is no outage to degrade from, it is a 500). The ASGI guard counts
each request in and out under the run generation current when it came in.
"""
from __future__ import annotations

import asyncio
import time


class RunsInUse:
    """Requests in the app per run generation (one replica, its request loop)."""

    def __init__(self) -> None:
        self.generation = 0
        self.active: dict[int, int] = {}

    def enter(self) -> int:
        gen = self.generation
        self.active[gen] = self.active.get(gen, 0) + 1
        return gen

    def leave(self, gen: int) -> None:
        n = self.active[gen] - 1
        if n:
            self.active[gen] = n
        else:
            del self.active[gen]

    def advance(self) -> int:
        """Start a new generation (the new run is installed); returns the one that ended."""
        self.generation += 1
        return self.generation - 1

    def in_use(self, upto: int) -> int:
        """Requests still in flight from generation `upto` or before."""
        return sum(n for g, n in self.active.items() if g <= upto)

    async def drained(self, upto: int, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until no request of generation `upto` or before is in flight; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.in_use(upto):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll_s)
        return True


RUNS = RunsInUse()  # one per replica process (a module's attribute: Serve pickles the app)
