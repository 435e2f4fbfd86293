"""ray_apps/coalesce.py: requests waiting at a stage together share one batch call."""

import asyncio

import pytest

from ray_apps.coalesce import IN_APP, Coalescer, InFlight


class Batches:
    """A batch function that records its calls; `fail` arguments raise."""

    def __init__(self, fail=(), error=ValueError):
        self.calls: list[list] = []
        self.fail = set(fail)
        self.error = error

    def __call__(self, args):
        self.calls.append(list(args))
        if self.fail & set(args):
            raise self.error(f"bad {sorted(self.fail & set(args))}")
        return [a * 10 for a in args]


async def _gather(c, args):
    return await asyncio.gather(*(c.sized(a) for a in args), return_exceptions=True)


def test_callers_waiting_together_share_one_call_each_with_its_own_result():
    fn = Batches()
    out = asyncio.run(_gather(Coalescer(fn), [1, 2, 3]))
    assert fn.calls == [[1, 2, 3]]
    assert out == [(10, 3), (20, 3), (30, 3)]


def test_a_lone_call_and_later_calls_run_as_batches_of_their_own():
    fn = Batches()
    c = Coalescer(fn)

    async def one_by_one():
        return [await c(1), await c(2)]

    assert asyncio.run(one_by_one()) == [10, 20]
    assert fn.calls == [[1], [2]]


def test_batches_hold_at_most_max_batch():
    fn = Batches()
    out = asyncio.run(_gather(Coalescer(fn, max_batch=2), [1, 2, 3, 4, 5]))
    assert [r for r, _ in out] == [10, 20, 30, 40, 50]
    assert sorted(len(b) for b in fn.calls) == [1, 2, 2] and sorted(sum(fn.calls, [])) == [1, 2, 3, 4, 5]


def test_a_request_that_breaks_the_batch_fails_alone():
    fn = Batches(fail={2})
    out = asyncio.run(_gather(Coalescer(fn), [1, 2, 3]))
    assert out[0] == (10, 3) and out[2] == (30, 3)
    assert isinstance(out[1], ValueError) and "bad [2]" in str(out[1])
    assert fn.calls == [[1, 2, 3], [1], [2], [3]]  # the batch, then each member alone


def test_a_timeout_reaches_every_member_without_running_them_again():
    fn = Batches(fail={2}, error=TimeoutError)
    out = asyncio.run(_gather(Coalescer(fn), [1, 2, 3]))
    assert all(isinstance(r, TimeoutError) for r in out)
    assert fn.calls == [[1, 2, 3]]


def test_a_batch_function_returning_the_wrong_count_is_an_error_per_member():
    out = asyncio.run(_gather(Coalescer(lambda args: []), [1, 2]))
    assert all(isinstance(r, RuntimeError) and "returned 0 results for 1 requests" in str(r) for r in out)


def test_members_still_get_answers_when_the_leaders_request_is_cancelled():
    fn = Batches()
    c = Coalescer(fn, rounds=3)

    async def main():
        leader = asyncio.ensure_future(c.sized(1))
        await asyncio.sleep(0)  # the leader opens the batch and yields
        member = asyncio.ensure_future(c.sized(2))
        await asyncio.sleep(0)  # the member joins
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        return await member

    assert asyncio.run(main()) == (20, 1)
    assert fn.calls == [[2]]


def test_a_request_alone_in_the_app_runs_its_call_at_once():
    """No other request in the app: nothing can join, so no loop turns are spent waiting (and
    no other request's work runs first)."""
    fn = Batches()
    inside = InFlight()
    inside.n = 1
    c = Coalescer(fn, alone=inside.alone)
    order = []

    async def other():
        order.append("other")

    async def main():
        t = asyncio.ensure_future(other())
        order.append(await c(1))
        await t

    asyncio.run(main())
    assert order == [10, "other"] and fn.calls == [[1]]
    inside.n = 2  # another request is in the app: wait for it
    out = asyncio.run(_gather(c, [1, 2]))
    assert out == [(10, 2), (20, 2)]


def test_the_guard_counts_requests_in_and_out_of_the_app():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from ray_apps.app import Guard

    app = FastAPI()
    app.add_middleware(Guard)

    @app.get("/v1/inside")
    async def inside() -> dict:
        return {"n": IN_APP.n}

    @app.get("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    before = IN_APP.n
    c = TestClient(app, raise_server_exceptions=False)
    assert c.get("/v1/inside").json() == {"n": before + 1}
    assert c.get("/v1/boom").status_code == 500
    assert IN_APP.n == before  # counted out after an error too


def test_bad_sizes_are_refused():
    for kwargs in ({"max_batch": 0}, {"rounds": -1}):
        with pytest.raises(ValueError, match="max_batch must be >= 1"):
            Coalescer(lambda a: a, **kwargs)


def test_coalesced_calls_share_encode_and_rank_and_say_the_batch_size():
    """`serve.fused_calls: coalesced`: concurrent requests reach Recommender.encode_many and
    rank_many once, on the request loop, and each rank answer says how many shared the call."""
    from common.config import load_config
    from ray_apps.app import AppArgs, CoalescedCalls

    class Stages:
        def __init__(self):
            self.encoded, self.ranked = [], []

        def encode_many(self, reqs):
            self.encoded.append(list(reqs))
            return [f"ctx-{c}" for c, _, _ in reqs]

        def rank_many(self, reqs):
            self.ranked.append(list(reqs))
            return [{"items": [ctx]} for _, ctx, _, _, _ in reqs]

    stages = Stages()
    calls = CoalescedCalls(stages)

    async def one(cid):
        ctx = await calls.encode(cid, 10, 2)
        return await calls.rank([], ctx, 12, None, None)

    async def main():
        return await asyncio.gather(one("a"), one("b"))

    IN_APP.n += 2  # as the guard counts two requests in the app
    try:
        answers = asyncio.run(main())
    finally:
        IN_APP.n -= 2
    assert answers == [{"items": ["ctx-a"], "batch": 2}, {"items": ["ctx-b"], "batch": 2}]
    assert stages.encoded == [[("a", 10, 2), ("b", 10, 2)]] and len(stages.ranked) == 1
    assert AppArgs(workdir="w", fused_calls="coalesced").fused_calls == "coalesced"
    assert load_config(None, {"serve": {"fused_calls": "coalesced"}}).serve.fused_calls == "coalesced"
