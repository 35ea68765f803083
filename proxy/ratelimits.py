"""The shared rate-limit storage, built once from `[limits] storage` and kept on the app."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import inspect
import time

from limits.aio.storage import MemoryStorage, Storage
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from proxy.config import ConfigError


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


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process storage with a cheaper expiry sweep. The stock sweep visits every key with
    one thread hop each, and starts again as soon as it ends while traffic comes: with a key per
    client address it took more CPU than the requests it limited. This one runs at most every
    `SWEEP_EVERY` seconds, in the event loop, yielding every `_SWEEP_BATCH` keys. Counting is
    limits' own, unchanged."""

    STORAGE_SCHEME = None  # not registered: `memory://` stays limits' own class elsewhere
    _next_sweep = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.locks = _NoLocks()  # type: ignore[assignment]

    async def _schedule_sweep(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep and (self.timer is None or self.timer.done()):
            self._next_sweep = now + SWEEP_EVERY
            self.timer = asyncio.create_task(self._sweep())

    # limits calls its private scheduler before each count; this replaces it.
    _MemoryStorage__schedule_expiry = _schedule_sweep

    async def _sweep(self) -> None:
        now = time.time()
        for i, key in enumerate(list(self.events)):
            events = self.events.get(key)
            if events:  # newest first: the expired ones are a tail
                del events[bisect.bisect_left(events, -now, key=lambda event: -event.expiry):]
            if not events:
                self.events.pop(key, None)
                self.locks.pop(key, None)
            if i % _SWEEP_BATCH == _SWEEP_BATCH - 1:
                await asyncio.sleep(0)
        for key, expiry in list(self.expirations.items()):
            if expiry <= now:
                self.storage.pop(key, None)
                self.expirations.pop(key, None)
                self.locks.pop(key, None)


# limits wraps each storage method in an error-translating coroutine, again in every subclass: four
# deep here per call, each a pass-through unless `wrap_exceptions` (never set here). limits' own code,
# unwrapped, counts the same for about 36,000 fewer instructions per anonymous request.
for _name, _method in list(vars(SweptMemoryStorage).items()):
    if hasattr(_method, "__wrapped__"):
        setattr(SweptMemoryStorage, _name, inspect.unwrap(_method))


def open_storage(uri: str) -> Storage:
    """`memory://` or `redis://host:port[/db]` (also `rediss://`, `redis+sentinel://`)."""
    scheme = uri.split("://", 1)[0]
    options: dict[str, str] = {}
    if scheme.startswith("redis") or scheme.startswith("async+redis"):
        options["implementation"] = "redispy"
    async_uri = uri if uri.startswith("async+") else "async+" + uri
    if async_uri == "async+memory://":
        return SweptMemoryStorage()
    try:
        storage = storage_from_string(async_uri, **options)
    except ConfigurationError as exc:
        raise ConfigError(f"limits.storage: {exc}") from None
    if not isinstance(storage, Storage):
        raise ConfigError(f"limits.storage: {uri!r} is not an async storage")
    return storage


def is_shared(uri: str) -> bool:
    return not uri.split("://", 1)[0].removeprefix("async+").startswith("memory")
