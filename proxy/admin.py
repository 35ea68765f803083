"""The admin API, `/admin/v1/…`: keys made, listed, changed, topped up and revoked, and usage
queried, by automation, on the same store as `turnstile keys`.

Enabled only when TURNSTILE_ADMIN_TOKEN is set; every call must carry it as a bearer token,
compared in constant time. A call without it, with another, or to a disabled API is 401 before
any handler runs. Errors are in the gateway's one shape.
"""

from __future__ import annotations

import hmac
from decimal import Decimal, InvalidOperation
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from proxy.errors import GatewayError
from proxy.keys import Account, KeySettings, SettingsError, iso, parse_time
from proxy.store import Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TOKEN_ENV = "TURNSTILE_ADMIN_TOKEN"
PAGE = 100  # rows per page unless the caller asks for fewer (at most 1,000)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def key_json(account: Account) -> dict[str, Any]:
    return {
        "id": account.id,
        "name": account.name,
        "key_hint": account.key_hint,
        "balance": account.balance_micros / 1_000_000,
        "created_at": iso(account.created_at),
        "revoked_at": iso(account.revoked_at) if account.revoked_at else None,
        "settings": account.settings.to_json() if account.settings is not None else {},
    }


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, code="invalid_request", param=param)


def _usd(value: Any, param: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad(f"{param}: an amount in USD, e.g. \"5\" or 5.5", param)
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise _bad(f"{param}: an amount in USD, e.g. \"5\" or 5.5", param) from None
    if not amount.is_finite() or abs(amount) > 10**9:
        raise _bad(f"{param}: an amount in USD, e.g. \"5\" or 5.5", param)
    return str(amount)


def _int(request: web.Request, name: str, default: int, most: int | None = None) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise _bad(f"{name}: a whole number", name)
    return min(int(text), most) if most is not None else int(text)


class AdminAPI:
    def __init__(self, store: Store, token: str) -> None:
        self.store = store
        self.token = token.encode() if token else b""

    def guard(self, handler: Handler) -> Handler:
        """The token check, before the handler: a disabled API and a wrong token are both 401."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.token:
                raise GatewayError(401, "admin_disabled", f"The admin API is disabled: set {TOKEN_ENV}.",
                                   code="admin_disabled")
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                raise GatewayError(401, "invalid_admin_token", "A valid admin token is required.",
                                   code="invalid_admin_token")
            return await handler(request)

        return guarded

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            data = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            raise _bad("The body is not JSON.") from None
        if not isinstance(data, dict):
            raise _bad("The body must be a JSON object.")
        return data

    async def _account(self, request: web.Request) -> Account:
        text = request.match_info["id"]
        account = await self.store.account(int(text)) if text.isdigit() else None
        if account is None:
            raise GatewayError(404, "not_found", f"No key with id {text}.", code="not_found")
        return account

    @staticmethod
    def _settings(data: dict[str, Any], base: KeySettings | None = None) -> KeySettings:
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise _bad("settings: a JSON object", "settings")
        try:
            return (base or KeySettings()).merged(settings)
        except SettingsError as exc:
            raise _bad(str(exc), "settings") from None

    async def create(self, request: web.Request) -> web.Response:
        data = await self._body(request)
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _bad("name: a non-empty string", "name")
        balance = _usd(data.get("balance", "0"), "balance")
        account, key = await self.store.create(name, balance, self._settings(data))
        return _json({"data": key_json(account), "key": key}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        limit = max(1, _int(request, "limit", PAGE, 1000))
        after = _int(request, "after", 0)
        accounts = await self.store.accounts(limit + 1, after)
        more = len(accounts) > limit
        accounts = accounts[:limit]
        return _json({"data": [key_json(a) for a in accounts], "next_after": accounts[-1].id if more else None})

    async def show(self, request: web.Request) -> web.Response:
        return _json({"data": key_json(await self._account(request))})

    async def update(self, request: web.Request) -> web.Response:
        account = await self._account(request)
        data = await self._body(request)
        unknown = sorted(set(data) - {"name", "settings"})
        if unknown:
            raise _bad(f"unknown field {unknown[0]!r} (name, settings)", unknown[0])
        name = data.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise _bad("name: a non-empty string", "name")
        settings = self._settings(data, account.settings) if "settings" in data else None
        await self.store.update(account.id, name, settings)
        return await self.show(request)

    async def balance(self, request: web.Request) -> web.Response:
        account = await self._account(request)
        data = await self._body(request)
        if ("add" in data) == ("set" in data):
            raise _bad("Give either add (USD to add, negative to take off) or set (the new balance).")
        if "add" in data:
            await self.store.top_up(account.id, _usd(data["add"], "add"))
        else:
            await self.store.set_balance(account.id, _usd(data["set"], "set"))
        return await self.show(request)

    async def revoke(self, request: web.Request) -> web.Response:
        account = await self._account(request)
        await self.store.revoke(account.id)
        return await self.show(request)

    async def usage(self, request: web.Request) -> web.Response:
        by = request.query.get("by", "model")
        groups = {"model": "model", "key": "account", "day": "day", "tag": "tag"}
        if by not in groups:
            raise _bad("by: model, key, day or tag", "by")
        times = {}
        for name in ("since", "until"):
            if name in request.query:
                try:
                    times[name] = parse_time(request.query[name])
                except SettingsError as exc:
                    raise _bad(f"{name}: {exc}", name) from None
        key = _int(request, "key", 0) or None
        limit = max(1, _int(request, "limit", PAGE, 1000))
        offset = _int(request, "offset", 0)
        rows = await self.store.usage(groups[by], key, times.get("since"), times.get("until"), limit + 1, offset)
        for row in rows:
            row[by] = row.pop(groups[by])
        more = len(rows) > limit
        return _json({"data": rows[:limit], "next_offset": offset + limit if more else None})

    async def openapi(self, request: web.Request) -> web.Response:
        from proxy.admin_openapi import SPEC

        return _json(SPEC)

    def routes(self, add: Callable[[str, str, Handler, str], None]) -> None:
        """Registers every route through `add(method, path, handler, route)`, each guarded."""
        for method, path, handler in (
            ("POST", "/admin/v1/keys", self.create),
            ("GET", "/admin/v1/keys", self.list),
            ("GET", "/admin/v1/keys/{id}", self.show),
            ("PATCH", "/admin/v1/keys/{id}", self.update),
            ("POST", "/admin/v1/keys/{id}/balance", self.balance),
            ("POST", "/admin/v1/keys/{id}/revoke", self.revoke),
            ("DELETE", "/admin/v1/keys/{id}", self.revoke),
            ("GET", "/admin/v1/usage", self.usage),
            ("GET", "/admin/v1/openapi.json", self.openapi),
        ):
            add(method, path, self.guard(handler), "admin")
        add("*", "/admin/{tail:.*}", self.guard(self._unknown), "admin")

    async def _unknown(self, request: web.Request) -> web.Response:
        raise GatewayError(404, "not_found", "No such admin endpoint; see /admin/v1/openapi.json.", code="not_found")
