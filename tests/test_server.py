"""The real `turnstile serve` process: SIGTERM under load lets in-flight requests finish, writes every
admitted request's ledger row, and exits 0; TLS; the port it listens on."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import aiohttp
import pytest

from tests.fakes import Upstream
from tests.storedb import ledger_rows
from tests.processes import exit_of, free_port, self_signed, start, wait_up, workers_config


async def test_sigterm_under_load_loses_no_ledger_row(upstream: Upstream, account, store_url, tmp_path):
    upstream.mode, upstream.delay = "usage", 0.05
    upstream.usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    key = account("load", "100")
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nshutdown_timeout = 20.0\n[store]\nurl = "{store_url}"\n[ledger]\njournal = "{tmp_path}/journal"\n'
                      'flush_interval = 30.0\n[logging]\nformat = "json"\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url}
    proc = await start(config, env)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await wait_up(session, url)
        # (max_tokens: each reserves $0.015 of the $100, not the most a Sonnet answer can cost)
        body = {"model": "anthropic/claude-sonnet-4.6", "messages": [{"role": "user", "content": "x"}], "stream": True,
                "max_tokens": 1000}

        async def one() -> str | None:
            try:
                async with session.post(url + "/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    text = await resp.read()
                    assert resp.status == 200 and text.endswith(b"data: [DONE]\n\n")
                    return resp.headers["X-Request-Id"]
            except aiohttp.ClientError:
                return None  # refused once the gateway stopped listening: never admitted

        tasks = [asyncio.create_task(one()) for _ in range(60)]
        for _ in range(2000):  # SIGTERM once all 60 are in flight upstream, however slow the machine
            if len(upstream.seen) >= 60:
                break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        tasks += [asyncio.create_task(one()) for _ in range(20)]
        results = await asyncio.gather(*tasks)
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()[-2000:]
    admitted = {r for r in results if r}
    assert len(admitted) >= 60  # everything in flight at SIGTERM finished
    rows = {r["request_id"]: r["status"] for r in ledger_rows(store_url)}
    assert admitted <= set(rows)
    assert all(rows[r] == 200 for r in admitted)
    assert b"ledger_flushed_on_stop" in output


async def test_sigterm_lets_20_streams_finish_and_refuses_new_connections(upstream: Upstream, account, store_url, tmp_path):
    upstream.mode, upstream.delay = "usage", 0.2  # each stream takes about 1.4 s
    upstream.usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    key = account("load", "100")
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nshutdown_timeout = 20.0\n[store]\nurl = "{store_url}"\n[ledger]\njournal = "{tmp_path}/journal"\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url}
    proc = await start(config, env)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "anthropic/claude-sonnet-4.6", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        await wait_up(session, url)
        opened = asyncio.Event()
        count = 0

        async def one() -> bytes:
            nonlocal count
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {key}"}) as resp:
                first = await resp.content.readline()
                count += 1
                if count == 20:
                    opened.set()
                return first + await resp.read()

        streams = [asyncio.create_task(one()) for _ in range(20)]
        await opened.wait()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        refused = False
        try:
            async with aiohttp.ClientSession() as fresh:  # a new connection, not a pooled one
                await fresh.get(url + "/healthz")
        except aiohttp.ClientConnectorError:
            refused = True
        bodies = await asyncio.gather(*streams)
    output, _ = await proc.communicate()
    assert refused
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    assert proc.returncode == 0, output.decode()[-2000:]


async def test_tls_with_a_self_signed_certificate(upstream: Upstream, tmp_path):
    import ssl

    cert, key = self_signed(tmp_path)
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"\n[keys]\ndb = "{tmp_path / "k.db"}"\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url}
    proc = await start(config, env)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_up(session, f"https://127.0.0.1:{port}", ssl=trust)
            body = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "x"}]}
            async with session.post(f"https://127.0.0.1:{port}/v1/chat/completions", json=body, ssl=trust) as resp:
                assert resp.status == 200 and (await resp.json())["choices"]
            try:  # plain HTTP on the TLS port is not served
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    assert resp.status >= 400
            except aiohttp.ClientError:
                pass
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()[-1500:]
    assert b'"url": "https://127.0.0.1' in output or b"https://127.0.0.1" in output


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_port_another_process_listens_on_is_refused_at_once(upstream: Upstream, redis_url, tmp_path, workers):
    """Workers listen with SO_REUSEPORT; a second gateway must still not share the port of a running
    one (here a socket that also allows sharing, as a running gateway's workers do). One process or
    several, the port is tried first, before anything is built, and the message is the same."""
    port = free_port()
    config = workers_config(tmp_path, port, redis_url, workers=workers)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
        code, output = await exit_of(proc)
    assert code == 1
    assert output == f"turnstile: cannot listen on 127.0.0.1:{port}: Address already in use\n"


async def test_an_ipv6_address_is_bracketed_in_the_url_it_listens_on(upstream: Upstream, tmp_path):
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nhost = "::1"\nport = {port}\n[keys]\ndb = "{tmp_path / "keys.db"}"\n'
                      '[logging]\nformat = "json"\n')
    proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    try:
        async with aiohttp.ClientSession() as session:
            await wait_up(session, f"http://[::1]:{port}")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        code, output = await exit_of(proc)
    assert code == 0
    assert f'"url":"http://[::1]:{port}"' in output.replace(" ", "")
