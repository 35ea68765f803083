"""Copies (or translates) an upstream answer to the client as it arrives, through the usage meter.

Headers are final before the first body byte. A JSON answer no bigger than what the meter holds back
anyway (or a translated one) goes out whole, in one write, with its Content-Length. A stream that
breaks after bytes were sent ends with the error chunk and `data: [DONE]`; a longer JSON body that
breaks is cut off (the connection is aborted), so the client can never take half a body for a whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import structlog
from aiohttp import web

from plugins.providers.base import Provider
from proxy.context import Context
from proxy.errors import upstream_error
from proxy.sse import DONE
from proxy.meter import HOLD

log = structlog.get_logger("turnstile.relay")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
KEEPALIVE = b": keep-alive\n\n"
_JSON = "application/json"


def error_chunk(message: str, code: int = 502) -> bytes:
    """The mid-stream error event clients know: an error plus a terminating choice, then [DONE]."""
    chunk = {
        "error": {"message": message, "code": code, "type": "upstream_error"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"


async def write(ctx: Context, response: web.StreamResponse, data: bytes, answer: bool = True) -> None:
    """`answer=False` for what the gateway sends on its own (keep-alive comments, an error before
    any of the answer): it is not the answer's first byte, and nothing in it is billed."""
    now = time.monotonic()
    if answer and not ctx.first_byte_at:
        ctx.first_byte_at = now
    ctx.last_write = now
    await response.write(data)
    ctx.bytes_out += len(data)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _reads(chunks: AsyncIterator[bytes], before_next: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """Upstream reads for a translator. When it asks for the next one, it is done with the last:
    `before_next` sends what it made of it."""
    async for chunk in chunks:
        yield chunk
        await before_next()


async def _read(ctx: Context, provider: Provider, upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.read()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        log.warning("upstream_broke_mid_response", request_id=ctx.request_id, provider=provider.name)
        ctx.status = 502
        raise upstream_error(502, f"The {provider.name} provider stopped mid-answer.") from None


def _whole(ctx: Context, status: int, content_type: str, body: bytes) -> web.Response:
    """A whole JSON answer in one write, with its length: no chunked framing."""
    assert ctx.meter is not None
    body = ctx.meter.whole(body)
    ctx.status = status
    ctx.first_byte_at = ctx.last_write = time.monotonic()
    ctx.bytes_out = len(body)
    return web.Response(status=status, body=body, headers={"Content-Type": content_type, **ctx.response_headers})


class _Ticker:
    """SSE comments through long silences, so that no intermediary times the stream out. A timer
    that re-arms itself: no task per stream."""

    def __init__(self, ctx: Context, response: web.StreamResponse, interval: float, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx, self.response, self.interval, self.loop = ctx, response, interval, loop
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(interval, self.tick)

    def tick(self) -> None:
        idle = time.monotonic() - self.ctx.last_write
        if idle >= self.interval:
            self.loop.create_task(self._send())
            idle = 0.0
        self.handle = self.loop.call_later(self.interval - idle, self.tick)

    async def _send(self) -> None:
        with contextlib.suppress(Exception):
            await write(self.ctx, self.response, KEEPALIVE, answer=False)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


async def relay(ctx: Context, provider: Provider, upstream: aiohttp.ClientResponse,
                response: web.StreamResponse | None, keepalive: float,
                loop: asyncio.AbstractEventLoop) -> tuple[web.StreamResponse, bool]:
    """(the response, whether the upstream answer was read to its end)."""
    whole: bytes | None = None  # a JSON answer small enough (or translated) to send in one piece
    content_type = ""
    held: list[bytes] | None = None  # translated stream output not written yet

    async def send(data: bytes) -> None:
        await write(ctx, response, data)  # type: ignore[arg-type]
        if ticker is not None and data.endswith(DONE):
            ticker.cancel()  # the stream is over; only the connection's end is left

    def take() -> bytes:
        """The held translated output, metered once per read, not once per event."""
        if not held:
            return b""
        data = meter.feed(b"".join(held))
        held.clear()
        return data

    async def flush() -> None:
        data = take()
        if data:
            await send(data)
    if provider.passthrough:
        content_type = upstream.headers.get("Content-Type", "")
        sse = content_type.startswith("text/event-stream")
        length = upstream.content_length
        if not sse and response is None and length is not None and length <= HOLD:
            whole = await _read(ctx, provider, upstream)  # the meter would hold all of it anyway
        else:
            chunks: AsyncIterator[bytes] = upstream.content.iter_any()
    elif ctx.stream:
        # What a translator makes of one upstream read goes out in one write, just before the next
        # read: one write per read, as for passthrough, not one per event.
        chunks, sse = provider.translate_stream(ctx, _reads(upstream.content.iter_any(), flush)), True
        held = []
    else:
        content_type, sse = _JSON, False
        try:
            whole = provider.translate_body(ctx, await _read(ctx, provider, upstream))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("upstream_invalid_body", request_id=ctx.request_id, provider=provider.name)
            ctx.status = 502
            raise upstream_error(502, f"The {provider.name} provider sent an answer that could not be read.") from None
    if whole is not None:
        if response is None:
            return _whole(ctx, upstream.status, content_type or _JSON, whole), True
        chunks = _once(whole)
    if response is None:
        response = web.StreamResponse(status=upstream.status)
        if sse:
            response.headers.update(SSE_HEADERS)
        else:
            response.headers["Content-Type"] = content_type or _JSON
        if ctx.response_headers:
            response.headers.update(ctx.response_headers)
        await response.prepare(ctx.request)
    ctx.status = upstream.status
    meter = ctx.meter
    assert meter is not None
    meter.stream = sse
    ticker = _Ticker(ctx, response, keepalive, loop) if sse and keepalive > 0 else None
    ctx.last_write = time.monotonic()
    try:
        async for chunk in chunks:
            if held is not None:
                held.append(chunk)
                continue
            data = meter.feed(chunk)
            if data:
                await send(data)
        await flush()
        tail = meter.finish()
        if tail:
            await write(ctx, response, tail)
    except ConnectionResetError:
        ctx.status = 499  # the client went away
        return response, False
    except asyncio.CancelledError:
        ctx.status = 499
        raise
    except Exception as exc:  # the upstream broke, or sent what cannot be translated
        log.warning("upstream_broke_mid_response", request_id=ctx.request_id, provider=ctx.provider,
                    error=type(exc).__name__)
        ctx.status = 502
        if sse:
            with contextlib.suppress(ConnectionResetError):  # what was translated before the break goes first
                data = take()
                await write(ctx, response, data + error_chunk(f"The {ctx.provider} provider stopped mid-stream."),
                            answer=bool(data))
        elif ctx.request.transport is not None:
            ctx.request.transport.abort()  # a cut JSON body must not look complete
        return response, False
    finally:
        if ticker is not None:
            ticker.cancel()
    await response.write_eof()
    return response, True
