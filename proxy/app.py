"""Builds the aiohttp application from a `Config`: everything is decided here, once, at start-up."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import time
from typing import Any, Awaitable, Callable, Iterator, Mapping

import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from proxy.catalog import Catalog, seed_rows
from proxy.clientip import ClientIP
from proxy.config import Config
from proxy.errors import GatewayError, http_error
from proxy.forward import Forwarder
from proxy.account import AccountHandlers
from proxy.dialects import messages
from proxy.handlers import ChatHandler, MessagesHandler, ModelsHandler, ResponsesHandler, healthz
from proxy.outcome import Outcome, Recorder
from proxy.health import Readiness
from proxy import store as stores
from proxy.admin import TOKEN_ENV as ADMIN_TOKEN_ENV, AdminAPI
from proxy.console import Console
from proxy.live import Live
from proxy.quota import Quota
from proxy.store import Store
from proxy.metrics import Metrics
from proxy.pipeline import compose
from proxy.limitstore import NO_LIMIT, AdvertisedLimit, SharedStorage, is_shared, open_storage
from proxy.registry import STAGES, build, load
from proxy.routing import Router, build_providers, provider_key
from proxy import logs, sync

BASES = ("/api/gateway", "/api/gateway/v1", "/api/openrouter", "/api/openrouter/v1", "/api/v1", "/v1")

log = structlog.get_logger("turnstile")

Handler = Callable[..., Awaitable[web.StreamResponse]]  # (request) or (request, outcome)


Render = Callable[[GatewayError], web.Response]


def wrap(handler: Handler, route: str, max_body: int, ids: Iterator[str], record: Recorder,
         render: Render = GatewayError.response) -> Handler:
    """Each endpoint, wrapped once at start-up (no per-request middleware chain): it gets a request
    id and an `Outcome` (handed to the handler if it takes one), every refusal rendered in the error
    shape, and the outcome recorded however the request ended."""
    takes_outcome = len(inspect.signature(handler).parameters) == 2

    async def endpoint(request: web.Request) -> web.StreamResponse:
        outcome = Outcome(route, next(ids), time.monotonic())
        error: GatewayError | None = None
        try:
            response = await (handler(request, outcome) if takes_outcome else handler(request))
        except GatewayError as exc:
            error, response = exc, render(exc)
            outcome.status = exc.status
            if outcome.response_headers:  # a refusal after the limit stage still tells what is left of the limit
                for name, value in outcome.response_headers.items():
                    response.headers.setdefault(name, value)
        except web.HTTPException as exc:
            error = http_error(exc, max_body)
            response = render(error)
            outcome.status = error.status
        except asyncio.CancelledError:
            outcome.status = 499
            record(outcome, request.method, request.path)
            raise
        except Exception:
            log.exception("unhandled_error", request_id=outcome.request_id, path=request.path)
            response = render(GatewayError(500, "internal_error", "Internal error; it has been logged."))
            outcome.status = 500
        if not response.prepared:
            response.headers["X-Request-Id"] = outcome.request_id
        if error is not None and error.status in (408, 413):
            response.force_close()  # the body was not read: the connection cannot carry another request
        if not outcome.status:
            outcome.status = response.status
        if not outcome.bytes_out:
            body = getattr(response, "body", None)
            outcome.bytes_out = len(body) if isinstance(body, bytes) else 0
        # Recorded once the answer is out (the access line, metrics and billing are off its
        # latency): aiohttp writes a whole answer before this task yields to the loop.
        record.after_reply(outcome, request.method, request.path, error)
        # No reference cycle may outlive the request: a caught error's traceback holds this frame.
        # Unlinked, everything goes when the request ends instead of waiting, with all it holds,
        # for the cycle collector.
        error = None
        return response

    return endpoint


def expect_within(max_body: int) -> Handler:
    """`Expect: 100-continue` is answered only for a body within the limit; a larger one gets its 413
    without being sent at all."""

    async def expect(request: web.Request) -> None:
        if (request.content_length or 0) > max_body:
            return None  # no "100 Continue": the endpoint refuses the request unread
        return await _default_expect_handler(request)

    return expect  # type: ignore[return-value]


def request_ids() -> Iterator[str]:
    """Unique ids without a random draw per request: a random prefix per process, then a counter."""
    prefix = os.urandom(8).hex()
    return (f"{prefix}{n:016x}" for n in itertools.count(1))


class Fallback:
    """Every path no route serves: 405 for a known path and the wrong method, 404 otherwise."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        allowed = sorted({r.method for res in self.app.router.resources() for r in res
                          if res.canonical == request.path and r.method not in ("*", "HEAD")})
        if allowed:
            raise GatewayError(405, "method_not_allowed", "Method not allowed.", code="method_not_allowed",
                               headers={"Allow": ", ".join(allowed)})
        raise http_error(web.HTTPNotFound())


