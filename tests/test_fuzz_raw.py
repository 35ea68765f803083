"""Raw sockets against the real server: framing tricks, trickled and half-sent requests, compressed
bodies, idle connections by the thousand. No answer is a 5xx, nothing lands in the log as an error or
a traceback, the gateway goes on serving, and its event loop is never held up for long.

The gateway runs in a thread with its own event loop, under the server `turnstile serve` uses, with
short timeouts; a probe in that loop records its longest stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import json
import logging
import resource
import socket
import sys
import threading
import time
import zlib
from typing import Any, Iterator

import pytest
import structlog
from aiohttp import web
from structlog.testing import LogCapture

from proxy.app import create_app
from proxy.config import Server
from proxy.protocol import Runner
from proxy.server import FULL_COLLECTION_AFTER
from tests.conftest import make_config
from tests.fakes import Upstream

FREE = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}]}
STALL_BOUND = 0.2  # seconds; a 1 GiB gzip body alone held the loop for 0.6-6.5 s before
# Accepting 3,000 connections (about 50-70 ms here, paced) moves with the machine's load: a looser bound.
CONNECTIONS_STALL_BOUND = 0.5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """One gateway in a thread; `worst` is the longest its event loop went without a turn."""

    def __init__(self, db: str, settings: Server) -> None:
        self.port, self.up_port = _port(), _port()
        self.db, self.settings = db, settings
        self.loop = asyncio.new_event_loop()
        self.worst = 0.0
        self.stalls: dict[str, float] = {}
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        env = {"OPENROUTER_API_KEY": "sk-or-raw", "OPENROUTER_BASE_URL": f"http://127.0.0.1:{self.up_port}"}
        cfg = make_config(keys={"db": self.db}, server={"max_body_bytes": 1024 * 1024},
                          pipeline=[{"use": "auth"}, {"use": "freegate"},
                                    {"use": "ratelimit", "limit": "1000000/hour", "daily_limit": ""}])
        for runner, port in ((web.AppRunner(Upstream().app()), self.up_port),
                             (Runner(create_app(cfg, env), self.settings, handler_cancellation=True), self.port)):
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
            self.runners.append(runner)
        self.probe = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            self.worst = max(self.worst, now - last - 0.005)
            last = now

    def open_connections(self) -> int:
        return sum(len(r.server.connections) for r in self.runners[1:] if r.server is not None)

    def stop(self) -> None:
        async def stop() -> None:
            self.probe.cancel()
            for runner in reversed(self.runners):
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def logged() -> Iterator[tuple[LogCapture, Errors]]:
    capture, errors = LogCapture(), Errors()
    structlog.configure(processors=[capture])
    logging.getLogger().addHandler(errors)
    yield capture, errors
    logging.getLogger().removeHandler(errors)
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def served(tmp_path_factory: Any, logged: Any) -> Iterator[Served]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # both ends of 3,000 connections live here
    gateway = Served(str(tmp_path_factory.mktemp("raw") / "keys.db"),
                     Server(header_timeout=0.5, keepalive_timeout=5.0, max_connections=3500))
    # The collector as `turnstile serve` sets it up: else a full collection of everything the test
    # session holds (the gateway shares this process) would count as the gateway's stall.
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*threshold[:2], FULL_COLLECTION_AFTER)
    yield gateway
    gc.set_threshold(*threshold)
    gc.unfreeze()
    gateway.stop()
    capture, errors = logged
    bad = [e for e in capture.entries if e.get("log_level") in ("error", "critical") or "exc_info" in e]
    assert not bad, bad[:3]
    assert not [r for r in errors.records if r.exc_info or r.levelno >= logging.ERROR], errors.records[:3]
    print("\nlongest event-loop stalls:", ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in
                                                 sorted(gateway.stalls.items(), key=lambda kv: -kv[1])[:5]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def exchange(port: int, raw: bytes, wait: float = 10.0) -> bytes:
    """Sends `raw`, then reads until the server closes, or `wait` passes, or a whole answer has come
    and nothing more for a moment (the connection is kept alive)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        chunks: list[bytes] = []
        while True:
            settled = chunks and _whole(b"".join(chunks))
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.3 if settled else wait)
            except (asyncio.TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def _whole(reply: bytes) -> bool:
    """Whether `reply` ends with a whole answer (one with a Content-Length: all the gateway's are)."""
    got = answers(reply)
    if not got:
        return False
    head = reply.rpartition(b"HTTP/1.")[2].partition(b"\r\n\r\n")[0].lower()
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"content-length:")), None)
    return length is not None and len(got[-1][1]) == length


