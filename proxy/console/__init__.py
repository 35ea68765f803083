"""The operator's console, `/admin/`: pages in the browser over the admin API, nothing else.

Served only while the admin API is enabled (404 otherwise). Signing in with the admin token sets a
session cookie (HttpOnly, SameSite=Strict, Secure over TLS, eight hours); every change the pages
make carries the session's CSRF token. Every page is static: its script reads the admin API and
renders what it gets as text, under a Content-Security-Policy that allows this origin's files and
nothing else (no inline script, no other host).
"""

from __future__ import annotations

import hmac
from importlib import resources
from typing import Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.clientip import ClientIP
from proxy.console.sessions import COOKIE, LIFETIME, Sessions
from proxy.errors import GatewayError

STATIC = resources.files("proxy.console") / "static"
FILES = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html", "login.html": "text/html"}
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class Console:
    def __init__(self, token: bytes, sessions: Sessions, client_ip: ClientIP | None = None) -> None:
        self.token = token
        self.sessions = sessions
        self.client_ip = client_ip  # whose X-Forwarded-Proto to believe (a TLS-terminating proxy)
        # Read once at start-up: the files ship inside the package and do not change while it runs.
        self.files = {name: (STATIC / name).read_bytes() for name in FILES}

    def _page(self, name: str, status: int = 200) -> web.Response:
        return web.Response(status=status, body=self.files[name], content_type=FILES[name], headers=HEADERS)

    def _enabled(self) -> None:
        if not self.token:
            raise GatewayError(404, "not_found", "Not found.", code="not_found")

    async def index(self, request: web.Request) -> web.Response:
        self._enabled()
        signed_in = self.sessions.read(request.cookies.get(COOKIE, "")) is not None
        return self._page("index.html" if signed_in else "login.html")

    async def static(self, request: web.Request) -> web.Response:
        self._enabled()
        name = request.match_info["name"]
        if name not in ("app.js", "app.css"):
            raise GatewayError(404, "not_found", "Not found.", code="not_found")
        return self._page(name)

    async def login(self, request: web.Request) -> web.Response:
        self._enabled()
        try:
            form = await request.post()
        except (ValueError, LookupError, HttpProcessingError):  # a body that is no form: a failed sign-in
            form = {}
        given = form.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(given.strip().encode(), self.token):
            return web.Response(status=303, headers={**HEADERS, "Location": "/admin/#signin-failed"})
        response = web.Response(status=303, headers={**HEADERS, "Location": "/admin/"})
        response.set_cookie(COOKIE, self.sessions.new(), max_age=LIFETIME, path="/admin", httponly=True,
                            samesite="Strict", secure=self._tls(request))
        return response

    def _tls(self, request: web.Request) -> bool:
        """Over TLS: the gateway's own, or a trusted proxy's that says so."""
        if request.secure:
            return True
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        return (self.client_ip is not None and peer is not None and self.client_ip.trusted(peer[0])
                and request.headers.get("X-Forwarded-Proto", "").lower() == "https")

    async def session(self, request: web.Request) -> web.Response:
        self._enabled()
        session = self.sessions.read(request.cookies.get(COOKIE, ""))
        if session is None:
            raise GatewayError(401, "invalid_admin_token", "Sign in again.", code="invalid_admin_token")
        body = {"csrf": self.sessions.csrf(session), "expires_at": self.sessions.expires(session)}
        return web.Response(body=orjson.dumps(body), content_type="application/json", headers=HEADERS)

    async def logout(self, request: web.Request) -> web.Response:
        self._enabled()
        session = self.sessions.read(request.cookies.get(COOKIE, ""))
        if session is None or not hmac.compare_digest(request.headers.get("X-CSRF-Token", "").encode(),
                                                      self.sessions.csrf(session).encode()):
            raise GatewayError(401, "invalid_admin_token", "Sign in again.", code="invalid_admin_token")
        response = web.Response(status=204, headers=HEADERS)
        response.del_cookie(COOKIE, path="/admin")
        return response

    def routes(self, add: Callable[[str, str, Callable[..., object], str], None]) -> None:
        add("GET", "/admin", self.redirect, "console")
        add("GET", "/admin/", self.index, "console")
        add("GET", "/admin/static/{name}", self.static, "console")
        add("POST", "/admin/login", self.login, "console")
        add("GET", "/admin/session", self.session, "console")
        add("POST", "/admin/logout", self.logout, "console")

    async def redirect(self, request: web.Request) -> web.Response:
        self._enabled()
        return web.Response(status=301, headers={"Location": "/admin/"})
