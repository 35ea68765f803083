"""The upstream client: aiohttp's connection pool, response protocol and parser, with each request
written as bytes.

`ClientSession` makes, for each request, a `ClientRequest`, a `ClientResponse`, a task that writes
the body, and their timers: about 250,000 of the 360,000 instructions a relayed request spent in
the client (`deploy/loadtest/clients.py` measures each way). Here a request is its head, from parts
encoded once per upstream, and its body, written to a pooled connection in one call; the answer is
read by aiohttp's own protocol as `ClientSession` reads it. aiohttp still does everything else: the
pool and its limit, DNS caching, TLS, proxies (CONNECT for https), keep-alive, the read timeout,
flow control (reading pauses while the relay is behind), decompression and payload errors.

Proxies come from the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY, with credentials in the URL
or ~/.netrc), chosen once per upstream, unless `[upstream] proxy_from_env = false`.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Mapping

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL, get_env_proxy_for_url
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.config import FRAMING_HEADERS, UpstreamSettings

USER_AGENT = "turnstile"
_BUFSIZE = 2**16  # what a connection reads ahead of the relay before it pauses (aiohttp's default)
_HEADS = 256  # encoded header sets kept (a provider's are the same on every request)
_NO_ANSWER = frozenset({101, 204, 205, 304})  # statuses that carry no body: no chat answer


class UnsafeHeader(ValueError):
    """A header that would split the request (a line break in it), or frame it."""


class MalformedAnswer(aiohttp.ClientResponseError):
    """An answer that is not HTTP aiohttp can read (a broken status line, headers past its limits),
    or that no chat answer can be (101, 204, 304): the upstream is broken, as an unreachable one is."""

    def __init__(self, message: str) -> None:
        super().__init__(None, (), status=502, message=message)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.message


class _Handler(ResponseHandler):
    """aiohttp's response protocol, and a body that breaks off is an error for its reader: aiohttp
    3.14 closes the connection on a malformed chunk but leaves the body's reader waiting, for ever
    (its read timeout dropped with it)."""

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        body = self._payload
        super().set_exception(exc, exc_cause)
        if body is not None and not body.is_eof() and body.exception() is None:
            body.set_exception(aiohttp.ClientPayloadError(f"The answer broke off: {exc}"))


class Answer:
    """An upstream's answer, as the relay reads it: `status`, `headers`, `content` (aiohttp's
    StreamReader), then `release()` (the connection goes back to the pool, if the answer was read
    to its end) or `close()`."""

    __slots__ = ("status", "headers", "content", "_conn")

    def __init__(self, status: int, headers: CIMultiDictProxy[str], content: aiohttp.StreamReader,
                 conn: Any) -> None:
        self.status, self.headers, self.content, self._conn = status, headers, content, conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _Origin:
    """One upstream URL: the pool's key for it (a request aiohttp's connector reads host, port, TLS
    and proxy from), and its request line and the headers the gateway sets, which a provider's own
    `Host` or `User-Agent` replaces."""

    __slots__ = ("key", "line", "host", "proxy_auth")

    def __init__(self, url: str, loop: asyncio.AbstractEventLoop, from_env: bool) -> None:
        target = URL(url)
        if target.scheme not in ("http", "https") or not target.raw_host:
            raise aiohttp.InvalidUrlClientError(url)
        proxy = auth = None
        if from_env:
            try:
                proxy, auth = get_env_proxy_for_url(target)
            except LookupError:
                pass
        self.key = aiohttp.ClientRequest("POST", target, loop=loop, proxy=proxy, proxy_auth=auth)
        # Through a proxy, plain HTTP names the whole URL (an https upstream is tunnelled: CONNECT).
        path = str(target) if proxy is not None and target.scheme == "http" else target.raw_path_qs
        self.line = f"POST {path} HTTP/1.1\r\n"
        self.host = target.host_port_subcomponent
        self.proxy_auth = auth.encode() if proxy is not None and target.scheme == "http" and auth is not None else ""

    def head(self, headers: Mapping[str, str]) -> bytes:
        """The request's head but for its length."""
        own = {"host": ("Host", self.host), "user-agent": ("User-Agent", USER_AGENT)}
        lines = [self.line]
        for name, value in headers.items():
            if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
                raise UnsafeHeader(f"header {name[:40]!r}: a line break or colon where none may be")
            if name.lower() in FRAMING_HEADERS:
                raise UnsafeHeader(f"header {name[:40]!r}: the gateway's to set")
            own.pop(name.lower(), None)
            lines.append(f"{name}: {value}\r\n")
        lines[1:1] = [f"{name}: {value}\r\n" for name, value in own.values()]
        if self.proxy_auth:
            lines.append(f"Proxy-Authorization: {self.proxy_auth}\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape")


class Upstream:
    """POSTs to upstreams over one pool, for the app's lifetime (open with `start`, end with `close`)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        # `connect` bounds the wait for a free pooled connection too: a full pool gives a 504, not a hang.
        self.timeout = aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout * 3,
                                             sock_connect=settings.connect_timeout)
        self.connector: aiohttp.TCPConnector | None = None
        self._origins: dict[str, _Origin] = {}
        self._heads: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> aiohttp.TCPConnector:
        self._loop = asyncio.get_running_loop()
        self.connector = aiohttp.TCPConnector(limit=self.settings.pool_size, limit_per_host=0, ttl_dns_cache=300,
                                              enable_cleanup_closed=True)
        self.connector._factory = functools.partial(_Handler, loop=self._loop)  # (aiohttp's own, but for `_Handler`)
        return self.connector

    async def close(self) -> None:
        if self.connector is not None:
            await self.connector.close()

    def _head(self, url: str, headers: Mapping[str, str], size: int) -> tuple[_Origin, bytes]:
        origin = self._origins.get(url)
        if origin is None:
            assert self._loop is not None, "the upstream client starts with the app"
            origin = self._origins[url] = _Origin(url, self._loop, self.settings.proxy_from_env)
        key = (url, tuple(headers.items()))
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= _HEADS:  # requests that each bring their own (passed-through headers)
                self._heads.clear()
            head = self._heads[key] = origin.head(headers)
        return origin, b"%bContent-Length: %d\r\n\r\n" % (head, size)

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """The answer's status and headers; its body is read from `content`. aiohttp's errors:
        `aiohttp.ClientError` (unreachable, broken), `asyncio.TimeoutError` (connect, or read);
        `UnsafeHeader` before anything is sent."""
        assert self.connector is not None, "the upstream client starts with the app"
        origin, head = self._head(url, headers, len(body))
        conn = await self.connector.connect(origin.key, traces=[], timeout=self.timeout)
        try:
            protocol = conn.protocol
            assert protocol is not None and protocol.transport is not None
            protocol.set_response_params(read_until_eof=True, auto_decompress=True, read_bufsize=_BUFSIZE,
                                         read_timeout=self.settings.read_timeout)
            protocol.transport.writelines((head, body))
            protocol.start_timeout()
            try:
                message, payload = await protocol.read()
                while 100 <= message.code < 200 and message.code != 101:  # interim answers (100 Continue)
                    message, payload = await protocol.read()
            except HttpProcessingError as exc:  # (ClientSession raises it as a ClientResponseError)
                raise MalformedAnswer(f"an answer that is not HTTP: {exc.message}"[:300]) from None
            if message.code in _NO_ANSWER:
                raise MalformedAnswer(f"answered {message.code} to a POST")
        except BaseException:
            conn.close()  # mid-exchange (the caller left, a timeout): the connection cannot be reused
            raise
        return Answer(message.code, message.headers, payload, conn)
