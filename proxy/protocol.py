"""The HTTP server under the app: aiohttp's, with the gateway's answers and its bounds on connections.

- Bytes that are not parseable HTTP (an unknown method, a broken header line, TLS on the HTTP port)
  are refused by aiohttp's parser before any application code runs: those answers are the gateway's
  error shape too, and stay out of the error log (a client sent them).
- A request's headers must all arrive within `header_timeout` of its first byte (a client trickling
  them would hold the connection forever); an idle keep-alive connection closes after
  `keepalive_timeout`.
- At most `max_connections` client connections per process: past that, a new connection makes room
  by closing the longest-open idle one, so that held-open connections cannot lock out new clients;
  when none is idle, the new connection is refused with a 503.
- Request bodies are not inflated here: the chat handler does it, bounded (`proxy.body`).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.config import Server as ServerSettings
from proxy.errors import GatewayError, http_error

log = structlog.get_logger("turnstile")


def _raw(error: GatewayError) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for where no request object exists."""
    body = error.response().body
    assert isinstance(body, bytes)
    return (f"HTTP/1.1 {error.status} {error.error_type.replace('_', ' ').title()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body


_HEADERS_LATE = _raw(GatewayError(408, "request_timeout", "The request headers did not arrive in time.",
                                  code="request_timeout"))
_FULL = _raw(GatewayError(503, "server_busy", "The gateway has too many open connections; try again shortly.",
                          code="server_busy"))


_CONNECT = _raw(GatewayError(405, "method_not_allowed", "CONNECT is not served: this is an API, not a forward proxy.",
                             code="method_not_allowed", headers={"Allow": "GET, POST"}))


class _Handler(RequestHandler):
    __slots__ = ("_header_deadline",)

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """Open, and between requests (or before the first, or still sending its headers): nothing
        would be lost by closing it."""
        return not self._request_in_progress and not self._messages and not self._force_close

    def data_received(self, data: bytes) -> None:
        awaiting = not self._request_in_progress and not self._messages
        if awaiting and data.startswith(b"CONNECT ") and self.transport is not None:
            # aiohttp would open a tunnel's payload and never answer: this is not a forward proxy.
            self.transport.write(_CONNECT)
            self.force_close()
            return
        super().data_received(data)
        if self._messages or self._request_in_progress:  # the headers are complete
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None
        elif (awaiting and data and self._header_deadline is None and self.transport is not None
              and not (self._close or self._force_close)):
            # (A closing connection, at a graceful stop, drops what comes unread: no deadline for it,
            # or its client would get a 408 ten seconds later instead of the connection's end.)
            manager: _Server = self._manager  # type: ignore[assignment]
            self._header_deadline = self._loop.call_later(manager.header_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.transport is not None and not self._messages and not self._request_in_progress:
            self.transport.write(_HEADERS_LATE)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                        start_time: float | None) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        """What aiohttp answered on its own before any of the app's code ran (no route for an
        asterisk-form target, an `Expect` it does not know) goes out in the gateway's shape too."""
        if isinstance(resp, web.HTTPException):
            resp = http_error(resp).response()
        return super().finish_response(request, resp, start_time)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        self.logger.debug("unparseable request from %s: %s", request.remote, message)
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        reason = (message or "").splitlines()[0][:200] if message else "Malformed HTTP request."
        response = GatewayError(status, "invalid_request", f"Malformed HTTP request: {reason}", code="malformed_http").response()
        response.force_close()
        return response


class _Server(web.Server):
    header_timeout = 10.0
    max_connections = 10_000
    _warned = False

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.max_connections:
            return
        # Oldest first (the dict keeps the order connections came in): an idle one makes room.
        for other in self._connections:
            if other is not handler and isinstance(other, _Handler) and other.idle:
                other.force_close()
                if not self._warned:
                    log.warning("connections_at_limit", max_connections=self.max_connections,
                                action="closing the longest-open idle connections")
                    self._warned = True
                return
        transport.write(_FULL)
        handler.force_close()


class Runner(web.AppRunner):
    """`web.AppRunner` with the gateway's server: its error shape for what aiohttp's parser refuses,
    and the bounds of `settings` (the defaults of `[server]` when not given)."""

    def __init__(self, app: web.Application, settings: ServerSettings | None = None, **kwargs: Any) -> None:
        settings = settings or ServerSettings()
        kwargs.setdefault("keepalive_timeout", settings.keepalive_timeout)
        super().__init__(app, auto_decompress=False, **kwargs)
        self.settings = settings

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:  # leave anything unexpected alone
            server.__class__ = _Server
            server.header_timeout = self.settings.header_timeout  # type: ignore[attr-defined]
            server.max_connections = self.settings.max_connections  # type: ignore[attr-defined]
        return server
