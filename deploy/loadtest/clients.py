"""CPU instructions per upstream request, counted by callgrind, for HTTP client paths a gateway could use.

Each variant posts the chat body to the mock provider and reads the whole answer (the streamed one
piece by piece as it arrives, as a relay does), 8 requests at a time, on uvloop, over pooled
keep-alive connections. Only the child under callgrind is counted, and only after 200 warm-up requests.

    python deploy/loadtest/clients.py                                   # chat, 1,000 requests, 2-3 min
    python deploy/loadtest/clients.py --scenario stream --requests 500
    python deploy/loadtest/clients.py --variants aiohttp,httpx --check  # natively, uncounted: do they work

Turnstile's own client, `proxy/upstream.py`, is the `aiohttp-connector` path made whole (timeouts,
TLS, proxies, interim answers, checked headers).

Needs valgrind. httptools, httpx, httpx2, aiosonic and curl_cffi are optional: a variant whose
package is missing is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from instructions import BODIES  # noqa: E402
from run import free_port, wait_port  # noqa: E402

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer mock"}
VARIANTS = {}


def variant(fn):
    VARIANTS[fn.__name__.replace("_", "-")] = contextlib.asynccontextmanager(fn)
    return fn


async def _drain(pieces) -> int:
    n = 0
    async for piece in pieces:
        n += len(piece)
    return n


def _head(target) -> bytes:
    """The request's head but its Content-Length, built once per upstream."""
    return "".join([f"POST {target.raw_path_qs} HTTP/1.1\r\nHost: {target.host_port_subcomponent}\r\n",
                    *(f"{k}: {v}\r\n" for k, v in HEADERS.items()), "User-Agent: turnstile\r\n"]).encode()


@variant
async def aiohttp(url: str, body: bytes, stream: bool):
    """ClientSession as the gateway set it up before proxy/upstream.py."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True),
        timeout=aiohttp.ClientTimeout(total=None, connect=30, sock_connect=10, sock_read=300),
        auto_decompress=True, headers={"User-Agent": "turnstile"}, cookie_jar=aiohttp.DummyCookieJar())
    async with session:
        async def one() -> int:
            async with session.post(url, data=body, headers=HEADERS, allow_redirects=False) as resp:
                assert resp.status == 200, resp.status
                return await _drain(resp.content.iter_any()) if stream else len(await resp.read())

        yield one


@variant
async def aiohttp_lean(url: str, body: bytes, stream: bool):
    """ClientSession with what its public API lets one skip per request."""
    import aiohttp
    from multidict import CIMultiDict
    from yarl import URL

    headers, target = CIMultiDict(HEADERS), URL(url)  # neither is converted again per request
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True),
        # No session timeout, hence no timer per request; a relay can still pass timeout= per request.
        timeout=aiohttp.ClientTimeout(), auto_decompress=False, headers={"User-Agent": "turnstile"},
        cookie_jar=aiohttp.DummyCookieJar())
    async with session:
        async def one() -> int:
            # Awaited, not `async with`, and read from resp.content, not resp.read(): that skips two
            # context managers' coroutines, wait_for_close() and the body cache (3-4% here).
            resp = await session.post(target, data=body, headers=headers, allow_redirects=False)
            try:
                assert resp.status == 200, resp.status
                return await _drain(resp.content.iter_any()) if stream else len(await resp.content.read())
            finally:
                resp.release()

        yield one


@variant
async def aiohttp_connector(url: str, body: bytes, stream: bool):
    """aiohttp's pool, protocol and C parser, without ClientRequest, ClientResponse and the writer task."""
    import aiohttp
    from yarl import URL

    target = URL(url)
    head, no_timeout = _head(target), aiohttp.ClientTimeout()
    # The connector reads only a request's key, host, port, ssl and proxy: one built once serves all.
    template = aiohttp.ClientRequest("POST", target, loop=asyncio.get_running_loop())
    async with aiohttp.TCPConnector(limit=100, ttl_dns_cache=300) as connector:
        async def one() -> int:
            conn = await connector.connect(template, traces=[], timeout=no_timeout)
            proto = conn.protocol
            try:
                # A parser per request, as ClientSession makes.
                proto.set_response_params(read_until_eof=True, auto_decompress=False)
                proto.transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
                message, payload = await proto.read()
                assert message.code == 200, message.code
                n = await _drain(payload.iter_any()) if stream else len(await payload.read())
            except BaseException:
                conn.close()  # mid-answer: the connection cannot be reused
                raise
            conn.release()  # back to the pool, unless the answer said to close
            return n

        yield one


class _Http1(asyncio.Protocol):
    """One keep-alive connection: httptools parses, the body's pieces wait in a deque for the reader."""

    def __init__(self) -> None:
        import httptools

        self.parser, self.transport, self.waiter = httptools.HttpResponseParser(self), None, None
        self.pieces: collections.deque[bytes] = collections.deque()
        self.headers_done = self.done = self.keep_alive = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self._wake()

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self._wake()

    def on_body(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self._wake()

    def on_message_complete(self) -> None:
        self.done, self.keep_alive = True, self.parser.should_keep_alive()  # valid only until we return
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        if self.transport is None:  # closed before the answer's end: never a silently short body
            raise ConnectionResetError("the upstream closed the connection mid-answer")
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    async def body(self):
        while True:
            while self.pieces:
                yield self.pieces.popleft()
            if self.done:
                return
            await self.wait()


@variant
async def asyncio_httptools(url: str, body: bytes, stream: bool):
    """The floor: our own pool of asyncio protocols and httptools's parser; no timeouts."""
    from yarl import URL

    target, loop, idle = URL(url), asyncio.get_running_loop(), []
    head = _head(target)

    async def one() -> int:
        conn = idle.pop() if idle else None
        if conn is None or conn.transport is None:  # none idle, or the upstream closed it meanwhile
            conn = (await loop.create_connection(_Http1, target.host, target.port))[1]
        conn.headers_done = conn.done = False
        conn.transport.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body))
        while not conn.headers_done:
            await conn.wait()
        assert conn.parser.get_status_code() == 200, conn.parser.get_status_code()
        n = await _drain(conn.body()) if stream else len(b"".join([p async for p in conn.body()]))
        if conn.transport is not None and conn.keep_alive:
            idle.append(conn)
        return n

    try:
        yield one
    finally:
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()


