"""The last stage: sends the request to the chosen provider and relays the answer as it arrives.

It owns the one `ClientSession`. Bytes of OpenAI-compatible upstreams are copied through without
parsing (only the event that carries usage is rewritten, with its cost); the next upstream chunk is
read only after the previous one was written (backpressure). Every request it handles is billed.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import aiohttp
import orjson
import structlog
from aiohttp import web

from plugins.providers.base import Provider
from proxy.config import Upstream
from proxy.context import Context
from proxy.errors import GatewayError, upstream_error
from proxy.ledger import Ledger, Row, ip_hash
from proxy.routing import Router
from proxy.usage import Meter

MAX_ERROR_BODY = 64 * 1024


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body

log = structlog.get_logger("turnstile.forward")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def error_chunk(message: str, code: int = 502) -> bytes:
    """The mid-stream error event clients know: an error plus a terminating choice, then [DONE]."""
    chunk = {
        "error": {"message": message, "code": code, "type": "upstream_error"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"


class Forwarder:
    def __init__(self, router: Router, settings: Upstream, ledger: Ledger) -> None:
        self.router = router
        self.settings = settings
        self.ledger = ledger
        self.session: aiohttp.ClientSession | None = None

    async def session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: one pooled session for the app's lifetime."""
        s = self.settings
        connector = aiohttp.TCPConnector(limit=s.pool_size, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )
        yield
        await self.session.close()

    async def __call__(self, ctx: Context) -> web.StreamResponse:
        assert self.session is not None, "the forwarder's session opens with the app"
        route = self.router.route(ctx.model)
        provider = route.provider
        ctx.provider = provider.name
        req = provider.request(ctx, route.upstream_model)
        ctx.meter = Meter(ctx.model.prices, ctx.stream)
        try:
            try:
                upstream = await self.session.post(req.url, data=req.body, headers=req.headers)
            except asyncio.TimeoutError:
                ctx.status = 504
                raise GatewayError(504, "upstream_timeout", f"The {provider.name} provider did not answer in time.") from None
            except aiohttp.ClientError as exc:
                ctx.status = 502
                log.warning("upstream_unreachable", provider=provider.name, error=type(exc).__name__)
                raise upstream_error(502, f"The {provider.name} provider could not be reached.") from None
            try:
                response = await self._relay(ctx, provider, upstream)
            except BaseException:
                ctx.status = ctx.status if ctx.status >= 499 else 499
                upstream.close()  # the client left or we failed: drop the upstream connection now
                raise
            if ctx.status >= 499:
                upstream.close()  # unfinished: the connection cannot go back to the pool
            else:
                upstream.release()
            return response
        finally:
            self._bill(ctx)

    async def _relay(self, ctx: Context, provider: Provider, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        if not provider.passthrough:
            if upstream.status >= 400:
                status, body = provider.translate_error(upstream.status, await upstream.content.read(MAX_ERROR_BODY))
                ctx.status = status
                return web.Response(status=status, body=body, content_type="application/json", headers=ctx.response_headers)
            if not ctx.stream:
                try:
                    body = provider.translate_body(ctx, await upstream.read())
                except (ValueError, KeyError, TypeError, AttributeError):
                    ctx.status = 502
                    log.warning("upstream_invalid_body", provider=provider.name)
                    raise upstream_error(502, f"The {provider.name} provider sent an answer that could not be read.") from None
                return await self._send(ctx, upstream, provider, _once(body), sse=False)
            return await self._send(ctx, upstream, provider, provider.translate_stream(ctx, upstream.content.iter_any()), sse=True)
        content_type = upstream.headers.get("Content-Type", "application/json")
        chunks: AsyncIterator[bytes] = upstream.content.iter_any()
        return await self._send(ctx, upstream, provider, chunks, sse=content_type.startswith("text/event-stream"))

    async def _send(self, ctx: Context, upstream: aiohttp.ClientResponse, provider: Provider,
                    chunks: AsyncIterator[bytes], sse: bool) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status)
        headers = response.headers
        metered = upstream.status < 400
        if sse:
            headers.update(SSE_HEADERS)
        elif provider.passthrough:
            headers["Content-Type"] = upstream.headers.get("Content-Type", "application/json")
            length = upstream.content_length
            if not metered and length is not None and "Content-Encoding" not in upstream.headers:
                response.content_length = length
        else:
            headers["Content-Type"] = "application/json"
        if ctx.response_headers:
            headers.update(ctx.response_headers)
        ctx.status = upstream.status
        await response.prepare(ctx.request)
        meter = ctx.meter
        assert meter is not None
        meter.stream = sse
        try:
            async for chunk in chunks:
                data = meter.feed(chunk) if metered else chunk
                if data:
                    await self._write(ctx, response, data)
            tail = meter.finish() if metered else b""
            if tail:
                await self._write(ctx, response, tail)
        except ConnectionResetError:
            ctx.status = 499  # the client went away
            return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("upstream_broke_mid_response", provider=ctx.provider, error=type(exc).__name__)
            if sse:
                await self._write(ctx, response, error_chunk(f"The {ctx.provider} provider stopped mid-stream."))
            ctx.status = 502
            return response
        await response.write_eof()
        return response

    @staticmethod
    async def _write(ctx: Context, response: web.StreamResponse, data: bytes) -> None:
        if not ctx.bytes_out:
            ctx.first_byte_at = time.monotonic()
        await response.write(data)
        ctx.bytes_out += len(data)

    def _bill(self, ctx: Context) -> None:
        """One ledger row. Output that came without usage is billed by estimate; failures before
        any output cost nothing."""
        meter = ctx.meter
        assert meter is not None
        if meter.usage is None and ctx.bytes_out and (ctx.status < 400 or ctx.status in (499, 502)):
            meter.estimate(ctx.request_bytes, ctx.bytes_out)
        usage = meter.usage
        now = time.monotonic()
        account = ctx.account
        self.ledger.record(Row(
            request_id=ctx.request_id,
            account_id=account.id if account else None,
            ip_hash=None if account else ip_hash(ctx.client_ip),
            model_asked=ctx.requested_model,
            model=ctx.model.id,
            provider=ctx.provider,
            prompt_tokens=usage.prompt if usage else 0,
            completion_tokens=usage.completion if usage else 0,
            reasoning_tokens=usage.reasoning if usage else 0,
            cached_tokens=usage.cached if usage else 0,
            cache_write_tokens=usage.cache_write if usage else 0,
            cost_micros=meter.cost_micros if usage else 0,
            estimated=bool(usage and usage.estimated),
            status=ctx.status,
            ttfb_ms=round((ctx.first_byte_at - ctx.started_at) * 1000, 2) if ctx.first_byte_at else None,
            duration_ms=round((now - ctx.started_at) * 1000, 2),
            finish_reason=meter.finish_reason,
            streamed=ctx.stream,
            created_at=time.time(),
        ))
