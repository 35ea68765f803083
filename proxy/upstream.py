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
from typing import Any, Mapping

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamSettings

USER_AGENT = "turnstile"
_BUFSIZE = 2**16  # what a connection reads ahead of the relay before it pauses (aiohttp's default)
_HEADS = 256  # encoded header sets kept (a provider's are the same on every request)


class UnsafeHeader(ValueError):
    """A header that would split the request (a line break in it)."""


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
    and proxy from) and the start of every request's head."""

    __slots__ = ("key", "head")

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
        head = f"POST {path} HTTP/1.1\r\nHost: {target.host_port_subcomponent}\r\nUser-Agent: {USER_AGENT}\r\n"
        if proxy is not None and target.scheme == "http" and auth is not None:
            head += f"Proxy-Authorization: {auth.encode()}\r\n"
        self.head = head.encode()


def _encoded(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if "\r" in name or "\n" in name or ":" in name or "\r" in value or "\n" in value:
            raise UnsafeHeader(f"header {name[:40]!r}: a line break or colon where none may be")
        lines.append(f"{name}: {value}\r\n")
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
        self._heads: dict[tuple[tuple[str, str], ...], bytes] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> aiohttp.TCPConnector:
        self._loop = asyncio.get_running_loop()
        self.connector = aiohttp.TCPConnector(limit=self.settings.pool_size, limit_per_host=0, ttl_dns_cache=300,
                                              enable_cleanup_closed=True)
        return self.connector

    async def close(self) -> None:
        if self.connector is not None:
            await self.connector.close()

    def _head(self, url: str, headers: Mapping[str, str], size: int) -> tuple[_Origin, bytes]:
        origin = self._origins.get(url)
        if origin is None:
            assert self._loop is not None, "the upstream client starts with the app"
            origin = self._origins[url] = _Origin(url, self._loop, self.settings.proxy_from_env)
        key = tuple(headers.items())
        block = self._heads.get(key)
        if block is None:
            if len(self._heads) >= _HEADS:  # requests that each bring their own (passed-through headers)
                self._heads.clear()
            block = self._heads[key] = _encoded(headers)
        return origin, b"%b%bContent-Length: %d\r\n\r\n" % (origin.head, block, size)

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
            message, payload = await protocol.read()
            while 100 <= message.code < 200 and message.code != 101:  # interim answers (100 Continue)
                message, payload = await protocol.read()
        except BaseException:
            conn.close()  # mid-exchange (the caller left, a timeout): the connection cannot be reused
            raise
        return Answer(message.code, message.headers, payload, conn)
