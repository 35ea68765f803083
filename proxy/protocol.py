"""Bytes that are not parseable HTTP (an unknown method, a broken header line, TLS on the HTTP
port) are refused by aiohttp's parser before any application code runs. This runner makes those
answers the gateway's error shape too, and keeps them out of the error log: a client sent them."""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.errors import GatewayError


class _Handler(RequestHandler):
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
    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """`web.AppRunner`, with the gateway's error shape for what aiohttp's parser refuses."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:  # leave anything unexpected alone
            server.__class__ = _Server
        return server
