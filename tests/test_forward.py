"""Streaming mechanics: backpressure toward a client that stops reading, and disconnect propagation."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc

import orjson


async def open_raw(client, body: dict, rcvbuf: int = 16 * 1024, headers: dict[str, str] | None = None):
    """A bare socket client, so the test decides exactly when (and whether) to read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (client.host, client.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    payload = orjson.dumps(body)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s"
        b"Content-Length: %d\r\n\r\n%s" % (extra, len(payload), payload)
    )
    await writer.drain()
    return reader, writer


STREAM = {"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def tcp_queues() -> dict[tuple[int, int], tuple[int, int]]:
    """(local port, remote port) -> (bytes unacknowledged in the send queue, bytes unread in the receive
    queue) for every IPv4 TCP socket of this machine, from /proc/net/tcp."""
    queues = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            cols = line.split()
            local, remote, (tx, rx) = cols[1], cols[2], cols[4].split(":")
            queues[(int(local.split(":")[1], 16), int(remote.split(":")[1], 16))] = (int(tx, 16), int(rx, 16))
    return queues


def held_in_kernel(port: int) -> int:
    """Bytes sitting in the kernel on every connection to or from `port`."""
    return sum(tx + rx for (lp, rp), (tx, rx) in tcp_queues().items() if port in (lp, rp))


async def wait_until_still(read_count, settle: float = 0.5, limit: float = 10.0) -> int:
    """Wait until the counter stops moving, then return it."""
    last, deadline = -1, time.monotonic() + limit
    while time.monotonic() < deadline:
        now = read_count()
        if now == last:
            return now
        last = now
        await asyncio.sleep(settle)
    return read_count()


async def test_client_that_stops_reading_stalls_the_upstream(gateway, upstream):
    upstream.mode = "huge"
    upstream.sndbuf = 32 * 1024
    # No store query in the measured second: any socket read of asyncio's allocates 256 KiB for a moment.
    client = await gateway(keys={"refresh_interval": 3600.0}, ledger={"flush_interval": 3600.0})
    tracemalloc.start()
    reader, writer = await open_raw(client, STREAM)
    try:
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        stalled = await wait_until_still(lambda: upstream.bytes_sent)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        await asyncio.sleep(1.0)
        still = upstream.bytes_sent
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        in_kernel = held_in_kernel(upstream.server.port) + held_in_kernel(client.port)
        writer.close()
    # What the gateway process itself holds: sent by the upstream, not in any socket buffer, not read
    # by the client (which read only the status line, and keeps at most its 32 KiB stream buffer).
    held = stalled - in_kernel
    print(f"upstream sent {stalled} B of 50 MiB; kernel buffers {in_kernel} B; gateway holds {held} B")
    assert still == stalled  # nothing more is read while the client reads nothing
    assert stalled < 50 * 1024 * 1024 // 4
    assert held < 1024 * 1024
    assert peak - base < 256 * 1024  # memory stays flat while stalled


async def test_client_disconnect_mid_stream_closes_the_upstream(gateway, upstream):
    upstream.mode = "slow"
    client = await gateway()
    reader, writer = await open_raw(client, STREAM)
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    while upstream.bytes_sent < 3:
        await asyncio.sleep(0.02)
    writer.transport.abort()
    left = time.monotonic()
    while not upstream.closed_at and time.monotonic() - left < 5:
        await asyncio.sleep(0.01)
    assert upstream.closed_at, "the upstream never saw the connection drop"
    assert upstream.closed_at - left < 1.0
    sent = upstream.bytes_sent
    await asyncio.sleep(0.3)
    assert upstream.bytes_sent == sent