def answers(reply: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP answer in `reply`."""
    out = []
    while reply.startswith(b"HTTP/1."):
        head, _, rest = reply.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, reply = rest[:n], rest[n:]
        else:
            body, reply = rest, b""
        out.append((status, body))
    return out


def in_our_shape(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        doc = json.loads(body)
        assert isinstance(doc["error"]["message"], str) and doc["error_type"], body[:300]


def post(body: bytes, *headers: str, path: str = "/v1/chat/completions") -> bytes:
    head = "".join(h + "\r\n" for h in headers)
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head += f"Content-Length: {len(body)}\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n{head}\r\n".encode() + body


def bomb(mib: int) -> bytes:
    """gzip of `mib` MiB of spaces: about a thousandth of that on the wire."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * (1 << 20)
    return b"".join([*(c.compress(block) for _ in range(mib)), c.flush()])


OK = json.dumps(FREE).encode()
FRAMING = {
    "content-length and chunked": post(b"0\r\n\r\n", "Content-Length: 5", "Transfer-Encoding: chunked"),
    "two content-lengths": post(OK, f"Content-Length: {len(OK)}", "Content-Length: 3"),
    "negative content-length": post(b"", "Content-Length: -1"),
    "chunk size overflow": post(b"ffffffffffffffffffff\r\n", "Transfer-Encoding: chunked"),
    "chunk extension flood": post(b"1;" + b"a" * 100_000 + b"\r\nx\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
    "chunked then garbage": post(b"2\r\n{}\r\nzz\r\n", "Transfer-Encoding: chunked"),
    "transfer-encoding gzip, chunked": post(b"0\r\n\r\n", "Transfer-Encoding: gzip, chunked"),
    "bare LF": b"POST /v1/chat/completions HTTP/1.1\nHost: gw\nContent-Length: 2\n\n{}",
    "header without colon": b"GET /healthz HTTP/1.1\r\nHost gw\r\n\r\n",
    "obs-fold": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n b\r\n\r\n",
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: g\x00w\r\n\r\n",
    "100 KB header": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "TLS hello": bytes.fromhex("160301006e0100006a0303") + b"\x00" * 100,
    "CONNECT": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    "unknown Expect": post(OK, "Expect: something-else"),
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n",
    "absolute-form": b"GET http://elsewhere/healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    "pipelined": (b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n" * 3) + post(OK, "Connection: close"),
    "body over the limit": post(b"x" * 2_000_000),
    "gzip bomb, 1 GiB": post(bomb(1024), "Content-Encoding: gzip"),
    "gzip bomb, chunked": b"",  # filled below: the same bomb in chunks
    "invalid gzip": post(b"abcd", "Content-Encoding: gzip"),
    "gzip cut short": post(gzip.compress(OK)[:-8], "Content-Encoding: gzip"),
    "deflate, raw": post(zlib.compress(OK)[2:-4], "Content-Encoding: deflate"),
    "brotli": post(OK, "Content-Encoding: br"),
    "gzip twice": post(gzip.compress(gzip.compress(OK)), "Content-Encoding: gzip, gzip"),
}
_BOMB = bomb(256)
FRAMING["gzip bomb, chunked"] = post(
    b"".join(b"%x\r\n%s\r\n" % (len(_BOMB[i:i + 65536]), _BOMB[i:i + 65536]) for i in range(0, len(_BOMB), 65536))
    + b"0\r\n\r\n", "Content-Encoding: gzip", "Transfer-Encoding: chunked")


@pytest.fixture(autouse=True)
def stall(request, served):
    """The longest stall of the gateway's event loop during each test, kept by the test's name."""
    served.worst = 0.0
    yield
    served.stalls[request.node.name] = served.worst


@pytest.mark.parametrize("name", list(FRAMING))
async def test_framing(served, name):
    reply = await exchange(served.port, FRAMING[name], wait=5)
    got = answers(reply)
    for status, body in got:
        in_our_shape(status, body)
    if name in ("gzip bomb, 1 GiB", "gzip bomb, chunked", "body over the limit"):
        assert got[-1][0] == 413
    if name in ("invalid gzip", "gzip cut short"):
        assert got[-1][0] == 400 and b"not valid gzip" in got[-1][1]
    if name in ("brotli", "gzip twice"):
        assert got[-1][0] == 415
    if name == "deflate, raw":
        assert got[-1][0] == 200
    if name == "pipelined":
        assert [s for s, _ in got] == [200, 200, 200, 200]
    if name in ("CONNECT", "unknown Expect", "asterisk-form"):
        assert got[-1][0] in (404, 405, 417) and got[-1][1].startswith(b"{")


async def test_a_gzip_body_is_inflated(served):
    reply = await exchange(served.port, post(gzip.compress(OK), "Content-Encoding: gzip", "Connection: close"))
    assert [s for s, _ in answers(reply)] == [200]


@pytest.mark.parametrize("start", [b"GET /hea", b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Le"])
async def test_a_half_sent_request_is_closed_with_408(served, start):
    reply = await exchange(served.port, start, wait=10)
    assert [s for s, _ in answers(reply)] == [408]


async def test_headers_trickled_a_byte_at_a_time_are_cut_off(served):
    """Before: headers at one byte a second held the connection for as long as the client liked."""
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    request = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    received: list[bytes] = []

    async def read() -> None:  # as it comes: once a write fails, the reader only raises
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.append(chunk)

    reading = asyncio.ensure_future(read())
    sent = 0
    try:
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            await asyncio.sleep(0.05)
    except ConnectionError:
        pass
    await asyncio.wait_for(reading, 10)
    writer.close()
    assert sent < len(request)  # cut off before the headers could end
    assert [s for s, _ in answers(b"".join(received))] == [408]


async def test_an_idle_keep_alive_connection_is_closed(served):
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), 10)
    assert first.startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server, after keepalive_timeout
    writer.close()


async def healthz(port: int) -> int:
    reply = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    return answers(reply)[0][0]


async def chat(port: int) -> int:
    reply = await exchange(port, post(OK, "Connection: close"))
    return answers(reply)[0][0]


async def hold(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    held = []
    for i in range(0, n, 200):
        held += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(min(200, n - i))))
    return held


