"""The real `turnstile serve` process, for tests: start it, wait for it, read how it ended."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

import aiohttp
from aiohttp import web


async def start(config, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), env={"PATH": "/usr/bin:/bin", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )


async def wait_up(session: aiohttp.ClientSession, url: str, **kwargs: object) -> None:
    for _ in range(100):
        try:
            async with session.get(url + "/healthz", **kwargs) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not come up")


def free_port() -> int:
    """A free port below the ephemeral range: one the kernel hands out for outgoing connections could
    be taken by one between this check and the gateway's bind."""
    low, _ = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def workers_config(tmp_path, port: int, redis_url: str, extra: str = "", workers: int = 2) -> object:
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = {workers}\n{extra}[limits]\nstorage = "{redis_url}"\n'
                      f'[keys]\ndb = "{tmp_path / "keys.db"}"\n[logging]\nformat = "json"\n')
    return config


async def hanging_catalog(aiohttp_server) -> tuple[asyncio.Event, str]:
    """A provider whose model list never comes (a catalog sync waits on it): the event is set when
    it is asked; and its URL."""
    asked = asyncio.Event()

    async def models(request: web.Request) -> web.Response:
        asked.set()
        await asyncio.sleep(120)
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/models", models)
    return asked, str((await aiohttp_server(app)).make_url(""))


async def exit_of(proc: asyncio.subprocess.Process, seconds: float = 30) -> tuple[int, str]:
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), seconds)
    except asyncio.TimeoutError:
        for pid in os.popen(f"pgrep -P {proc.pid}").read().split():
            os.kill(int(pid), signal.SIGKILL)
        proc.kill()
        output, _ = await proc.communicate()
        raise AssertionError("still running: " + output.decode()[-2000:]) from None
    assert proc.returncode is not None
    return proc.returncode, output.decode()


def self_signed(tmp_path: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that is its own authority, and its key (files); skips the test
    where openssl is missing."""
    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return str(cert), str(key)
