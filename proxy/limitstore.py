"""The shared rate-limit storage, built once from `[limits] storage` and kept on the app."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any

import structlog
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.storage.memory import Entry
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from proxy.config import ConfigError, Limits
from proxy.errors import GatewayError

log = structlog.get_logger("turnstile.limits")


SWEEP_EVERY = 10.0  # seconds between two sweeps of expired entries
_SWEEP_BATCH = 1000  # keys swept between two yields to the event loop


class _NoLocks:
    """limits' per-key locks, which lock nothing here. Its counting takes one around code that never
    suspends, and in one event loop nothing else can run there: it counts the same without them.
    (limits' own expiry task does suspend inside one, awaiting a thread; this storage replaces that
    task with `_sweep`, which holds nothing across an await.) With them, each new client address
    left `asyncio.Lock`s behind (hourly window, daily counter) for the cycle collector to walk until
    the key expired."""

    _NONE = contextlib.nullcontext()

    def __getitem__(self, key: str) -> contextlib.nullcontext[None]:
        return self._NONE

    def pop(self, key: str, default: object = None) -> object:
        return default

    def clear(self) -> None:
        pass


def _newest_first(entry: Entry) -> float:
    return -entry.atime


def _expiring_first(entry: Entry) -> float:
    return -entry.expiry


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process storage with a sweep whose cost follows what expires, not what is kept.
    limits' own visits every key with a thread hop each, over and over while traffic comes. This
    one runs at most every `SWEEP_EVERY` seconds, in the event loop, and visits only the keys due:
    each key is in a heap by the time its newest entry (or its counter) expires. Visiting every
    key each time cost, for one anonymous address, a visit every 10 s for an hour (its window) and
    for two days (its daily counter): more than all of its requests. Counting is limits' own."""

    STORAGE_SCHEME = None  # not registered: `memory://` stays limits' own class elsewhere
    _next_sweep = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.locks = _NoLocks()  # type: ignore[assignment]
        self._due: list[tuple[float, str, bool]] = []  # (when, key, a counter rather than a window)

    async def _schedule_sweep(self) -> None:
        self._sweep_due()

    def _sweep_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep and (self.timer is None or self.timer.done()):
            self._next_sweep = now + SWEEP_EVERY
            self.timer = asyncio.create_task(self._sweep())

    # limits calls its private scheduler before each count; this replaces it.
    _MemoryStorage__schedule_expiry = _schedule_sweep

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        new = key not in self.events
        admitted = await super().acquire_entry(key, limit, expiry, amount)
        if new:
            heapq.heappush(self._due, (time.time() + expiry, key, False))
        return admitted

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        value = await super().incr(key, expiry, amount)
        if value == amount:  # a new counter: limits set its expiry
            heapq.heappush(self._due, (self.expirations[key], key, True))
        return value

    async def _sweep(self) -> None:
        now, due, visited = time.time(), self._due, 0
        while due and due[0][0] <= now:
            _, key, counter = heapq.heappop(due)
            if counter:
                expiry = self.expirations.get(key)
                if expiry is not None and expiry <= now:
                    self.storage.pop(key, None)
                    del self.expirations[key]
                elif expiry is not None:  # counted again since: due later
                    heapq.heappush(due, (expiry, key, True))
            else:
                events = self.events.get(key)
                if events is not None:  # newest first: the expired ones are a tail
                    del events[bisect.bisect_left(events, -now, key=_expiring_first):]
                    if events:
                        heapq.heappush(due, (events[0].expiry, key, False))
                    else:
                        del self.events[key]
            visited += 1
            if visited % _SWEEP_BATCH == 0:
                await asyncio.sleep(0)
                now = time.time()

    # One request's count, in one call that never suspends: what limits' `acquire_entry` then
    # `get_moving_window` (and `acquire_sliding_window_entry`) do, on limits' own data, the same
    # for every other caller of this storage. Awaited one by one, the three took a dozen coroutine
    # calls, an IndexError raised and caught for every new client address, and entries kept without end.

    def hit_moving(self, key: str, limit: int, expiry: int, now: float) -> tuple[bool, float, int]:
        """(admitted, start of the window, entries in it) of the moving window `key`."""
        self._sweep_due()
        events = self.events.get(key)
        if events is None:
            events = self.events[key] = []
            heapq.heappush(self._due, (now + expiry, key, False))
        admitted = len(events) < limit or events[limit - 1].atime < now - expiry
        if admitted:
            entry = Entry.__new__(Entry)
            entry.atime, entry.expiry = now, now + expiry
            events.insert(0, entry)
            # Past `limit`, entries are never looked at again (the newest `limit` decide), and are
            # outside the window: a key holds at most `limit` of them, not every request of the hour.
            del events[limit:]
        within = bisect.bisect_left(events, expiry - now, key=_newest_first)
        return admitted, events[within - 1].atime if within else now, within

    def hit_sliding(self, key: str, limit: int, expiry: int, now: float) -> bool:
        """Whether the sliding-window counter `key` admits one more, counting it if so."""
        self._sweep_due()
        previous, current = self.sliding_window_keys(key, expiry, now)
        counts, expirations = self.storage, self.expirations
        for k in (previous, current):
            if k in expirations and expirations[k] <= now:
                counts.pop(k, None)
                del expirations[k]
        before, count = counts.get(previous, 0), counts.get(current, 0)
        ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry if before else 0.0
        if math.floor(before * ttl / expiry + count) + 1 > limit:
            return False
        counts[current] = count + 1
        if not count:
            expirations[current] = now + 2 * expiry
            heapq.heappush(self._due, (now + 2 * expiry, current, True))
        return True

