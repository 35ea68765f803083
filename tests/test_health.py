"""`/readyz` follows the rate-limit storage: 503 with the reason while Redis is down, 200 when it is back."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess

import pytest


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis(port: int) -> subprocess.Popen:
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _status(client) -> tuple[int, dict]:
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


async def test_readyz_follows_redis(gateway, redis_url):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = _port()
    server = _redis(port)
    try:
        client = await gateway(limits={"storage": f"redis://127.0.0.1:{port}"})
        for _ in range(50):
            status, body = await _status(client)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert (status, body) == (200, {"status": "ready"})
        server.terminate()
        server.wait(10)
        status, body = await _status(client)
        assert status == 503 and body["reasons"] == ["rate-limit storage is not reachable"]
        server = _redis(port)
        for _ in range(100):
            status, body = await _status(client)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200
        assert (await client.get("/healthz")).status == 200
    finally:
        server.terminate()
        server.wait(10)


async def test_readyz_with_memory_storage(gateway):
    client = await gateway()
    assert await _status(client) == (200, {"status": "ready"})
