"""The admin API, `/admin/v1/…`: keys made, listed, changed, topped up and revoked, usage queried,
traffic summed up and watched live, by automation and by the console, on the same store as
`turnstile keys`.

Enabled only when TURNSTILE_ADMIN_TOKEN is set; every call must carry it as a bearer token,
compared in constant time, or the console's session cookie (and, to change anything, its CSRF
token in `X-CSRF-Token`). A call without either, with another, or to a disabled API is 401 before
any handler runs. Errors are in the gateway's one shape.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any, Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from aiohttp_sse import sse_response

from proxy.console.sessions import COOKIE, Sessions
from proxy.errors import GatewayError
from proxy.keys import Account, KeySettings, SettingsError, clean_name, iso, parse_time
from proxy.live import Live
from proxy.metrics import Metrics
from proxy.quota import Quota
from proxy.store import Store

log = structlog.get_logger("turnstile.admin")
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


WINDOWS = {"hour": (3600, 60), "day": (86400, 3600)}  # span and bucket, seconds


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    values.sort()
    last = len(values) - 1
    return {name: round(values[min(last, int(q * len(values)))], 2) for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}


def _csv(rows: list[dict[str, Any]], by: str) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out)
    columns = [by, *(["name"] if by == "key" else []), "requests", "prompt_tokens", "completion_tokens",
               "cached_tokens", "cost_usd", "estimated"]
    writer.writerow(columns)
    for row in rows:
        # A cell that a spreadsheet would take for a formula is quoted as text; costs in full, not 1e-05.
        writer.writerow([f"{v:.6f}" if c == "cost_usd" else
                         ("'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v)
                         for c, v in ((c, row[c]) for c in columns)])
    return web.Response(body=out.getvalue().encode(), content_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="turnstile-usage-by-{by}.csv"'})


def _name(value: object) -> str:
    try:
        return clean_name(value)
    except SettingsError as exc:
        raise _bad(str(exc), "name") from None


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
    if not _ID.fullmatch(text):
        raise _bad(f"{name}: a whole number", name)
    return min(int(text), most) if most is not None else int(text)


_ID = re.compile(r"[0-9]{1,15}")  # ASCII digits (not "²"), and below any store's integer limit


class AdminAPI:
    def __init__(self, store: Store, token: str, live: Live | None = None, keylimits: Quota | None = None,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        token = token.strip()  # a secret made from a file often ends with a newline
        self.token = token.encode() if token else b""
        if token and len(token) < 16:
            log.warning("admin_token_short", length=len(token), advice="use 32 random bytes or more: openssl rand -hex 32")
        self.sessions = Sessions(self.token)
        self.live = live
        self.keylimits = keylimits
        self.metrics = metrics

    def guard(self, handler: Handler) -> Handler:
        """The token check, before the handler: a disabled API and a wrong token are both 401; so is
        a change made with the console's cookie but without its CSRF token (a cross-site form)."""
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self.token:
                raise GatewayError(401, "admin_disabled", f"The admin API is disabled: set {TOKEN_ENV}.",
                                   code="admin_disabled")
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                                                  self.token):
                return await handler(request)
            session = self.sessions.read(request.cookies.get(COOKIE, ""))
            if session is not None and (request.method in ("GET", "HEAD") or hmac.compare_digest(
                    request.headers.get("X-CSRF-Token", "").encode(), self.sessions.csrf(session).encode())):
                return await handler(request)
            raise GatewayError(401, "invalid_admin_token", "A valid admin token is required.",
                               code="invalid_admin_token")

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
        account = await self.store.account(int(text)) if _ID.fullmatch(text) else None
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
        unknown = sorted(set(data) - {"name", "balance", "settings"})
        if unknown:
            raise _bad(f"unknown field {unknown[0]!r} (name, balance, settings)", unknown[0])
        name = _name(data.get("name"))
        balance = _usd(data.get("balance", "0"), "balance")
        account, key = await self.store.create(name, balance, self._settings(data))
        return _json({"data": key_json(account), "key": key}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        """A page of keys by id; with `?detail=1`, each with its spend, its budgets' windows and
        what is left of its rate limits (the console's Keys page)."""
        limit = max(1, _int(request, "limit", PAGE, 1000))
        after = _int(request, "after", 0)
        accounts = await self.store.accounts(limit + 1, after)
        more = len(accounts) > limit
        accounts = accounts[:limit]
        rows = [key_json(a) for a in accounts]
        if request.query.get("detail") == "1":
            spent = await self.store.spent_by_key([a.id for a in accounts])
            now = time.time()
            for row, account in zip(rows, accounts):
                row["spent"] = spent.get(account.id, 0) / 1_000_000
                settings = account.settings
                if settings is not None and settings.budgets:
                    starts = [b.start(now) for b in settings.budgets]
                    used = await self.store.window_spent(account.id, starts)
                    row["budgets"] = [{"window": b.window, "limit": b.micros / 1e6, "spent": u / 1e6,
                                       "resets_at": iso(b.resets(now))} for b, u in zip(settings.budgets, used)]
                if settings is not None and self.keylimits is not None:
                    row["limits"] = await self.keylimits.left(account.id, settings)
        return _json({"data": rows, "next_after": accounts[-1].id if more else None})

    async def show(self, request: web.Request) -> web.Response:
        return _json({"data": key_json(await self._account(request))})

    async def update(self, request: web.Request) -> web.Response:
        account = await self._account(request)
        data = await self._body(request)
        unknown = sorted(set(data) - {"name", "settings"})
        if unknown:
            raise _bad(f"unknown field {unknown[0]!r} (name, settings)", unknown[0])
        name = _name(data["name"]) if "name" in data else None
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
        csv_out = request.query.get("format") == "csv"
        limit = max(1, _int(request, "limit", PAGE, 100_000 if csv_out else 1000))
        offset = _int(request, "offset", 0)
        rows = await self.store.usage(groups[by], key, times.get("since"), times.get("until"), limit + 1, offset)
        for row in rows:
            group = row.pop(groups[by])
            row[by] = int(group) if by == "key" and group.isdigit() else group
        more = len(rows) > limit
        rows = rows[:limit]
        if by == "key":  # each key's name beside its id
            names = await self.store.names([r["key"] for r in rows if isinstance(r["key"], int)])
            for row in rows:
                row["name"] = names.get(row["key"]) if isinstance(row["key"], int) else None
        if csv_out:
            return _csv(rows, by)
        return _json({"data": rows, "next_offset": offset + limit if more else None})

    async def stats(self, request: web.Request) -> web.Response:
        """The last hour (per minute) or day (per hour): requests, errors, tokens and spend per
        bucket; latency and time-to-first-byte percentiles; streams in flight in this process."""
        window = request.query.get("window", "hour")
        if window not in WINDOWS:
            raise _bad("window: hour or day", "window")
        span, bucket = WINDOWS[window]
        now = time.time()
        start = now - span
        rows = await self.store.window(start)
        count = int(span // bucket)
        buckets = [{"t": iso(start + i * bucket), "requests": 0, "errors": 0, "tokens": 0, "cost_usd": 0.0}
                   for i in range(count)]
        durations, ttfbs = [], []
        for created, status, tokens, cost, duration, ttfb in rows:
            b = buckets[min(int((created - start) // bucket), count - 1)]
            b["requests"] += 1
            b["errors"] += status >= 400
            b["tokens"] += int(tokens or 0)
            b["cost_usd"] += (cost or 0) / 1_000_000
            durations.append(duration)
            if ttfb is not None:
                ttfbs.append(ttfb)
        total = len(rows)
        errors = sum(b["errors"] for b in buckets)
        last_minute = sum(1 for r in rows if r[0] >= now - 60)
        return _json({"window": window, "bucket_seconds": bucket, "buckets": buckets, "totals": {
            "requests": total, "errors": errors, "error_rate": errors / total if total else 0.0,
            "tokens": sum(b["tokens"] for b in buckets), "cost_usd": round(sum(b["cost_usd"] for b in buckets), 6),
            "requests_per_second": round(last_minute / 60, 3)},
            "latency_ms": _percentiles(durations), "ttfb_ms": _percentiles(ttfbs),
            "streams_in_flight": self.metrics.streams_in_flight if self.metrics is not None else None})

    async def watch(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: each request of this process as it finishes (no prompt, no answer)."""
        if self.live is None:
            raise GatewayError(404, "not_found", "Live requests are not available.", code="not_found")
        queue = self.live.watch()
        try:
            async with sse_response(request, headers={"Cache-Control": "no-store"}) as stream:
                while stream.is_connected():
                    try:
                        event = await asyncio.wait_for(queue.get(), 15)
                    except asyncio.TimeoutError:
                        await stream.send("", event="ping")
                        continue
                    if event is None:  # the gateway is stopping
                        break
                    await stream.send(orjson.dumps(event).decode(), event="request")
        finally:
            self.live.leave(queue)
        return stream

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
            ("GET", "/admin/v1/stats", self.stats),
            ("GET", "/admin/v1/live", self.watch),
            ("GET", "/admin/v1/openapi.json", self.openapi),
        ):
            add(method, path, self.guard(handler), "admin")
        add("*", "/admin/{tail:.*}", self.guard(self._unknown), "admin")

    async def _unknown(self, request: web.Request) -> web.Response:
        raise GatewayError(404, "not_found", "No such admin endpoint; see /admin/v1/openapi.json.", code="not_found")