# limits wraps each storage method in an error-translating coroutine, again in every subclass: four
# deep here per call, each a pass-through unless `wrap_exceptions` (never set here). Unwrapped,
# limits' own code counts the same, for less.
for _name, _method in list(vars(SweptMemoryStorage).items()):
    if hasattr(_method, "__wrapped__"):
        setattr(SweptMemoryStorage, _name, inspect.unwrap(_method))


def open_storage(settings: Limits) -> Storage:
    """`memory://` or `redis://host:port[/db]` (also `rediss://`, `redis+sentinel://`).

    A plain Redis gets a pool of `pool_size` connections that a request waits for (up to `timeout`)
    when all are busy: redis-py's default pool raised "Too many connections" instead, a 500 past
    100 requests at once. Every Redis answer is awaited for `timeout` at most."""
    uri = settings.storage
    scheme = uri.split("://", 1)[0].removeprefix("async+")
    async_uri = uri if uri.startswith("async+") else "async+" + uri
    if async_uri == "async+memory://":
        return SweptMemoryStorage()
    options: dict[str, Any] = {}
    if scheme.startswith("redis"):
        options = {"implementation": "redispy", "socket_timeout": settings.timeout,
                   "socket_connect_timeout": settings.timeout}
        if scheme in ("redis", "rediss"):
            import redis.asyncio

            options["connection_pool"] = redis.asyncio.BlockingConnectionPool.from_url(
                async_uri.removeprefix("async+"), max_connections=settings.pool_size, timeout=settings.timeout,
                socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout)
            del options["socket_timeout"], options["socket_connect_timeout"]
    try:
        storage = storage_from_string(async_uri, **options)
    except (ConfigurationError, ValueError) as exc:
        raise ConfigError(f"limits.storage: {exc}") from None
    if not isinstance(storage, Storage):
        raise ConfigError(f"limits.storage: {uri!r} is not an async storage")
    return storage


@dataclass(frozen=True, slots=True)
class AdvertisedLimit:
    """The limit that `GET /key` reports to a caller with a key (OpenRouter's `rate_limit`); a stage
    that limits such callers exposes one as its `advertised` attribute."""

    requests: int
    interval: str
    note: str


NO_LIMIT = AdvertisedLimit(-1, "10s", "Requests with a key are not rate-limited.")


