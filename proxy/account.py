"""`GET {base}/key` and `GET {base}/generation?id=…`: a caller's own balance, spend and requests,
in OpenRouter's shapes; `GET {base}/usage`: its budgets and limits and what is left of each."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import GatewayError
from proxy.keys import Account, caller_key, invalid_key, iso
from proxy.limitstore import NO_LIMIT, AdvertisedLimit
from proxy.quota import Quota
from proxy.store import Store, since


class AccountHandlers:
    def __init__(self, store: Store, limit: AdvertisedLimit = NO_LIMIT, keylimits: Quota | None = None) -> None:
        self.store = store
        self.keylimits = keylimits
        self.rate_limit = {"requests": limit.requests, "interval": limit.interval, "note": limit.note}

    async def _caller(self, request: web.Request) -> Account:
        token = caller_key(request.headers)
        if token is None:
            raise GatewayError(401, "authentication_required", "This endpoint needs an API key.", code="authentication_required")
        account = self.store.lookup(token)
        if account is None:  # made a moment ago, perhaps on another instance
            await self.store.recheck()
            account = self.store.lookup(token)
        if account is None or account.expired(time.time()):
            raise invalid_key()
        return account

    async def key(self, request: web.Request) -> web.Response:
        account = await self._caller(request)
        spent = await self.store.spent(account.id, [since(1), since(7), since(30)])
        balance = await self.store.balance(account.id)
        usd = [micros / 1_000_000 for micros in spent]
        remaining = balance / 1_000_000
        data = {
            "label": f"{account.name} ({account.key_hint})",
            "limit": round(usd[0] + remaining, 6),
            "limit_reset": None,
            "limit_remaining": remaining,
            "include_byok_in_limit": False,
            "usage": usd[0],
            "usage_daily": usd[1],
            "usage_weekly": usd[2],
            "usage_monthly": usd[3],
            "byok_usage": 0,
            "is_free_tier": spent[0] == 0 and balance <= 0,
            "is_management_key": False,
            "is_provisioning_key": False,
            "expires_at": iso(account.settings.expires_at) if account.settings and account.settings.expires_at else None,
            "rate_limit": ({"requests": account.settings.rpm, "interval": "1m", "note": "This key's own limit."}
                           if account.settings is not None and account.settings.rpm is not None else self.rate_limit),
        }
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")

    async def generation(self, request: web.Request) -> web.Response:
        account = await self._caller(request)
        request_id = request.query.get("id", "")
        if not request_id:
            raise GatewayError(400, "invalid_request", "Give the request id as ?id=…", param="id")
        row = await self.store.generation(request_id, account.id)
        if row is None:
            raise GatewayError(404, "not_found", "No such generation for this key.", code="not_found")
        return web.Response(body=orjson.dumps({"data": row.public()}), content_type="application/json")

    async def usage(self, request: web.Request) -> web.Response:
        """The caller's own quota: balance, each budget's window with what is spent and left and when
        it resets, each rate limit with what is left, and the model lists. Never another key's."""
        account = await self._caller(request)
        settings = account.settings
        now = time.time()
        data: dict[str, Any] = {"label": f"{account.name} ({account.key_hint})",
                                "balance": await self.store.balance(account.id) / 1_000_000,
                                "budgets": [], "limits": {}, "models": {"allow": [], "deny": []}, "expires_at": None}
        if settings is None:
            return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")
        if settings.budgets:
            starts = [b.start(now) for b in settings.budgets]
            spent = await self.store.window_spent(account.id, starts)
            for budget, start, used in zip(settings.budgets, starts, spent):
                oldest = await self.store.oldest(account.id, start) if budget.sliding else None
                data["budgets"].append({"window": budget.window, "sliding": budget.sliding, "limit": budget.micros / 1e6,
                                        "spent": used / 1e6, "remaining": max(budget.micros - used, 0) / 1e6,
                                        "resets_at": iso(budget.resets(now, oldest))})
        if self.keylimits is not None:
            data["limits"] = await self.keylimits.left(account.id, settings)
        data["models"] = {"allow": list(settings.allow), "deny": list(settings.deny)}
        data["expires_at"] = iso(settings.expires_at) if settings.expires_at else None
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")
