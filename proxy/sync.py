"""Optional catalog sync: merge an upstream's `/models` (OpenRouter's) at start-up and on an interval."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, Mapping

import aiohttp
import orjson
import structlog
from aiohttp import web

from proxy.catalog import from_upstream
from proxy.config import CatalogSettings, ConfigError
from proxy.dial import Dialer
from proxy.provider import under
from proxy.routing import Router, provider_key

log = structlog.get_logger("turnstile.catalog")

MAX_BYTES = 64 * 1024 * 1024


async def fetch_once(dialer: Dialer, router: Router, provider: str, url: str, headers: dict[str, str]) -> int:
    assert dialer.session is not None
    async with dialer.session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        resp.raise_for_status()
        data = orjson.loads(await resp.content.read(MAX_BYTES))
    rows = from_upstream(data, provider)
    # Curated entries (shipped or configured) win over the upstream's.
    router.catalog.update(rows, keep_existing=True)
    router.rebuild()
    return len(rows)


def catalog_sync(
    settings: CatalogSettings, dialer: Dialer, router: Router, env: Mapping[str, str]
) -> Callable[[web.Application], AsyncIterator[None]]:
    row = next((u.row for u in router.upstreams if u.row.name == settings.sync_provider), None)
    if row is None:
        raise ConfigError(f"catalog.sync_provider: no provider named {settings.sync_provider!r}")
    url = under(env.get(row.base_url_env) or row.base_url, "/models")
    headers = dict(row.headers)
    key = provider_key(row, env)
    if key:
        headers["Authorization"] = f"Bearer {key}"

    async def run_once() -> None:
        try:
            count = await fetch_once(dialer, router, row.name, url, headers)
            log.info("catalog_synced", provider=row.name, models=count, total=len(router.catalog.models))
        except Exception as exc:  # a bad upstream list must never stop the gateway or the loop
            log.warning("catalog_sync_failed", provider=row.name, error=type(exc).__name__)

    async def loop() -> None:
        while True:
            await asyncio.sleep(settings.sync_interval)
            await run_once()

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await run_once()
        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