def _httpx(module: str):
    async def run(url: str, body: bytes, stream: bool):
        httpx = __import__(module)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30, read=300),
                                     headers={"User-Agent": "turnstile"}) as client:
            async def one() -> int:
                async with client.stream("POST", url, content=body, headers=HEADERS) as resp:
                    assert resp.status_code == 200, resp.status_code
                    return await _drain(resp.aiter_raw()) if stream else len(await resp.aread())

            yield one

    run.__name__ = module
    return run


variant(_httpx("httpx"))
variant(_httpx("httpx2"))  # httpx's successor, which the openai and anthropic SDKs use


@variant
async def aiosonic(url: str, body: bytes, stream: bool):
    import aiosonic

    timeouts = aiosonic.Timeouts(sock_connect=30, sock_read=300, request_timeout=None)
    async with aiosonic.HTTPClient(aiosonic.TCPConnector(timeouts=timeouts)) as client:
        async def one() -> int:
            async with client.stream("POST", url, data=body, headers={**HEADERS, "User-Agent": "turnstile"}) as resp:
                assert resp.status_code == 200, resp.status_code
                return await _drain(resp.read_chunks()) if stream else len(await resp.content())

        yield one


@variant
async def curl_cffi(url: str, body: bytes, stream: bool):
    """libcurl's multi interface, driven by the event loop."""
    from curl_cffi.requests import AsyncSession

    async with AsyncSession(timeout=None, headers={"User-Agent": "turnstile"}) as session:
        async def one() -> int:
            resp = await session.post(url, data=body, headers=HEADERS, stream=stream)
            assert resp.status_code == 200, resp.status_code
            if not stream:
                return len(resp.content)
            try:
                return await _drain(resp.aiter_content())
            finally:
                await resp.aclose()

        yield one


async def child(args: argparse.Namespace) -> None:
    """In the counted process: warm up (the 8 pooled connections open then), count, close."""
    from mock_upstream import openai_bodies

    def counted(on: bool) -> None:
        if not args.check:
            subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                           check=True, capture_output=True)

    full, events = openai_bodies(50)
    stream = args.scenario == "stream"
    expected = len(b"".join(events)) if stream else len(full)  # a wrong de-chunking would show here
    async with VARIANTS[args.child](f"http://127.0.0.1:{args.mock}/v1/chat/completions",
                                    BODIES[args.scenario].encode(), stream) as one:
        async def run(n: int) -> None:
            todo = iter(range(n))

            async def worker() -> None:
                for _ in todo:
                    got = await one()
                    assert got == expected, (got, expected)

            await asyncio.gather(*(worker() for _ in range(8)))

        await run(200)
        counted(True)
        await run(args.requests)
        counted(False)


def measure(name: str, args: argparse.Namespace, mock: int, out: Path) -> str | float:
    cmd = [sys.executable, __file__, "--child", name, "--scenario", args.scenario, "--requests", str(args.requests),
           "--mock", str(mock)] + (["--check"] if args.check else [])
    if not args.check:
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *cmd]
    done = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        missing = re.search(r"ModuleNotFoundError: (.*)", done.stderr)
        return f"skipped: {missing.group(1)}" if missing else "failed:\n" + done.stderr[-3000:]
    return "ok" if args.check else int(re.findall(r"^totals: (\d+)", out.read_text(), re.MULTILINE)[-1]) / args.requests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=["chat", "stream"], default="chat")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--check", action="store_true", help="run natively, uncounted: does each variant work")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--mock", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import uvloop

        uvloop.install()
        asyncio.run(child(args))
        return 0
    names = args.variants.split(",")
    if unknown := set(names) - set(VARIANTS):
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    mock = free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), "--port", str(mock), "--chunks", "50"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, str | float] = {}
    try:
        wait_port(mock)
        with tempfile.TemporaryDirectory(prefix="turnstile-clients-") as tmp:
            for name in names:
                results[name] = measure(name, args, mock, Path(tmp) / f"callgrind.{name}.out")
                print(f"  {name}: {results[name] if isinstance(results[name], str) else f'{results[name]:,.0f}'}",
                      file=sys.stderr)
    finally:
        upstream.terminate()
        upstream.wait()
    if args.check:
        return 0 if all(not str(r).startswith("failed") for r in results.values()) else 1
    base = results.get("aiohttp")
    print(f"{args.scenario}, {args.requests} requests, 8 at a time: instructions per request")
    for name, value in results.items():
        if isinstance(value, str):
            print(f"  {name:<18} {value.splitlines()[0]}")
        elif isinstance(base, float) and name != "aiohttp":
            ratio = value / base
            saved = f", {1 - ratio:.1%} saved" if ratio < 1 else ""
            print(f"  {name:<18} {value:>12,.0f}   {ratio:5.2f}x aiohttp{saved}")
        else:
            print(f"  {name:<18} {value:>12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
