"""A key's own controls, set by its operator (`turnstile keys update`, the admin API): its model
lists (403), its budgets (402), its requests and tokens per minute and its requests in flight (429).

Runs after kilo-auto/* is resolved, so that lists and budgets see the real model. A key with no
settings passes at the cost of one comparison. Windows are `limits`' (the rate-limit storage:
memory, or Redis to be exact across workers and instances): requests per minute a moving window
(exact under any burst), tokens per minute a sliding-window counter fed with each answer's usage.
Reads ctx.account and ctx.model; writes x-ratelimit-* into ctx.response_headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from typing import Any

import structlog
from aiohttp import web
from limits import RateLimitItemPerMinute
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from proxy.config import UpstreamSettings
from proxy.context import Context
from proxy.errors import GatewayError
from proxy.estimate import most
from proxy.keys import Account, KeySettings, iso, usd_text
from proxy.limitstore import SharedStorage
from proxy.pipeline import Next
from proxy.store import Store

log = structlog.get_logger("turnstile.keylimits")

IN_FLIGHT_TTL = 3600  # seconds a shared count of requests in flight outlives its last change (a crashed worker's)


class KeyLimits:
    def __init__(self, storage: Storage, store: Store, shared: SharedStorage | None = None,
                 upstream: UpstreamSettings | None = None, workers: int = 1) -> None:
        self.storage = storage
        self.store = store
        self.shared = shared
        self.upstream = upstream or UpstreamSettings()
        self.requests = MovingWindowRateLimiter(storage)
        self.tokens = SlidingWindowCounterRateLimiter(storage)
        self.in_flight: dict[int, int] = {}  # per key, in this process (memory storage)
        self.budget_held: dict[int, int] = {}  # per key: the most its requests in flight here may still cost
        self._tasks: set[asyncio.Task[object]] = set()
        self._namespace = ""
        if workers > 1 and shared is None:
            log.warning("key_limits_per_worker", workers=workers,
                        why="memory:// rate-limit storage: each worker counts its own; set [limits] storage to Redis")

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        account = ctx.account
        if account is None or account.settings is None:
            return await call_next(ctx)
        settings = account.settings
        if (settings.allow or settings.deny) and not settings.allows(ctx.model.id):
            raise GatewayError(403, "model_not_allowed", f"This key may not use the model {ctx.model.id}.",
                               code="model_not_allowed", param="model")
        held = 0
        if settings.budgets and not ctx.model.free:
            held = await self._budgets(ctx, account, settings)
        try:
            return await self._limited(ctx, call_next, account, settings)
        finally:
            if held:
                self._release_budget(account.id, held)

    async def _limited(self, ctx: Context, call_next: Next, account: Account, settings: KeySettings) -> web.StreamResponse:
        if settings.rpm is None and settings.tpm is None and settings.concurrency is None:
            return await call_next(ctx)
        if self.shared is not None and self.shared.down:  # known down: no request waits on it
            self.shared.let_through()
            return await call_next(ctx)
        # The checks only (what the request itself raises later is not the storage's), the one
        # that counts a request last: a request refused for its tokens or its concurrency does
        # not use up one of its minute's requests.
        entered = False
        try:
            if settings.tpm is not None:
                await self._tokens_left(ctx, account.id, settings.tpm)
            if settings.concurrency is not None:
                await self._enter(account.id, settings.concurrency)
                entered = True
            if settings.rpm is not None:
                await self._requests(ctx, account.id, settings.rpm)
        except GatewayError:
            if entered:
                self._later(self._leave(account.id))
            raise
        except (self.shared.errors if self.shared is not None else ()) as exc:
            if entered:
                self._later(self._leave(account.id))
            return await self._unchecked(ctx, call_next, exc)
        if settings.concurrency is None:
            return await self._counted(ctx, call_next, account.id, settings.tpm)
        try:
            return await self._counted(ctx, call_next, account.id, settings.tpm)
        finally:
            self._later(self._leave(account.id))

    def _key(self, kind: str, account_id: int) -> str:
        """A storage key of this installation's (named by its store's secret): two gateways with
        their own stores may share one Redis."""
        if not self._namespace:
            self._namespace = hashlib.blake2b(self.store.secret, digest_size=6).hexdigest()
        return f"key-{kind}/{self._namespace}/{account_id}"

    async def left(self, account_id: int, settings: KeySettings) -> dict[str, Any]:
        """What is left of each of the key's limits, for `GET /usage`; nothing is counted. 503 when
        the shared storage cannot say."""
        try:
            return await self._left(account_id, settings)
        except (self.shared.errors if self.shared is not None else ()) as exc:
            self.shared.failed(exc)  # type: ignore[union-attr]
            raise GatewayError(503, "rate_limit_storage_unavailable",
                               "Rate limits cannot be checked right now; please try again shortly.") from None

    async def _left(self, account_id: int, settings: KeySettings) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, amount, limiter, key in (("requests_per_minute", settings.rpm, self.requests, self._key("rpm", account_id)),
                                           ("tokens_per_minute", settings.tpm, self.tokens, self._key("tpm", account_id))):
            if amount is not None:
                reset, remaining = await limiter.get_window_stats(RateLimitItemPerMinute(amount), key)
                out[name] = {"limit": amount, "remaining": max(remaining, 0), "resets_at": iso(reset)}
        if settings.concurrency is not None:
            in_flight = (self.in_flight.get(account_id, 0) if self.shared is None
                         else int(await self.storage.get(self._key("inflight", account_id)) or 0))
            out["concurrent_requests"] = {"limit": settings.concurrency, "in_flight": in_flight}
        return out

    async def _budgets(self, ctx: Context, account: Account, settings: KeySettings) -> int:
        """Refuses the request that would take a window past its budget: what the window has spent
        (rows not yet written included), what this process's requests in flight on the key may
        still cost, and the most this request may cost. Returns that most, held until it ends."""
        now = time.time()
        starts = [b.start(now) for b in settings.budgets]
        spent = await self.store.window_spent(account.id, starts)
        cost = most(ctx, self.upstream)
        in_flight = self.budget_held.get(account.id, 0)
        for budget, start, used in zip(settings.budgets, starts, spent):
            used += in_flight
            if used + cost > budget.micros:
                oldest = await self.store.oldest(account.id, start) if budget.sliding else None
                resets = iso(budget.resets(now, oldest))
                per = f"per {budget.window}" if not budget.sliding else f"per {budget.window} (sliding)"
                raise GatewayError(
                    402, "budget_exceeded",
                    f"This key's budget of ${usd_text(budget.micros)} {per} would be passed: ${usd_text(used)} used or "
                    f"held by requests in progress, and this request may cost up to ${usd_text(cost)}. "
                    f"It resets at {resets}.",
                    code="budget_exceeded",
                    extra={"budget": {"window": budget.window, "sliding": budget.sliding, "limit": budget.micros / 1e6,
                                      "spent": used / 1e6, "request_most": cost / 1e6, "resets_at": resets}})
        self.budget_held[account.id] = in_flight + cost
        return cost

    def _release_budget(self, account_id: int, micros: int) -> None:
        left = self.budget_held.get(account_id, 0) - micros
        if left > 0:
            self.budget_held[account_id] = left
        else:
            self.budget_held.pop(account_id, None)

    async def _requests(self, ctx: Context, account_id: int, rpm: int) -> None:
        item = RateLimitItemPerMinute(rpm)
        key = self._key("rpm", account_id)
        admitted = await self.requests.hit(item, key)
        reset, remaining = await self.requests.get_window_stats(item, key)
        headers = ctx.response_headers
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(remaining, 0))
        headers["x-ratelimit-reset-requests"] = f"{max(0, math.ceil(reset - time.time()))}s"
        if not admitted:
            raise GatewayError(429, "rate_limit_exceeded",
                               f"This key's limit of {rpm} requests per minute is reached; it frees up at {iso(reset)}.",
                               code="requests_per_minute", extra={"limit": "requests_per_minute", "resets_at": iso(reset)})

    async def _tokens_left(self, ctx: Context, account_id: int, tpm: int) -> None:
        item = RateLimitItemPerMinute(tpm)
        reset, remaining = await self.tokens.get_window_stats(item, self._key("tpm", account_id))
        headers = ctx.response_headers
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(remaining, 0))
        headers["x-ratelimit-reset-tokens"] = f"{max(0, math.ceil(reset - time.time()))}s"
        if remaining <= 0:
            raise GatewayError(429, "rate_limit_exceeded",
                               f"This key's limit of {tpm} tokens per minute is reached; it frees up by {iso(reset)}.",
                               code="tokens_per_minute", extra={"limit": "tokens_per_minute", "resets_at": iso(reset)})

    async def _counted(self, ctx: Context, call_next: Next, account_id: int, tpm: int | None) -> web.StreamResponse:
        if tpm is None:
            return await call_next(ctx)
        try:
            return await call_next(ctx)
        finally:  # the answer's usage, settled by the last stage, counts against the window
            usage = ctx.outcome.usage
            if usage is not None and usage.prompt + usage.completion > 0:
                self._later(self._spend_tokens(account_id, tpm, usage.prompt + usage.completion))

    async def _spend_tokens(self, account_id: int, tpm: int, tokens: int) -> None:
        item, key = RateLimitItemPerMinute(tpm), self._key("tpm", account_id)
        _, remaining = await self.tokens.get_window_stats(item, key)
        if remaining > 0:  # a window counts up to its limit: full is full
            await self.tokens.hit(item, key, cost=min(tokens, remaining))

    async def _enter(self, account_id: int, most_at_once: int) -> None:
        if self.shared is None:
            count = self.in_flight.get(account_id, 0) + 1
            self.in_flight[account_id] = count
        else:
            count = await self.storage.incr(self._key("inflight", account_id), IN_FLIGHT_TTL, 1)
        if count > most_at_once:
            await self._leave(account_id)
            raise GatewayError(429, "rate_limit_exceeded",
                               f"This key may have {most_at_once} requests in progress at once; retry when one ends.",
                               code="concurrent_requests", extra={"limit": "concurrent_requests", "resets_at": None})

    async def _leave(self, account_id: int) -> None:
        if self.shared is None:
            left = self.in_flight.get(account_id, 0) - 1
            if left > 0:
                self.in_flight[account_id] = left
            else:
                self.in_flight.pop(account_id, None)
        else:
            await self.storage.incr(self._key("inflight", account_id), IN_FLIGHT_TTL, -1)

    def _later(self, work: object) -> None:
        """Bookkeeping that must happen even when the request is cancelled (its client left)."""
        task = asyncio.ensure_future(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("key_limit_count_failed", error=type(task.exception()).__name__)

    async def _unchecked(self, ctx: Context, call_next: Next, exc: BaseException) -> web.StreamResponse:
        assert self.shared is not None
        self.shared.failed(exc)
        self.shared.let_through()
        return await call_next(ctx)
