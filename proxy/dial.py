"""Opening the upstream: the route for the request's model, its request, retries with back-off, then
the next fallback model. Owns the one `ClientSession`.

What it returns is the first upstream answer worth relaying (a success, or an error that retrying
would not change); when none is, the last failure is raised as the caller's `GatewayError`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from proxy import retry
from proxy.config import UpstreamSettings
from proxy.context import Context, Native
from proxy.errors import GatewayError, invalid_request, upstream_error
from proxy.provider import Provider, UpstreamRequest
from proxy.routing import Router
from proxy.upstream import USER_AGENT, Answer, UnsafeHeader, Upstream

log = structlog.get_logger("turnstile.forward")


def _takes(provider: Provider, native: Native) -> bool:
    """Whether the provider is sent the request as it came: it speaks its dialect (and takes it)."""
    takes = getattr(provider, "takes", None)
    return takes(native) if takes is not None else native.dialect in getattr(provider, "speaks", ())


def _takes_images(entry: dict) -> bool:
    """Whether the catalog says the model reads images (a model it says nothing of is given them)."""
    modalities = (entry.get("architecture") or {}).get("input_modalities") if isinstance(entry.get("architecture"), dict) else None
    return not isinstance(modalities, list) or "image" in modalities


@dataclass(slots=True)
class Opened:
    provider: Provider
    upstream: Answer
    passthrough: bool  # the request went in the caller's own dialect: its answer is relayed as it is


class Dialer:
    def __init__(self, router: Router, settings: UpstreamSettings) -> None:
        self.router = router
        self.settings = settings
        self.upstream = Upstream(settings)
        self.session: aiohttp.ClientSession | None = None

    async def session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: one pool for the app's lifetime. Chat requests go through `upstream`;
        the odd other request (the catalog's sync) through a `ClientSession` on the same pool."""
        connector = self.upstream.start()
        self.session = aiohttp.ClientSession(
            connector=connector, connector_owner=False, headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout * 3,
                                          sock_connect=self.settings.connect_timeout,
                                          sock_read=self.settings.read_timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # a provider's cookies must not leak to other callers
            trust_env=self.settings.proxy_from_env,
        )
        yield
        await self.session.close()
        await self.upstream.close()

    def servable(self, ctx: Context) -> bool:
        """Whether some provider is configured for the request's model or one of its fallbacks."""
        if self.router.serves(ctx.model.id):
            return True
        return any(map(self.router.serves, retry.fallback_models(ctx, self.settings, ctx.body.get("models"))))

    async def open(self, ctx: Context) -> Opened:
        """429 and 5xx answers (and refused connections) are retried with back-off, then the next
        fallback model is tried. `ctx.model` is the model tried last; the outcome counts retries and
        fallbacks."""
        outcome = ctx.outcome
        fallbacks = retry.fallback_models(ctx, self.settings, ctx.body.get("models"))
        failure: GatewayError | None = None
        for i, model_id in enumerate([ctx.model.id, *fallbacks]):
            last_model = i == len(fallbacks)
            if i:
                ctx.use_model(model_id)
                outcome.fallbacks.append(model_id)
            try:
                route = self.router.route(ctx.model)
            except GatewayError as exc:
                failure = exc
                continue
            provider = route.provider
            outcome.provider = provider.name
            native = ctx.native is not None and _takes(provider, ctx.native)
            if not native and ctx.native is not None and ctx.native.untranslatable:
                failure = ctx.native.untranslatable
                continue  # a fallback's provider may take it as it is
            if ctx.native is not None and ctx.native.images and not _takes_images(ctx.model.entry):
                failure = invalid_request(f"Invalid request: {ctx.model.id} does not take images.", param="messages")
                continue  # nor may a fallback
            req = self._request(ctx, provider, route.upstream_model, native)
            for attempt in range(self.settings.retries + 1):
                last_try = attempt == self.settings.retries
                try:
                    upstream = await self.upstream.post(req.url, req.headers, req.body)
                except asyncio.TimeoutError:
                    failure = GatewayError(504, "upstream_timeout", f"The {provider.name} provider did not answer in time.")
                    break  # a slow provider is not asked again: the next model may be quicker
                except UnsafeHeader:  # (the configuration's headers are checked at start-up: one the caller sent)
                    raise invalid_request("Invalid request: a header for the provider holds a line break.") from None
                except aiohttp.ClientError as exc:
                    # What went wrong, for the operator (aiohttp's words name a host, a proxy, a
                    # certificate or a malformed answer, never a key).
                    log.warning("upstream_unreachable", request_id=ctx.request_id, provider=provider.name,
                                error=type(exc).__name__, reason=str(exc)[:300], attempt=attempt)
                    failure = upstream_error(502, f"The {provider.name} provider could not be reached.")
                    if isinstance(exc, aiohttp.ClientSSLError):
                        break  # a certificate that is not trusted now will not be trusted in a moment
                    wait = retry.delay(self.settings, attempt)
                else:
                    if upstream.status not in retry.RETRYABLE or (last_try and last_model):
                        return Opened(provider, upstream, native)
                    log.warning("upstream_retryable", request_id=ctx.request_id, provider=provider.name,
                                status=upstream.status, attempt=attempt)
                    wait = retry.delay(self.settings, attempt, upstream.headers.get("Retry-After"))
                    failure = upstream_error(502 if upstream.status >= 500 else 429, f"The {provider.name} provider "
                                             f"answered {upstream.status}.")
                    upstream.close()
                if last_try:
                    break
                outcome.retries += 1
                await asyncio.sleep(wait)
        try:
            raise failure or upstream_error(502, "No provider could serve the request.")
        finally:
            failure = None  # its traceback holds this frame: no cycle

    @staticmethod
    def _request(ctx: Context, provider: Provider, upstream_model: str, native: bool) -> UpstreamRequest:
        try:
            if native:
                return provider.native_request(ctx, upstream_model)  # type: ignore[attr-defined]
            return provider.request(ctx, upstream_model)
        except (TypeError, AttributeError, ValueError, KeyError) as exc:
            if str(exc) == "Recursion limit reached":  # orjson writes JSON at most 255 levels deep
                raise invalid_request("Invalid request: the body is nested more than 255 levels deep.") from None
            raise invalid_request("Invalid request: a field has a type this model's provider cannot take.") from None
