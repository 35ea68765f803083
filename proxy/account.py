"""`GET {base}/key` and `GET {base}/generation?id=…`: a caller's own balance, spend and requests,
in OpenRouter's shapes."""

from __future__ import annotations

import datetime as dt

import orjson
from aiohttp import web

from proxy.errors import GatewayError
from proxy.keys import Account, KeyStore, caller_key, invalid_key
from proxy.ledger import Ledger
from proxy.limitstore import NO_LIMIT, AdvertisedLimit


def _since(days: int) -> float:
    today = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if days == 7:
        today -= dt.timedelta(days=today.weekday())  # weeks start on Monday
    elif days == 30:
        today = today.replace(day=1)
    return today.timestamp()


class AccountHandlers:
    def __init__(self, keys: KeyStore, ledger: Ledger, limit: AdvertisedLimit = NO_LIMIT) -> None:
        self.keys = keys
        self.ledger = ledger
        self.rate_limit = {"requests": limit.requests, "interval": limit.interval, "note": limit.note}

    def _caller(self, request: web.Request) -> Account:
        token = caller_key(request.headers)
        if token is None:
            raise GatewayError(401, "authentication_required", "This endpoint needs an API key.", code="authentication_required")
        account = self.keys.lookup(token)
        if account is None:
            raise invalid_key()
        return account

    async def key(self, request: web.Request) -> web.Response:
        account = self._caller(request)
        periods = (_since(1), _since(7), _since(30))
        row = (await self.ledger.query(
            "SELECT COALESCE(SUM(cost_micros), 0), "
            "COALESCE(SUM(CASE WHEN created_at >= ? THEN cost_micros END), 0), "
            "COALESCE(SUM(CASE WHEN created_at >= ? THEN cost_micros END), 0), "
            "COALESCE(SUM(CASE WHEN created_at >= ? THEN cost_micros END), 0) "
            "FROM ledger WHERE account_id = ?", *periods, account.id))[0]
        pending = [r for r in self.ledger.rows if r.account_id == account.id]
        spent = [int(row[0]) + sum(r.cost_micros for r in pending)]
        for i, since in enumerate(periods, start=1):
            spent.append(int(row[i]) + sum(r.cost_micros for r in pending if r.created_at >= since))
        usd = [micros / 1_000_000 for micros in spent]
        remaining = account.balance_micros / 1_000_000
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
            "is_free_tier": spent[0] == 0 and account.balance_micros <= 0,
            "is_management_key": False,
            "is_provisioning_key": False,
            "expires_at": None,
            "rate_limit": self.rate_limit,
        }
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")

    async def generation(self, request: web.Request) -> web.Response:
        account = self._caller(request)
        request_id = request.query.get("id", "")
        if not request_id:
            raise GatewayError(400, "invalid_request", "Give the request id as ?id=…", param="id")
        row = await self.ledger.generation(request_id, account.id)
        if row is None:
            raise GatewayError(404, "not_found", "No such generation for this key.", code="not_found")
        return web.Response(body=orjson.dumps({"data": row.public()}), content_type="application/json")
