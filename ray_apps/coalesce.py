"""Requests waiting at a stage together run as ONE batch call, on the event loop that serves them.

Why: on these VMs a stage call pays a large fixed cost (a database round trip, a model call, and
caches gone cold since the last call): the encoder and the ranker took 4.6-4.9 ms of CPU for a
request alone and 2.8-2.9 ms per request four to a call (docs/scaling.md F38, serve_load.py's
"stage_batch_cost").
Serve's `@serve.batch` shares that cost but runs the batch in a worker thread behind a queue, and
on these VMs a thread hop costs more than it saves (F20, F25). Here the first request to reach a
stage leads: it yields to the loop a few times so that requests already delivered to the replica
can reach the same stage, then runs the batch call itself and hands each member its result. A
request alone in the app (`InFlight`) does not wait: it runs its call at once, as `inline` would;
a busy replica runs its queue in batches, which drains it faster exactly when it is long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

ROUNDS = 4  # loop turns the leader waits: a request needs a few to get from Serve to a stage


class InFlight:
    """How many requests are inside the app now: the ASGI guard counts each one in and out, so a
    stage knows whether another request may be on its way to it."""

    def __init__(self) -> None:
        self.n = 0

    def alone(self) -> bool:
        return self.n <= 1


IN_APP = InFlight()  # one per replica process (a module's attribute: Serve pickles the app)


class Coalescer(Generic[A, R]):
    """`await c(args)` -> `fn([args, ...])[i]`, with the calls made while a leader waits in one
    batch of at most `max_batch`. One event loop per coalescer (the replica's request loop).

    A batch that raises is run again one member at a time, so that a request that breaks the
    call fails alone; except on `TimeoutError`, which every member then gets (a slow store is
    slow for all of them, and running them one by one would multiply the wait)."""

    def __init__(self, fn: Callable[[Sequence[A]], Sequence[R]], max_batch: int = 16, rounds: int = ROUNDS,
                 alone: Callable[[], bool] | None = None):
        """`alone`: true when no other request can join (then the call runs at once)."""
        if max_batch < 1 or rounds < 0:
            raise ValueError(f"max_batch must be >= 1 and rounds >= 0, got {max_batch}, {rounds}")
        self.fn = fn
        self.alone = alone
        self.max_batch = max_batch
        self.rounds = rounds
        self._open: list[tuple[A, asyncio.Future | None]] | None = None  # the batch a leader holds open

    async def __call__(self, args: A) -> R:
        return (await self.sized(args))[0]

    async def sized(self, args: A) -> tuple[R, int]:
        """The result and the size of the batch it came from."""
        batch = self._open
        if batch is not None and len(batch) < self.max_batch:
            fut = asyncio.get_running_loop().create_future()
            batch.append((args, fut))
            return await fut
        rounds = 0 if self.alone is not None and self.alone() else self.rounds  # alone: nobody can join
        batch = [(args, None)]
        self._open = batch
        cancelled: BaseException | None = None
        try:
            for _ in range(rounds):
                await asyncio.sleep(0)
                if len(batch) >= self.max_batch:
                    break
        except asyncio.CancelledError as e:  # the leader's request went away: its members still run
            cancelled = e
        finally:
            if self._open is batch:
                self._open = None
        run = batch[1:] if cancelled is not None else batch
        outcomes = self._run([a for a, _ in run]) if run else []
        n = len(run)
        for (_, fut), (ok, value) in zip(run, outcomes, strict=True):
            if fut is not None and not fut.done():  # a member cancelled meanwhile has no one to tell
                if ok:
                    fut.set_result((value, n))
                else:
                    fut.set_exception(value)
        if cancelled is not None:
            raise cancelled
        ok, value = outcomes[0]
        if not ok:
            raise value
        return value, n

    def _run(self, args: list[A]) -> list[tuple[bool, Any]]:
        """(True, result) or (False, exception) per member."""
        try:
            return [(True, r) for r in self._call(args)]
        except TimeoutError as e:
            return [(False, e)] * len(args)
        except Exception as e:
            if len(args) == 1:
                return [(False, e)]
        return [self._one(a) for a in args]

    def _one(self, a: A) -> tuple[bool, Any]:
        try:
            return True, self._call([a])[0]
        except Exception as e:
            return False, e

    def _call(self, args: list[A]) -> list[R]:
        out = list(self.fn(args))
        if len(out) != len(args):
            raise RuntimeError(f"batch call returned {len(out)} results for {len(args)} requests")
        return out
