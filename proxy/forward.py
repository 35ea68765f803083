"""The last stage: opens the upstream (`proxy.dial`) and answers the client (`proxy.reply`).

Every request that reaches it is billed: its outcome is settled here, whatever happened, and the
endpoint records it (`proxy.outcome`).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Mapping

from aiohttp import web

from proxy.config import UpstreamSettings
from proxy.context import Context
from proxy.dial import Dialer
from proxy.dialects import passthrough
from proxy.errors import GatewayError
from proxy.meter import Meter
from proxy.metrics import Metrics
from proxy.outcome import Recorder
from proxy.reply import Reply
from proxy.routing import Router


class Forwarder:
    def __init__(self, router: Router, settings: UpstreamSettings, secrets: Mapping[str, str] = {}) -> None:
        self.dialer = Dialer(router, settings)
        self.settings = settings
        # Each provider's key, for what its answers may quote back (only the key it was sent can be),
        # and all of them for error bodies.
        self.secret_of = {name: key.encode() for name, key in secrets.items() if len(key) >= 8}
        self.secrets = tuple(set(self.secret_of.values()))
        self.metrics: Metrics | None = None
        self.recorder: Recorder | None = None  # for the journal's row of an answer that has begun
        # The app's loop, taken once: `asyncio.get_running_loop()` makes a getpid system call each time.
        self.loop: asyncio.AbstractEventLoop | None = None

    async def session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: the dialer's connection pool, for the app's lifetime."""
        self.loop = asyncio.get_running_loop()
        async for _ in self.dialer.session_ctx(app):
            yield

    def servable(self, ctx: Context) -> bool:
        return self.dialer.servable(ctx)

    async def __call__(self, ctx: Context) -> web.StreamResponse:
        assert self.loop is not None, "the forwarder's loop is taken when the app starts"
        outcome = ctx.outcome
        outcome.billable = True
        outcome.account_id = ctx.account.id if ctx.account is not None else None
        recorder = self.recorder
        # A paid answer's provisional row, for the journal (a free one has nothing to bill).
        begun = None if recorder is None or ctx.model.free else lambda: recorder.provisional(outcome, ctx.model.prices)
        reply = Reply(ctx, self.settings.keepalive_interval, self.loop, self.secrets, begun)
        meter: Meter | None = None
        if ctx.stream:
            reply.keep_alive()
        try:
            try:
                opened = await self.dialer.open(ctx)
            except GatewayError as exc:
                started = await reply.refuse(exc)
                if started is None:
                    raise  # for the endpoint to answer in the error shape
                return started
            model = ctx.model
            reader = passthrough.reader(ctx.native.dialect) if opened.passthrough and ctx.native is not None else None
            meter = Meter(model.prices, ctx.stream, model.bounds, self.secret_of.get(opened.provider.name, b""), reader)
            metrics = self.metrics if ctx.stream else None
            if metrics is not None:
                metrics.streams_in_flight += 1
            try:
                return await reply.relay(opened.provider, opened.upstream, meter, opened.passthrough)
            finally:
                if metrics is not None:
                    metrics.streams_in_flight -= 1
        except (asyncio.CancelledError, ConnectionResetError):
            outcome.status = 499  # the client left
            raise
        finally:
            reply.close()
            if meter is not None:
                outcome.settle(meter)
