"""Answering the client of a chat request: the one place that builds its response and sets its status.

- A JSON answer that has all arrived before any of it had to be written goes out whole, with its
  length; a longer one is relayed as it arrives, its tail held back by the meter, and cut off (the
  connection aborted) if the upstream breaks, so that half a body never looks whole.
- A stream gets its 200 and headers when the upstream answers, or earlier, with keep-alive comments,
  while a slow upstream is awaited. Keep-alives go through every silence from the start of the wait
  to the end of the stream: one timer that re-arms itself, no task per stream. A failure after the
  headers arrives as the error chunk.
- What the upstream sends goes through the provider's translation, then the meter (usage, cost, key
  redaction), then out; the next upstream read waits for the write (backpressure).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import aiohttp
import structlog
from aiohttp import web

from proxy.context import Context
from proxy.errors import GatewayError, upstream_error
from proxy.meter import REDACTED, Meter
from proxy.provider import Passthrough, Provider, Translation, UnreadableAnswer, error_chunk, error_of
from proxy.sse import DONE
from proxy.upstream import Answer

log = structlog.get_logger("turnstile.forward")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"
MAX_ERROR_BODY = 64 * 1024
# An error body comes with its status line, not at a model's pace: one that has not ended by then
# is not waited for (`read_timeout`, made for slow answers, would hold the caller for minutes).
ERROR_BODY_SECONDS = 10.0
# An upstream refusing *our* key or credit is the operator's problem, not the caller's (whose
# client would ask them to sign in or pay): they get a 503, the operator gets the log line.
_OURS = {401, 402, 403, 407}
_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, RecursionError)


class Reply:
    def __init__(self, ctx: Context, keepalive: float, loop: asyncio.AbstractEventLoop,
                 secrets: tuple[bytes, ...] = (), begun: Callable[[], None] | None = None) -> None:
        self.ctx = ctx
        self.outcome = ctx.outcome
        self.outbound = ctx.outbound  # the caller's dialect, when not chat completions (proxy.dialects)
        self.translated = self.outbound  # the same, while the answer is chat to be turned into it
        self.response: web.StreamResponse | None = None
        self.interval = keepalive
        self.loop = loop
        self.secrets = secrets  # every provider key, for error bodies
        self.begun = begun  # called when the first byte of the answer is written (the journal's provisional row)
        self.last_write = 0.0
        self._over = False  # the answer's [DONE] was sent: what breaks after it loses nothing
        self._sse = False  # the answer is a stream of server-sent events
        self._timer: asyncio.TimerHandle | None = None
        self._ticking: asyncio.Task[None] | None = None

    # -- keep-alive ---------------------------------------------------------------------------

    def keep_alive(self) -> None:
        """SSE comments through every `interval` of silence from now until `close`; the first one,
        if the upstream has not answered yet, sends the 200 and the headers."""
        if self.interval > 0:
            self.last_write = time.monotonic()
            self._timer = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        idle = time.monotonic() - self.last_write
        if idle >= self.interval:
            if self._ticking is None or self._ticking.done():
                self._ticking = self.loop.create_task(self._keep_alive())
            idle = 0.0
        self._timer = self.loop.call_later(self.interval - idle, self._tick)

    async def _keep_alive(self) -> None:
        try:
            if self.response is None:
                await self._begin(200, SSE_HEADERS)
            await self._write(KEEPALIVE, answer=False)
        except ConnectionResetError:  # the client left: what comes next finds it gone
            self.outcome.status = 499

    async def _settle(self) -> None:
        """Waits for a keep-alive being written: it may be sending the headers."""
        if self._ticking is not None and not self._ticking.done():
            await self._ticking

    def _stop_ticking(self) -> None:
        """No more keep-alives (one being written goes on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._stop_ticking()
        if self._ticking is not None and not self._ticking.done():
            self._ticking.cancel()
        self._ticking = None

    # -- writing ------------------------------------------------------------------------------

    async def _begin(self, status: int, headers: dict[str, str]) -> web.StreamResponse:
        response = self.response = web.StreamResponse(status=status, headers=headers)
        if self.ctx.response_headers:
            response.headers.update(self.ctx.response_headers)
        self.outcome.status = status
        await response.prepare(self.ctx.request)
        return response

    async def _write(self, data: bytes, answer: bool = True) -> None:
        """`answer=False` for what the gateway sends on its own (keep-alive comments, an error before
        any of the answer): it is not the answer's first byte, and nothing in it is billed."""
        now = time.monotonic()
        outcome = self.outcome
        if answer and not outcome.first_byte_at:
            outcome.first_byte_at = now
            if self.begun is not None:
                self.begun()
        self.last_write = now
        assert self.response is not None
        await self.response.write(data)
        outcome.bytes_out += len(data)

    def _whole(self, status: int, body: bytes, content_type: str, answer: bool = True) -> web.Response:
        """An answer in one piece, with its length: no chunked framing."""
        outcome = self.outcome
        outcome.status, outcome.bytes_out = status, len(body)
        if answer:
            outcome.first_byte_at = time.monotonic()
        return web.Response(status=status, body=body, headers={"Content-Type": content_type, **self.ctx.response_headers})

    # -- the three ways a request ends ---------------------------------------------------------

    async def refuse(self, error: GatewayError) -> web.StreamResponse | None:
        """No upstream answered: the error, in the stream if it has started; None if it has not (the
        caller raises it, for the endpoint to answer in the error shape)."""
        self._stop_ticking()
        await self._settle()
        if self.response is None:
            return None
        await self._end_with(self._error_chunk(error.message, error.status), error.status)
        return self.response

    def _error_chunk(self, message: str, status: int) -> bytes:
        if self.outbound is not None:
            return self.outbound.error(status, message)
        return error_chunk(message, status)

    async def _end_with(self, chunk: bytes, status: int) -> None:
        """The error chunk that ends a stream already started: the client's leaving is a 499."""
        self.outcome.status = status
        try:
            await self._write(chunk, answer=False)
        except ConnectionResetError:
            self.outcome.status = 499

    async def relay(self, provider: Provider, upstream: Answer, meter: Meter,
                    passthrough: bool = False) -> web.StreamResponse:
        """The upstream's answer, translated and metered, as it arrives; `passthrough`: it is in the
        caller's dialect already, and goes out as it came."""
        clean = False
        try:
            if upstream.status >= 400:
                self._stop_ticking()  # what remains is one error, in the stream if it has begun
                return await self._upstream_error(provider, upstream)
            content_type = upstream.headers.get("Content-Type", "")
            if passthrough:
                translation: Translation = Passthrough(content_type)
                self.translated = None
            else:
                translation = provider.translation(self.ctx, content_type)
            meter.stream = translation.stream
            meter.compact = getattr(translation, "compact", False)
            json_type = content_type if content_type.startswith("application/json") else "application/json"
            response, clean = await self._relay(provider, upstream, translation, meter, json_type)
            return response
        finally:
            if clean:
                upstream.release()
            else:
                upstream.close()  # unfinished: the connection cannot go back to the pool

    async def _relay(self, provider: Provider, upstream: Answer, translation: Translation,
                     meter: Meter, json_type: str) -> tuple[web.StreamResponse, bool]:
        status = upstream.status
        self._sse = translation.stream
        await self._settle()
        if translation.stream:  # the keep-alives of the wait go on through the stream's silences
            if self.response is None:
                await self._begin(status, SSE_HEADERS)
            if self._timer is None:
                self.keep_alive()
        else:
            self._stop_ticking()  # a JSON answer (which a stream request may get) has no comments
        if self.response is not None:
            self.outcome.status = status
        try:
            if self.translated is None and self.outbound is None and type(translation) is Passthrough and translation.stream:
                await self._pass(upstream, meter)
            else:
                await self._translate(upstream, translation, meter, status, json_type)
            made, usage = translation.end()
            if usage is not None:
                meter.observe(usage)
            data = (meter.feed(made) if made else b"") + meter.finish()
            if self.translated is not None:
                data = self.translated.feed(data) + self.translated.end()
            if self.response is None:
                return self._whole(status, data, json_type), True
            if data:
                await self._emit(data, status, json_type)
            self._stop_ticking()
            await self.response.write_eof()
            return self.response, True
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            self.outcome.status = 499  # the client went away
            _usage_of(translation, meter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return self.response or web.Response(), False
        except Exception as exc:  # the upstream broke, or sent what cannot be translated
            try:
                return await self._broken(provider, translation, meter, exc), False
            finally:
                # aiohttp keeps the error on the upstream's reader; its traceback holds this frame,
                # which holds the upstream: no cycle may outlive the request.
                exc.__traceback__ = None

    async def _pass(self, upstream: Answer, meter: Meter) -> None:
        """The usual stream, OpenAI's chunks passed through: what `_translate`, `_send`, `_emit` and
        `_write` do for each read, inlined (each read is a few Python calls fewer: a stream has many)."""
        response, outcome, feed = self.response, self.outcome, meter.feed
        assert response is not None
        write = response.write
        async for chunk in upstream.content.iter_any():
            data = feed(chunk)
            if not data:
                continue
            now = self.last_write = time.monotonic()
            if not outcome.first_byte_at:
                outcome.first_byte_at = now
                if self.begun is not None:
                    self.begun()
            await write(data)
            outcome.bytes_out += len(data)
            if data.endswith(DONE):
                self._over = True
                self._stop_ticking()  # the stream is over; only the connection's end is left

    async def _translate(self, upstream: Answer, translation: Translation, meter: Meter, status: int,
                         json_type: str) -> None:
        async for chunk in upstream.content.iter_any():
            made = translation.feed(chunk)
            if made:
                data = meter.feed(made)
                if data:
                    await self._send(data, status, json_type)
            if translation.over:
                break

    async def _send(self, data: bytes, status: int, json_type: str) -> None:
        """Metered chat bytes, in the caller's dialect."""
        if self.translated is not None:
            data = self.translated.feed(data)
            if not data:
                return
        await self._emit(data, status, json_type)

    async def _emit(self, data: bytes, status: int, json_type: str) -> None:
        """Bytes in the caller's dialect, out."""
        if self.response is None:  # a JSON answer too long to hold: relayed as it comes
            await self._begin(status, {"Content-Type": json_type})
        await self._write(data)
        outbound = self.outbound
        if data.endswith(DONE) or (outbound is not None and (outbound.over if self.translated is not None
                                                             else self._sse and outbound.ended(data))):
            self._over = True
            self._stop_ticking()  # the stream is over; only the connection's end is left

    async def _broken(self, provider: Provider, translation: Translation, meter: Meter,
                      exc: BaseException) -> web.StreamResponse:
        if self._over:  # after the whole answer: nothing is missing
            log.info("upstream_closed_after_the_answer", request_id=self.ctx.request_id, provider=provider.name,
                     error=type(exc).__name__)
            return self.response  # type: ignore[return-value]
        log.warning("upstream_broke_mid_response", request_id=self.ctx.request_id, provider=provider.name,
                    error=type(exc).__name__)
        self.outcome.status = 502
        unreadable = isinstance(exc, _UNREADABLE)
        if self.response is None:  # nothing sent: an error answer
            raise upstream_error(502, f"The {provider.name} provider sent an answer that could not be read." if unreadable
                                 else f"The {provider.name} provider stopped mid-answer.") from None
        self._stop_ticking()
        if translation.stream:  # what was translated before the break goes first
            made = meter.feed(exc.made) if isinstance(exc, UnreadableAnswer) and exc.made else b""
            if made and self.translated is not None:
                made = self.translated.feed(made)
            try:
                await self._write(made + self._error_chunk(f"The {provider.name} provider stopped mid-stream.", 502),
                                  answer=bool(made))
            except ConnectionResetError:
                self.outcome.status = 499
        elif self.ctx.request.transport is not None:
            self.ctx.request.transport.abort()  # a cut JSON body must not look complete
        return self.response

    async def _upstream_error(self, provider: Provider, upstream: Answer) -> web.StreamResponse:
        status = upstream.status
        content_type = upstream.headers.get("Content-Type", "application/json")
        body = await _error_body(upstream)
        if body is None:  # only a whole body can be redacted with certainty (and read): ours instead
            error = upstream_error(status, f"The {provider.name} provider answered {status}, with an error body too "
                                   "large to relay, or that broke off or did not end.")
            status, body, content_type = status, _body(error), "application/json"
        else:
            for secret in self.secrets:
                body = body.replace(secret, REDACTED)
            if status in _OURS:
                # 407: a forward proxy (HTTP_PROXY) that wants other credentials, not the provider.
                log.error("upstream_proxy_refused" if status == 407 else "upstream_refused_gateway_key",
                          request_id=self.ctx.request_id, provider=provider.name,
                          status=status, body=body[:500].decode("utf-8", "replace"))
                error = GatewayError(503, "temporarily_unavailable",
                                     "The service is temporarily unavailable. Please try again later.")
                status, body, content_type = 503, _body(error), "application/json"
            else:
                try:
                    status, worded = provider.error(status, body)
                except Exception:  # noqa: BLE001 (an adapter that cannot read the body: our own words)
                    log.warning("upstream_error_unreadable", request_id=self.ctx.request_id, provider=provider.name)
                    status, worded = status, _body(upstream_error(status, f"The {provider.name} provider answered {status}."))
                if worded is not body:  # the adapter's own words: ours, JSON
                    body, content_type = worded, "application/json"
        await self._settle()
        if self.outbound is not None:  # in the caller's dialect: the error's message, reworded
            err, message = error_of(body)
            message = message or body.decode("utf-8", "replace")[:1000]
            if self.response is not None:
                await self._end_with(self.outbound.error(status, message), status)
                return self.response
            return self._whole(status, self.outbound.error_body(status, message, err), "application/json", answer=False)
        if self.response is not None:  # the stream already started: the error travels in it
            await self._end_with(error_chunk(body.decode("utf-8", "replace")[:1000], status), status)
            return self.response
        return self._whole(status, body, content_type.split(";")[0], answer=False)


def _usage_of(translation: Translation, meter: Meter) -> None:
    """The usage a translation holds back for its end, when the client leaves before the end."""
    try:
        _, usage = translation.end()
    except Exception:  # noqa: BLE001 (what it cannot finish, it cannot report)
        return
    if usage is not None and meter.usage is None:
        meter.observe(usage)


def _body(error: GatewayError) -> bytes:
    body = error.response().body
    assert isinstance(body, bytes)
    return body


async def _error_body(upstream: Answer) -> bytes | None:
    """An upstream's error body, read to its end (it may come in several reads); None when it is over
    MAX_ERROR_BODY, breaks off or has not ended within ERROR_BODY_SECONDS."""
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(ERROR_BODY_SECONDS):
            while piece := await upstream.content.read(MAX_ERROR_BODY + 1 - size):
                parts.append(piece)
                size += len(piece)
                if size > MAX_ERROR_BODY:
                    return None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
    return b"".join(parts)