def is_shared(uri: str) -> bool:
    return not uri.split("://", 1)[0].removeprefix("async+").startswith("memory")


class StorageUnavailable(Exception):
    """The shared storage did not answer; the stage decides what the request gets."""


class SharedStorage:
    """A shared storage (Redis) and whether it is reachable.

    The first failure marks it down, with one log line; until a probe (every `PROBE_EVERY` seconds)
    finds it back, with another, limited requests do not wait on it at all: each one would wait
    `timeout` for an answer that will not come."""

    PROBE_EVERY = 0.5

    def __init__(self, storage: Storage, fail_open: bool = False) -> None:
        self.storage = storage
        self.fail_open = fail_open
        self.errors: tuple[type[BaseException], ...] = (*_as_tuple(storage.base_exceptions), OSError,
                                                        asyncio.TimeoutError)
        self.down = False
        self.outages = 0  # for /metrics
        self.unchecked = 0  # requests let through unchecked while down (fail_open)
        self._since = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._script = _moving_window_scripts(storage)

    def let_through(self) -> None:
        """While it is down: a limited request is refused (503), or counted and let through
        unchecked when the operator chose so (`fail_open`)."""
        if not self.fail_open:
            raise GatewayError(503, "rate_limit_storage_unavailable",
                               "Rate limits cannot be checked right now; please try again shortly.",
                               headers={"Retry-After": "1"})
        self.unchecked += 1

    def failed(self, exc: BaseException) -> None:
        if self.down:
            return
        self.down, self.outages, self._since = True, self.outages + 1, time.monotonic()
        log.error("rate_limit_storage_unavailable", error=f"{type(exc).__name__}: {exc}"[:300],
                  then="letting limited requests through unchecked" if self.fail_open else "answering 503")
        self._probe = asyncio.ensure_future(self._wait_for_it())

    async def _wait_for_it(self) -> None:
        while True:
            await asyncio.sleep(self.PROBE_EVERY)
            try:
                if await self.storage.check():
                    break
            except Exception:  # noqa: BLE001 (any failure of the client is "not back yet")
                pass
        self.down = False
        log.info("rate_limit_storage_recovered", after_seconds=round(time.monotonic() - self._since, 1))

    async def acquire_and_count(self, key: str, limit: int, expiry: int) -> tuple[bool, float, int]:
        """(admitted, start of the window, entries in it, this one included) in one round trip, one
        transaction: the count is this request's own, not one that others raced to change."""
        if self._script is None:
            admitted = await self.storage.acquire_entry(key, limit, expiry)
            start, count = await self.storage.get_moving_window(key, limit, expiry)
            return admitted, start, count
        bridge, client = self._script
        pipe = client.pipeline(transaction=True)
        redis_key, now = bridge.prefixed_key(key), time.time()
        await bridge.lua_acquire_moving_window([redis_key], [now, limit, expiry, 1], client=pipe)
        await bridge.lua_moving_window([redis_key], [now - expiry, limit], client=pipe)
        admitted, window = await pipe.execute()
        return bool(admitted), float(window[0]) if window else now, int(window[1]) if window else 0

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


def _as_tuple(errors: Any) -> tuple[type[BaseException], ...]:
    return errors if isinstance(errors, tuple) else (errors,)


def _moving_window_scripts(storage: Storage) -> tuple[Any, Any] | None:
    """limits' own moving-window scripts and client, for a plain Redis through redis-py, which can
    run both in one transaction; None elsewhere (two calls, the count then only near-exact)."""
    bridge = getattr(storage, "bridge", None)
    if type(storage).__name__ != "RedisStorage" or getattr(storage, "MODE", None) != "BASIC":
        return None
    if not all(hasattr(bridge, a) for a in ("lua_acquire_moving_window", "lua_moving_window", "prefixed_key")):
        return None
    try:
        client = bridge.get_connection()
    except Exception:  # noqa: BLE001 (an implementation this does not know)
        return None
    return (bridge, client) if hasattr(client, "pipeline") else None
