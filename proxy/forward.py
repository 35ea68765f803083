"""The last stage: sends the request to the chosen provider, retrying and falling back, and relays the
answer as it arrives.

It owns the one `ClientSession`. Bytes of OpenAI-compatible upstreams are copied through without
parsing (only the event that carries usage is rewritten, with its cost); the next upstream chunk is
read only after the previous one was written (backpressure). Every request it handles is billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Mapping

import aiohttp
import structlog
from aiohttp import web

from plugins.providers.base import Provider
from proxy import retry
from proxy.config import UpstreamSettings
from proxy.context import Context
from proxy.errors import GatewayError, invalid_request, upstream_error
from proxy.ledger import Ledger, Row, ip_hash
from proxy.metrics import Metrics
from proxy.relay import KEEPALIVE, SSE_HEADERS, error_chunk, relay, write
from proxy.routing import Router
from proxy.meter import REDACTED, Meter

log = structlog.get_logger("turnstile.forward")

MAX_ERROR_BODY = 64 * 1024
# An error body comes with its status line, not at a model's pace: one that has not ended by then
# is not waited for (`read_timeout`, made for slow answers, would hold the caller for minutes).
ERROR_BODY_SECONDS = 10.0
# An upstream refusing *our* key or credit is the operator's problem, not the caller's (whose
# client would ask them to sign in or pay): they get a 503, the operator gets the log line.
_OURS = {401, 402, 403}
USER_AGENT = "turnstile"


async def _error_body(upstream: aiohttp.ClientResponse) -> bytes | None:
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


class Forwarder:
    def __init__(self, router: Router, settings: UpstreamSettings, ledger: Ledger, secrets: Mapping[str, str] = {}) -> None:
        self.router = router
        self.settings = settings
        self.ledger = ledger
        # Each provider's key, for what its answers may quote back (only the key it was sent can be),
        # and all of them for error bodies.
        self.secret_of = {name: key.encode() for name, key in secrets.items() if len(key) >= 8}
        self.secrets = tuple(set(self.secret_of.values()))
        self.session: aiohttp.ClientSession | None = None
        self.metrics: Metrics | None = None
        # The app's loop, taken once: `asyncio.get_running_loop()` makes a getpid system call each time.
        self.loop: asyncio.AbstractEventLoop | None = None

    async def session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: one pooled session for the app's lifetime."""
        s = self.settings
        self.loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=s.pool_size, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        # `connect` bounds the wait for a free pooled connection too: a full pool gives a 504, not a hang.
        timeout = aiohttp.ClientTimeout(total=None, connect=s.connect_timeout * 3, sock_connect=s.connect_timeout,
                                        sock_read=s.read_timeout)
        # Our own User-Agent, not aiohttp's: a default header costs less per request than skipping one.
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=True, headers={"User-Agent": USER_AGENT},
            cookie_jar=aiohttp.DummyCookieJar(),  # a provider's cookies must not leak to other callers
        )
        yield
        await self.session.close()

    def servable(self, ctx: Context) -> bool:
        """Whether some provider is configured for the request's model or one of its fallbacks."""
        if self.router.serves(ctx.model.id):
            return True
        return any(map(self.router.serves, retry.fallback_models(ctx, self.settings, ctx.body.get("models"))))

    async def __call__(self, ctx: Context) -> web.StreamResponse:
        ctx.meter = Meter(ctx.model.prices, ctx.stream, ctx.model.bounds)
        try:
            if ctx.stream and self.settings.keepalive_interval > 0:
                return await self._stream(ctx)
            provider, upstream = await self._open(ctx)
            return await self._finish(ctx, provider, upstream, None)
        finally:
            self._bill(ctx)

    async def _open(self, ctx: Context) -> tuple[Provider, aiohttp.ClientResponse]:
        """The first upstream answer worth relaying: 429 and 5xx (and refused connections) are retried
        with back-off, then the next fallback model is tried; the last failure is what the client gets."""
        assert self.session is not None, "the forwarder's session opens with the app"
        meter = ctx.meter
        assert meter is not None
        fallbacks = retry.fallback_models(ctx, self.settings, ctx.body.get("models"))
        failure: GatewayError | None = None
        for i, model_id in enumerate([ctx.model.id, *fallbacks]):
            last_model = i == len(fallbacks)
            if i:
                ctx.use_model(model_id)
                ctx.fallbacks.append(model_id)
                meter.prices, meter.bounds = ctx.model.prices, ctx.model.bounds
            try:
                route = self.router.route(ctx.model)
            except GatewayError as exc:
                failure = exc
                continue
            provider = route.provider
            ctx.provider = provider.name
            meter.secret = self.secret_of.get(provider.name, b"")
            try:
                req = provider.request(ctx, route.upstream_model)
            except (TypeError, AttributeError, ValueError, KeyError) as exc:
                if str(exc) == "Recursion limit reached":  # orjson writes JSON at most 255 levels deep
                    raise invalid_request("Invalid request: the body is nested more than 255 levels deep.") from None
                raise invalid_request("Invalid request: a field has a type this model's provider cannot take.") from None
            for attempt in range(self.settings.retries + 1):
                last_try = attempt == self.settings.retries
                try:
                    upstream = await self.session.post(req.url, data=req.body, headers=req.headers, allow_redirects=False)
                except asyncio.TimeoutError:
                    failure = GatewayError(504, "upstream_timeout", f"The {provider.name} provider did not answer in time.")
                    break  # a slow provider is not asked again: the next model may be quicker
                except aiohttp.ClientError as exc:
                    log.warning("upstream_unreachable", request_id=ctx.request_id, provider=provider.name,
                                error=type(exc).__name__, attempt=attempt)
                    failure = upstream_error(502, f"The {provider.name} provider could not be reached.")
                    wait = retry.delay(self.settings, attempt)
                else:
                    if upstream.status not in retry.RETRYABLE or (last_try and last_model):
                        return provider, upstream
                    log.warning("upstream_retryable", request_id=ctx.request_id, provider=provider.name,
                                status=upstream.status, attempt=attempt)
                    wait = retry.delay(self.settings, attempt, upstream.headers.get("Retry-After"))
                    failure = upstream_error(502 if upstream.status >= 500 else 429, f"The {provider.name} provider "
                                             f"answered {upstream.status}.")
                    upstream.close()
                if last_try:
                    break
                ctx.retries += 1
                await asyncio.sleep(wait)
        ctx.status = failure.status if failure else 502
        try:
            raise failure or upstream_error(502, "No provider could serve the request.")
        finally:
            failure = None  # its traceback holds this frame: no cycle

    async def _stream(self, ctx: Context) -> web.StreamResponse:
        """A stream whose upstream is slow to answer gets its 200 and SSE comments meanwhile; a failure
        after that point arrives as the error chunk. The fast path costs one timer, no task."""
        loop = self.loop
        assert loop is not None, "the forwarder's loop is taken when the app starts"
        opened: asyncio.Event | None = None
        early: asyncio.Task[web.StreamResponse] | None = None

        def commit() -> None:
            nonlocal early, opened
            opened = asyncio.Event()
            early = loop.create_task(self._keep_waiting(ctx, opened))

        timer = loop.call_later(self.settings.keepalive_interval, commit)
        try:
            provider, upstream = await self._open(ctx)
        except GatewayError as exc:
            if early is None:
                raise
            assert opened is not None
            opened.set()
            response = await early
            await write(ctx, response, error_chunk(exc.message, exc.status), answer=False)
            ctx.status = exc.status
            return response
        except BaseException as exc:  # the client left while we waited: nothing more to write
            if early is not None:
                early.cancel()
            if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
                ctx.status = 499
            raise
        finally:
            timer.cancel()
            if opened is not None:
                opened.set()
        response = None
        if early is not None:
            try:
                response = await early
            except BaseException:  # cancelled as the provider answered: its answer is not read
                upstream.close()
                ctx.status = 499
                raise
        return await self._finish(ctx, provider, upstream, response)

    async def _keep_waiting(self, ctx: Context, opened: asyncio.Event) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **ctx.response_headers})
        await response.prepare(ctx.request)
        ctx.status = 200
        try:
            while not opened.is_set():
                await write(ctx, response, KEEPALIVE, answer=False)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(opened.wait(), self.settings.keepalive_interval)
        except ConnectionResetError:  # the client left: what comes next finds the connection closed
            ctx.status = 499
        return response

    async def _finish(self, ctx: Context, provider: Provider, upstream: aiohttp.ClientResponse,
                      response: web.StreamResponse | None) -> web.StreamResponse:
        clean = False
        try:
            if upstream.status >= 400:
                return await self._error(ctx, provider, upstream, response)
            metrics = self.metrics if ctx.stream else None
            if metrics is not None:
                metrics.streams_in_flight += 1
            try:
                assert self.loop is not None, "the forwarder's loop is taken when the app starts"
                result, clean = await relay(ctx, provider, upstream, response, self.settings.keepalive_interval, self.loop)
            finally:
                if metrics is not None:
                    metrics.streams_in_flight -= 1
            return result
        except (asyncio.CancelledError, ConnectionResetError):
            ctx.status = 499
            raise
        finally:
            if clean:
                upstream.release()
            else:
                upstream.close()  # unfinished: the connection cannot go back to the pool

    async def _error(self, ctx: Context, provider: Provider, upstream: aiohttp.ClientResponse,
                     response: web.StreamResponse | None) -> web.StreamResponse:
        status = upstream.status
        content_type = upstream.headers.get("Content-Type", "application/json")
        body = await _error_body(upstream)
        if body is None:  # only a whole body can be redacted with certainty (and parsed): ours instead
            body = b"" if not provider.passthrough else upstream_error(  # type: ignore[assignment]
                status, f"The {provider.name} provider answered {status}, with an error body too large to "
                "relay, or that broke off or did not end.").response().body
            content_type = "application/json"
        for secret in self.secrets:
            body = body.replace(secret, REDACTED)
        if status in _OURS:
            log.error("upstream_refused_gateway_key", request_id=ctx.request_id, provider=provider.name,
                      status=status, body=body[:500].decode("utf-8", "replace"))
            err = GatewayError(503, "temporarily_unavailable",
                               "The service is temporarily unavailable. Please try again later.")
            status, body, content_type = 503, err.response().body, "application/json"  # type: ignore[assignment]
        elif not provider.passthrough:
            status, body = provider.translate_error(status, body)
            content_type = "application/json"
        ctx.status = status
        if response is not None:  # the stream already started: the error travels in it
            await write(ctx, response, error_chunk(body.decode("utf-8", "replace")[:1000], status), answer=False)
            return response
        return web.Response(status=status, body=body, content_type=content_type.split(";")[0],
                            headers=ctx.response_headers)

    def _bill(self, ctx: Context) -> None:
        """One ledger row. Output that came without usage is billed by estimate; failures before
        any output cost nothing."""
        meter = ctx.meter
        assert meter is not None
        if meter.doubted is not None:
            log.warning("usage_not_believed", request_id=ctx.request_id, provider=ctx.provider, model=ctx.model.id,
                        usage=repr(meter.doubted)[:300], billed="by estimate")
        if meter.usage is None and (ctx.first_byte_at or meter.doubted is not None) and (
                ctx.status < 400 or ctx.status in (499, 502)):
            meter.estimate(ctx.request_bytes, ctx.bytes_out)
        usage = meter.usage
        account = ctx.account
        self.ledger.record(Row(
            request_id=ctx.request_id,
            account_id=account.id if account else None,
            ip_hash=None if account else ip_hash(self.ledger.secret, ctx.client_ip),
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
            duration_ms=round((time.monotonic() - ctx.started_at) * 1000, 2),
            finish_reason=meter.finish_reason,
            streamed=ctx.stream,
            created_at=time.time(),
        ))