def create_app(config: Config, env: Mapping[str, str] = os.environ) -> web.Application:
    catalog = Catalog(seed_rows())
    catalog.update(config.models)
    router = Router(build_providers(config.providers, env), catalog)
    store = stores.open_store(stores.settings(config, env))
    secrets = {row.name: provider_key(row, env) for row in config.providers if row.api_key_env}
    forwarder = Forwarder(router, config.upstream, secrets)
    client_ip = ClientIP(config.server.trusted_proxies)
    storage = open_storage(config.limits)
    shared = SharedStorage(storage, config.limits.fail_open) if is_shared(config.limits.storage) else None
    # What a stage may ask for by naming a constructor parameter after it.
    resources: dict[str, Any] = {"catalog": catalog, "store": store, "upstream": config.upstream, "storage": storage, "shared": shared,
                                 "servable": forwarder.servable, "workers": config.server.workers}
    stages = []
    for i, row in enumerate(config.pipeline):
        where = f"pipeline[{i}] ({row.use})"
        stages.append(build(load(STAGES, row.use, where), row.options, where, **resources))
    pipeline = compose(stages, forwarder)
    chat = ChatHandler(catalog, client_ip, pipeline, config.server.max_body_bytes, config.server.body_timeout)
    anthropic = MessagesHandler(catalog, client_ip, pipeline, config.server.max_body_bytes, config.server.body_timeout)
    openai_responses = ResponsesHandler(catalog, client_ip, pipeline, config.server.max_body_bytes, config.server.body_timeout)
    models = ModelsHandler(catalog)
    advertised = [s.advertised for s in stages if isinstance(getattr(s, "advertised", None), AdvertisedLimit)]
    keylimits = next((s for s in stages if isinstance(s, Quota)), None)  # a stage that limits keys
    account = AccountHandlers(store, advertised[0] if advertised else NO_LIMIT, keylimits)
    metrics = Metrics(env.get(config.metrics.token_env, "") if config.metrics.token_env else "") if config.metrics.enabled else None
    forwarder.metrics = metrics
    if metrics is not None:
        metrics.limits = shared
    ready = Readiness(storage, store)

    app = web.Application(client_max_size=config.server.max_body_bytes)
    ids = request_ids()
    live = Live()
    record = Recorder(logs.access_writer(), metrics, store, live)
    forwarder.recorder = record
    app.cleanup_ctx.append(record.loop_ctx)

    def endpoint(handler: Handler, route: str, render: Render = GatewayError.response) -> Handler:
        return wrap(handler, route, config.server.max_body_bytes, ids, record, render)

    async def end_live(_: web.Application) -> None:
        live.close()  # a watcher's stream must not hold a graceful stop for its whole grace period

    app.on_shutdown.append(end_live)
    app.cleanup_ctx.append(store.cleanup_ctx)  # closed after the session: its last flush sees every request
    app.cleanup_ctx.append(forwarder.session_ctx)
    if shared is not None:
        app.on_cleanup.append(lambda _: shared.close())
    if metrics is not None:
        app.cleanup_ctx.append(metrics.sync_ctx)
    if config.catalog.sync:
        app.cleanup_ctx.append(sync.catalog_sync(config.catalog, forwarder.dialer, router, env))
    expect = expect_within(config.server.max_body_bytes)
    chat_endpoint, models_endpoint = endpoint(chat.__call__, "chat"), endpoint(models.__call__, "models")
    key_endpoint, generation_endpoint = endpoint(account.key, "key"), endpoint(account.generation, "generation")
    usage_endpoint = endpoint(account.usage, "usage")
    messages_endpoint = endpoint(anthropic.__call__, "messages", render=messages.render)
    count_endpoint = endpoint(anthropic.count_tokens, "count_tokens", render=messages.render)
    responses_endpoint = endpoint(openai_responses.__call__, "responses")
    probe = endpoint(healthz, "probe")
    app.router.add_route("HEAD", "/", probe)  # Claude Code's probe of its base URL
    for base in BASES:
        app.router.add_post(base + "/chat/completions", chat_endpoint, expect_handler=expect)
        app.router.add_post(base + "/responses", responses_endpoint, expect_handler=expect)
        app.router.add_get(base + "/models", models_endpoint)
        app.router.add_get(base + "/key", key_endpoint)
        app.router.add_get(base + "/auth/key", key_endpoint)
        app.router.add_get(base + "/generation", generation_endpoint)
        app.router.add_get(base + "/usage", usage_endpoint)
        app.router.add_route("HEAD", base, probe)
    # Anthropic's clients add `/v1/messages` to their base URL, the Kilo CLI `/messages`: both, under each.
    for prefix in dict.fromkeys(p for base in BASES for p in (base, base + "/v1")):
        app.router.add_post(prefix + "/messages", messages_endpoint, expect_handler=expect)
        app.router.add_post(prefix + "/messages/count_tokens", count_endpoint, expect_handler=expect)
    app.router.add_get("/healthz", endpoint(healthz, "healthz"))
    app.router.add_get("/readyz", endpoint(ready.handler, "readyz"))
    if metrics is not None:
        app.router.add_get("/metrics", endpoint(metrics.handler, "metrics"))
    admin = AdminAPI(store, env.get(ADMIN_TOKEN_ENV, ""), live, keylimits, metrics)
    add = lambda method, path, handler, route: app.router.add_route(method, path, endpoint(handler, route))  # noqa: E731
    Console(admin.token, admin.sessions, client_ip).routes(add)  # before the admin API's catch-all
    admin.routes(add)
    app.router.add_route("*", "/{tail:.*}", endpoint(Fallback(app).__call__, "unknown"))
    app[CATALOG] = catalog
    app[STORE] = store
    return app


CATALOG = web.AppKey("catalog", Catalog)
STORE = web.AppKey("store", Store)
