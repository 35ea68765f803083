"""`turnstile serve --workers N`: processes sharing one port and one exact limit, restarted when they
die, the port held by their supervisor from start to exit, stopped when it is gone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

import aiohttp

from tests.fakes import Upstream
from tests.processes import exit_of, free_port, hanging_catalog, start, wait_up, workers_config


async def test_two_workers_share_one_exact_limit_and_a_dead_worker_comes_back(upstream: Upstream, redis_url, tmp_path):
    import uuid

    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 2\n[limits]\nstorage = "{redis_url}/{uuid.uuid4().int % 16}"\n'
                      f'[keys]\ndb = "{tmp_path / "keys.db"}"\n[logging]\nformat = "json"\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url}
    proc = await start(config, env)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "x"}]}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            try:
                await wait_up(session, url)
            except AssertionError:
                if proc.returncode is None:
                    proc.kill()
                output, _ = await proc.communicate()
                raise AssertionError(output.decode(errors="replace")[-3000:]) from None
            await asyncio.sleep(0.5)  # both workers listening

            async def one() -> int:
                async with session.post(url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one() for _ in range(300)))
            assert (statuses.count(200), statuses.count(429)) == (200, 100)

            children = [int(p) for p in os.popen(f"pgrep -P {proc.pid}").read().split()]
            assert len(children) == 2
            os.kill(children[0], signal.SIGKILL)
            for _ in range(100):  # the supervisor starts another (slower on a busy machine)
                await asyncio.sleep(0.1)
                after = [int(p) for p in os.popen(f"pgrep -P {proc.pid}").read().split()]
                if len(after) == 2 and children[0] not in after:
                    break
            assert len(after) == 2 and children[0] not in after
            async with session.get(url + "/healthz") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await proc.communicate()
    assert proc.returncode == 0
    served_by = {json.loads(line).get("worker") for line in output.splitlines() if b'"event":"request"' in line}
    assert served_by == {0, 1}  # the kernel spread connections over both processes


async def test_workers_with_a_certificate_that_cannot_load_stop_at_once(upstream: Upstream, redis_url, tmp_path):
    extra = f'tls_cert = "{tmp_path / "missing.pem"}"\ntls_key = "{tmp_path / "missing.key"}"\n'
    proc = await start(workers_config(tmp_path, free_port(), redis_url, extra), {"OPENROUTER_API_KEY": "sk-or-test"})
    code, output = await exit_of(proc)
    assert code == 2
    assert "cannot load the TLS certificate or key" in output
    assert "worker_died" not in output  # no worker was started, let alone restarted


async def test_the_port_is_reserved_while_the_workers_start(aiohttp_server, redis_url, tmp_path):
    """The supervisor holds the port from its first moment: a second gateway started while the first
    one's workers are still starting (their catalog sync waits) is refused, and does not share it."""
    asked, provider = await hanging_catalog(aiohttp_server)
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": provider}
    port = free_port()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    config = workers_config(tmp_path / "first", port, redis_url)
    config.write_text(config.read_text() + "[catalog]\nsync = true\n")
    first = await start(config, env)
    try:
        await asyncio.wait_for(asked.wait(), 30)
        second = await start(workers_config(tmp_path / "second", port, redis_url), env)
        code, output = await exit_of(second)
        assert code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in output
    finally:
        os.kill(first.pid, signal.SIGTERM)
        code, output = await exit_of(first)
    assert code == 0, output[-2000:]


async def test_port_0_is_one_free_port_for_every_worker(upstream: Upstream, redis_url, tmp_path):
    gateway = await start(workers_config(tmp_path, 0, redis_url), {
        "OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    try:
        urls: list[str] = []
        while len(urls) < 2 and (line := await asyncio.wait_for(gateway.stdout.readline(), 30)):
            if b'"listening"' in line:
                urls.append(json.loads(line)["url"])
        assert urls[0] == urls[1] != "http://127.0.0.1:0", urls  # both workers on one port, the one given
        async with aiohttp.ClientSession() as session:
            await wait_up(session, urls[0])
    finally:
        os.kill(gateway.pid, signal.SIGTERM)
        code, output = await exit_of(gateway)
    assert code == 0, output[-2000:]


async def test_workers_stop_when_their_supervisor_is_killed(upstream: Upstream, redis_url, tmp_path):
    """A supervisor killed outright cannot pass SIGTERM on: its workers see it gone, stop, and free
    the port for the next gateway."""
    port = free_port()
    gateway = await start(workers_config(tmp_path, port, redis_url), {
        "OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    try:
        async with aiohttp.ClientSession() as session:
            await wait_up(session, f"http://127.0.0.1:{port}")
        workers = [int(pid) for pid in os.popen(f"pgrep -P {gateway.pid}").read().split()]
        assert len(workers) == 2
        os.kill(gateway.pid, signal.SIGKILL)
        output = (await asyncio.wait_for(gateway.stdout.read(), 30)).decode()  # every copy of the pipe closed
        assert output.count("supervisor_gone") == 2, output[-2000:]
    finally:
        for pid in os.popen(f"pgrep -f 'proxy serve --config {tmp_path}'").read().split():
            os.kill(int(pid), signal.SIGKILL)
        await gateway.wait()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))
