"""Per-IP limits on free models: a moving hourly window answered with 429, and a
daily promotion cap for anonymous callers answered with 401 `PROMOTION_MODEL_LIMIT_REACHED`.

The hourly limit is exact: limits' moving window, one entry per admitted request, at most `limit` per
IP. The daily cap is limits' sliding-window counter (this day's count plus the part of yesterday's
still inside the last 24 hours): two counters per IP, where a moving window would hold every request
of the day (4,800 entries for an IP at 200 an hour) in the gateway's memory or in Redis.

Counted when the request starts, atomically in the shared storage. Reads ctx.model, ctx.account and
ctx.client_ip; writes X-RateLimit-* into ctx.response_headers.
"""

from __future__ import annotations

import math
import time
from typing import Callable
from ipaddress import ip_network

from aiohttp import web
from limits import RateLimitItem, parse
from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage

from proxy.config import ConfigError
from proxy.context import Context
from proxy.errors import GatewayError
from proxy.pipeline import Next
from proxy.limitstore import AdvertisedLimit, SharedStorage, SweptMemoryStorage

RATE_LIMITED = "Free model usage limit reached. Please try again later or upgrade to a paid model."
PROMOTION = (
    "Sign up for free to continue and explore 500 other models. Takes 2 minutes, no credit card required. "
    "Or come back later."
)


class _Window:
    """One limit's storage key parts, amount and length, computed once: limits' own key format."""

    def __init__(self, item: RateLimitItem, name: str) -> None:
        self.head, self.tail = item.key_for(name, "\0").split("\0")
        self.amount, self.expiry = item.amount, item.get_expiry()

    def key(self, ip: str) -> str:
        return self.head + ip + self.tail


def _reachable(hourly: RateLimitItem, daily: RateLimitItem) -> bool:
    """Whether the daily cap can ever refuse a request the hourly window admits. It counts admitted
    requests only, and its sliding counter weighs at most the last whole day and this one: when the
    window lets through too few for that to reach the cap (the defaults: 2 x 24 x 200 = 9,600 of
    10,000), counting it would change no answer, and with Redis cost every request a round trip."""
    most = hourly.amount * math.ceil(daily.get_expiry() / hourly.get_expiry())
    return 2 * most > daily.amount


class RateLimit:
    def __init__(
        self,
        storage: Storage,
        workers: int = 1,
        shared: SharedStorage | None = None,
        servable: Callable[[Context], bool] | None = None,
        limit: str = "200/hour",
        daily_limit: str = "10000/day",
        who: str = "anonymous",
        retry_after: bool = False,
        promotion_message: str = PROMOTION,
        ipv6_prefix: int = 64,
    ) -> None:
        if not 32 <= ipv6_prefix <= 128:
            raise ConfigError("ratelimit: option ipv6_prefix must be between 32 and 128")
        self.ipv6_prefix = ipv6_prefix
        if who not in ("anonymous", "free"):
            raise ConfigError("ratelimit: option who must be 'anonymous' or 'free'")
        if workers > 1 and shared is None:
            raise ConfigError(
                f"ratelimit: server.workers = {workers} with memory:// storage would give each "
                "process its own count and multiply the limit; set [limits] storage = \"redis://host:6379\""
            )
        try:
            self.hourly = parse(limit)
            self.daily = parse(daily_limit) if daily_limit else None
        except ValueError as exc:
            raise ConfigError(f"ratelimit: {exc}") from None
        if not isinstance(storage, MovingWindowSupport) or not isinstance(storage, SlidingWindowCounterSupport):
            raise ConfigError(f"ratelimit: {type(storage).__name__} cannot count moving and sliding windows")
        # limits' moving-window storage, asked directly with keys made of precomputed parts: what
        # MovingWindowRateLimiter does, without building the same key twice per request.
        self.storage = storage
        self.shared = shared
        # In this process: each request counted in one call (`SweptMemoryStorage`), nothing awaited.
        self.memory = storage if isinstance(storage, SweptMemoryStorage) else None
        # A request no provider can serve is refused after this stage (503 provider_not_configured):
        # it must not use up one of the caller's requests.
        self.servable = servable
        self._hourly = _Window(self.hourly, "free")
        self._daily = _Window(self.daily, "promo") if self.daily and _reachable(self.hourly, self.daily) else None
        self.everyone = who == "free"
        amount, _, per = limit.partition("/")
        self.advertised = AdvertisedLimit(int(amount), per, "Free models, per client IP.") if self.everyone else None
        self.retry_after = retry_after
        self.promotion_message = promotion_message
        self.limit_header = str(self.hourly.amount)

    def _bucket(self, ip: str) -> str:
        try:
            return str(ip_network(f"{ip}/{self.ipv6_prefix}", strict=False))
        except ValueError:
            return ip

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        if not ctx.model.free or not (ctx.account is None or self.everyone):
            return await call_next(ctx)
        if self.servable is not None and not self.servable(ctx):
            return await call_next(ctx)
        ip = ctx.client_ip
        if ":" in ip:  # one IPv6 client holds a whole /64: count it as one
            ip = self._bucket(ip)
        shared = self.shared
        if shared is None:  # in this process: nothing can fail, and nothing runs between two awaits
            headers = await self._count(ctx, ip)
        elif shared.down:
            return await self._unchecked(ctx, call_next)
        else:
            try:
                headers = await self._count(ctx, ip)
            except shared.errors as exc:
                shared.failed(exc)
                return await self._unchecked(ctx, call_next)
        ctx.response_headers.update(headers)
        return await call_next(ctx)

    async def _count(self, ctx: Context, ip: str) -> dict[str, str]:
        """The X-RateLimit-* headers of an admitted request; GatewayError when it is over a limit."""
        hourly = self._hourly
        key = hourly.key(ip)
        memory = self.memory
        if memory is not None:
            now = time.time()
            admitted, start, count = memory.hit_moving(key, hourly.amount, hourly.expiry, now)
        elif self.shared is None:
            admitted = await self.storage.acquire_entry(key, hourly.amount, hourly.expiry)
            start, count = await self.storage.get_moving_window(key, hourly.amount, hourly.expiry)
        else:
            admitted, start, count = await self.shared.acquire_and_count(key, hourly.amount, hourly.expiry)
        reset, remaining = start + hourly.expiry, hourly.amount - count
        headers = {
            "X-RateLimit-Limit": self.limit_header,
            "X-RateLimit-Remaining": str(max(remaining, 0)),
            "X-RateLimit-Reset": str(math.ceil(reset)),
        }
        if not admitted:
            if self.retry_after:
                headers["Retry-After"] = str(max(1, math.ceil(reset - time.time())))
            raise GatewayError(429, "rate_limit_exceeded", RATE_LIMITED, headers=headers)
        daily = self._daily
        if ctx.account is None and daily is not None and not (
                memory.hit_sliding(daily.key(ip), daily.amount, daily.expiry, now) if memory is not None
                else await self.storage.acquire_sliding_window_entry(daily.key(ip), daily.amount, daily.expiry)):
            raise GatewayError(
                401, "promotion_limit_reached", self.promotion_message, code="PROMOTION_MODEL_LIMIT_REACHED"
            )
        return headers

    async def _unchecked(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        """The shared storage is down: the request passes unchecked if the operator chose so."""
        assert self.shared is not None
        self.shared.let_through()
        return await call_next(ctx)
