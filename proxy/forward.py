"""The last stage: sends the request to the chosen provider and relays the answer as it arrives.

It owns the one `ClientSession`. Bytes of OpenAI-compatible upstreams are copied through without
parsing; the next upstream chunk is read only after the previous one was written (backpressure).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import aiohttp
import orjson
import structlog
from aiohttp import web

from proxy.config import Upstream
from proxy.context import Context
from proxy.errors import GatewayError, upstream_error
from proxy.routing import Router

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
    def __init__(self, router: Router, settings: Upstream) -> None:
        self.router = router
        self.settings = settings
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
        try:
            upstream = await self.session.post(req.url, data=req.body, headers=req.headers)
        except asyncio.TimeoutError:
            raise GatewayError(504, "upstream_timeout", f"The {provider.name} provider did not answer in time.") from None
        except aiohttp.ClientError as exc:
            log.warning("upstream_unreachable", provider=provider.name, error=type(exc).__name__)
            raise upstream_error(502, f"The {provider.name} provider could not be reached.") from None
        try:
            response = await self._relay(ctx, provider, upstream)
        except BaseException:
            upstream.close()  # the client left or we failed: drop the upstream connection now
            raise
        if ctx.status >= 499:
            upstream.close()  # unfinished: the connection cannot go back to the pool
        else:
            upstream.release()
        return response

    async def _relay(self, ctx: Context, provider: object, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        content_type = upstream.headers.get("Content-Type", "application/json")
        response = web.StreamResponse(status=upstream.status)
        headers = response.headers
        sse = content_type.startswith("text/event-stream")
        if sse:
            headers.update(SSE_HEADERS)
        else:
            headers["Content-Type"] = content_type
            length = upstream.content_length
            if length is not None and "Content-Encoding" not in upstream.headers and getattr(provider, "passthrough", True):
                response.content_length = length
        if ctx.response_headers:
            headers.update(ctx.response_headers)
        ctx.status = upstream.status
        await response.prepare(ctx.request)
        chunks: AsyncIterator[bytes] = upstream.content.iter_any()
        if not getattr(provider, "passthrough", True) and upstream.status < 400:
            chunks = provider.translate_stream(ctx, chunks)  # type: ignore[attr-defined]
        try:
            async for chunk in chunks:
                if not ctx.bytes_out:
                    ctx.first_byte_at = time.monotonic()
                await response.write(chunk)
                ctx.bytes_out += len(chunk)
        except ConnectionResetError:
            ctx.status = 499  # the client went away
            return response
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("upstream_broke_mid_response", provider=ctx.provider, error=type(exc).__name__)
            if sse:
                await response.write(error_chunk(f"The {ctx.provider} provider stopped mid-stream."))
            ctx.status = 502
            return response
        await response.write_eof()
        return response