# Held by another process: opened from this one, they would hold the GIL the gateway's thread needs.
# A hundred at a time: 3,000 that arrive in the same instant are accepted in one turn of asyncio's
# loop, ~170 ms here, whatever the gateway does with them.
HOLDER = """import socket, sys, time
held = []
for _ in range({n} // 100):
    held += [socket.create_connection(("127.0.0.1", {port})) for _ in range(100)]
    time.sleep(0.01)
print("held", flush=True)
sys.stdin.read()
"""


async def test_3000_idle_connections_do_not_lock_anyone_out(served):
    """Before: 1,100 idle connections under a file limit of 1,024 made every other client fail."""
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", HOLDER.format(port=served.port, n=3000),
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"held\n"
        await asyncio.sleep(0.2)
        assert served.open_connections() >= 3000
        assert await healthz(served.port) == 200
        assert await chat(served.port) == 200
    finally:
        holder.stdin.close()
        await holder.wait()


async def test_past_max_connections_the_longest_idle_makes_room(tmp_path, logged):
    """(Its own gateway, in a second thread: the module's gateway shares the GIL with it meanwhile,
    so the stall recorded for this test is not counted.)"""
    gateway = Served(str(tmp_path / "keys.db"), Server(header_timeout=5, keepalive_timeout=60, max_connections=100))
    try:
        held = await hold(gateway.port, 300)
        await asyncio.sleep(0.2)
        assert gateway.open_connections() <= 100
        assert await healthz(gateway.port) == 200
        assert await chat(gateway.port) == 200
        closed = 0
        for reader, writer in held:
            try:
                closed += await asyncio.wait_for(reader.read(), 0.05) == b""
            except asyncio.TimeoutError:
                pass
            writer.close()
        assert closed >= 200  # the oldest ones went first
        assert any(e["event"] == "connections_at_limit" for e in logged[0].entries)
    finally:
        gateway.stop()


async def test_still_serving_with_a_short_event_loop_stall(served):
    """Last in the module: everything above has run against this gateway."""
    assert await chat(served.port) == 200
    stalls = {name: s for name, s in served.stalls.items() if not name.startswith("test_past_max_connections")}
    for name, seconds in stalls.items():
        bound = CONNECTIONS_STALL_BOUND if name.startswith("test_3000_idle") else STALL_BOUND
        assert seconds < bound, f"the event loop stalled for {seconds * 1000:.0f} ms in {name}"
