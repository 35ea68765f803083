"""The in-process limit storage: limits' counting, with a sweep that costs nothing per request."""

from __future__ import annotations

import asyncio
import gc

from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from proxy import limitstore
from proxy.config import Limits
from proxy.limitstore import SweptMemoryStorage, open_storage


async def test_memory_uri_opens_the_swept_storage():
    assert isinstance(open_storage(Limits("memory://")), SweptMemoryStorage)
    assert not isinstance(open_storage(Limits("redis://127.0.0.1:1")), SweptMemoryStorage)


async def test_counts_exactly_and_sweeps_only_what_expired():
    storage = SweptMemoryStorage()
    limiter = MovingWindowRateLimiter(storage)
    short, long = parse("3/second"), parse("3/hour")
    assert [await limiter.hit(short, "a") for _ in range(4)] == [True, True, True, False]
    assert [await limiter.hit(long, "b") for _ in range(4)] == [True, True, True, False]
    await asyncio.sleep(1.1)
    await storage._sweep()
    assert not any("/a/" in key for key in storage.events)  # expired: gone, lock and all
    assert [len(v) for k, v in storage.events.items() if "/b/" in k] == [3]
    assert await limiter.hit(short, "a") and not await limiter.hit(long, "b")


async def test_sweeps_at_most_every_interval(monkeypatch):
    monkeypatch.setattr(limitstore, "SWEEP_EVERY", 3600.0)
    storage = SweptMemoryStorage()
    limiter = MovingWindowRateLimiter(storage)
    swept = 0
    real = storage._sweep

    async def counting() -> None:
        nonlocal swept
        swept += 1
        await real()

    storage._sweep = counting  # type: ignore[method-assign]
    for i in range(500):
        await limiter.hit(parse("200/hour"), f"198.18.0.{i % 250}")
        await asyncio.sleep(0)
    assert swept == 1


async def test_moving_window_counts_without_limits_wrappers():
    storage = SweptMemoryStorage()
    assert [await storage.acquire_entry("k", 2, 60) for _ in range(3)] == [True, True, False]
    assert (await storage.get_moving_window("k", 2, 60))[1] == 2


async def test_concurrent_hits_count_exactly_without_a_lock_per_key():
    """Many requests of one address at once, interleaved by the event loop: exactly the limit is
    admitted, in the hourly window and in the daily counters, and no lock is kept per address."""
    storage = SweptMemoryStorage()
    gc.collect()  # earlier tests' garbage would otherwise be counted before and gone after
    locks_before = sum(isinstance(o, asyncio.Lock) for o in gc.get_objects())

    async def hourly() -> bool:
        await asyncio.sleep(0)
        return await storage.acquire_entry("hour/1.2.3.4", 50, 3600)

    async def daily() -> bool:
        await asyncio.sleep(0)
        return await storage.acquire_sliding_window_entry("day/1.2.3.4", 30, 86400)

    assert sum(await asyncio.gather(*(hourly() for _ in range(200)))) == 50
    assert sum(await asyncio.gather(*(daily() for _ in range(200)))) == 30
    gc.collect()
    assert sum(isinstance(o, asyncio.Lock) for o in gc.get_objects()) == locks_before
    # limits' own expiry task, which needs its locks, is still the one this storage replaces
    assert "_MemoryStorage__schedule_expiry" in vars(MemoryStorage)
    assert SweptMemoryStorage._MemoryStorage__schedule_expiry is SweptMemoryStorage._schedule_sweep


async def test_one_call_counts_as_limits_own_calls_do(monkeypatch):
    """`hit_moving` and `hit_sliding` decide as limits' `acquire_entry` + `get_moving_window` and
    `acquire_sliding_window_entry` do, request by request, on a clock that jumps about windows' edges."""
    import random

    import limits.aio.storage.memory as limits_memory

    clock = [1_700_000_000.0]

    class Clock:
        @staticmethod
        def time() -> float:
            return clock[0]

    monkeypatch.setattr(limits_memory, "time", Clock)
    ours, theirs = SweptMemoryStorage(), MemoryStorage()
    draw = random.Random(7)
    for step in range(3000):
        clock[0] += draw.choice((0.0, 0.001, 0.4, 3.0, 17.0, 59.9))
        key = draw.choice(("a", "b", "c"))
        now = clock[0]
        admitted = await theirs.acquire_entry("m/" + key, 5, 60)
        start, count = await theirs.get_moving_window("m/" + key, 5, 60)
        assert ours.hit_moving("m/" + key, 5, 60, now) == (admitted, start, count), step
        assert ours.hit_sliding("s/" + key, 7, 60, now) == await theirs.acquire_sliding_window_entry("s/" + key, 7, 60), step
    # Entries past the limit are dropped as they fall out of the window's reach: at most 5 a key.
    assert max(len(events) for events in ours.events.values()) == 5


async def test_a_sweep_visits_only_what_is_due(monkeypatch):
    """Keys leave when their newest entry or their counter expires, each visited once it is due:
    an address seen once costs one visit, not one every sweep for as long as it is kept."""
    import limits.aio.storage.memory as limits_memory

    clock = [1_700_000_000.0]

    class Clock:
        time = staticmethod(lambda: clock[0])
        monotonic = staticmethod(lambda: clock[0])

    monkeypatch.setattr(limits_memory, "time", Clock)
    monkeypatch.setattr(limitstore, "time", Clock)
    storage = SweptMemoryStorage()
    for i in range(100):
        storage.hit_moving(f"hour/{i}", 200, 3600, clock[0])
        storage.hit_sliding(f"day/{i}", 10_000, 86400, clock[0])
    await storage.acquire_entry("rpm/key", 5, 60)  # limits' own calls are swept alike
    await storage.incr("inflight/key", 60)
    clock[0] += 30 * 60
    storage.hit_moving("hour/0", 200, 3600, clock[0])  # seen again: kept an hour from now
    await storage._sweep()
    assert "rpm/key" not in storage.events and not any("inflight" in k for k in storage.storage)
    clock[0] += 31 * 60
    await storage._sweep()
    assert list(storage.events) == ["hour/0"] and len(storage.events["hour/0"]) == 1  # its first entry left
    assert len(storage.storage) == 100  # the daily counters stay two days
    clock[0] += 2 * 86400
    await storage._sweep()
    assert not storage.events and not storage.storage and not storage.expirations and not storage._due
