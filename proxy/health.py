"""`/readyz`: 200 when the gateway can serve (rate-limit storage reachable, key store open), else 503
with the reasons. `/healthz` only says the process is up."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from limits.aio.storage import Storage

from proxy.store import Store


class Readiness:
    def __init__(self, storage: Storage, store: Store) -> None:
        self.storage = storage
        self.store = store

    async def reasons(self) -> list[str]:
        problems = []
        try:
            reachable = await asyncio.wait_for(self.storage.check(), timeout=2.0)
        except Exception:  # any failure of the storage client is a "not reachable"
            reachable = False
        if not reachable:
            problems.append("rate-limit storage is not reachable")
        if not self.store.is_open:
            problems.append("key store is not open")
        return problems

    async def handler(self, request: web.Request) -> web.Response:
        problems = await self.reasons()
        body = {"status": "unavailable", "reasons": problems} if problems else {"status": "ready"}
        return web.Response(status=503 if problems else 200, body=orjson.dumps(body), content_type="application/json")
