"""The real `turnstile serve` process: SIGTERM under load lets in-flight requests finish, writes every
admitted request's ledger row, and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys

import aiohttp
from aiohttp import web
import pytest

from tests.fakes import Upstream


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


async def test_sigterm_under_load_loses_no_ledger_row(upstream: Upstream, account, keys_db, tmp_path):
    upstream.mode, upstream.delay = "usage", 0.05
    upstream.usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    key = account("load", "100")
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nshutdown_timeout = 20.0\n[keys]\ndb = "{keys_db}"\n'
                      '[ledger]\nflush_interval = 30.0\n[logging]\nformat = "json"\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url}
    proc = await start(config, env)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await wait_up(session, url)
        body = {"model": "anthropic/claude-sonnet-4.6", "messages": [{"role": "user", "content": "x"}], "stream": True}

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
    db = sqlite3.connect(keys_db)
    rows = {r[0]: r[1] for r in db.execute("SELECT request_id, status FROM ledger")}
    assert admitted <= set(rows)
    assert all(rows[r] == 200 for r in admitted)
    assert b"ledger_flushed_on_stop" in output


async def test_sigterm_lets_20_streams_finish_and_refuses_new_connections(upstream: Upstream, account, keys_db, tmp_path):
    upstream.mode, upstream.delay = "usage", 0.2  # each stream takes about 1.4 s
    upstream.usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    key = account("load", "100")
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nshutdown_timeout = 20.0\n[keys]\ndb = "{keys_db}"\n')
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


async def test_sigterm_while_the_workers_start_is_a_clean_stop(upstream: Upstream, redis_url, tmp_path):
    """A SIGTERM that comes before a worker's event loop takes the signals (here: as soon as the
    supervisor has forked them) stops it cleanly once it has started; it does not die by the signal."""
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 2\n[limits]\nstorage = "{redis_url}"\n'
                      f'[keys]\ndb = "{tmp_path / "keys.db"}"\n[logging]\nformat = "json"\n')
    proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    assert proc.stdout is not None
    try:
        seen = b""
        while b'"event":"supervising"' not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, seen.decode()
            seen += line
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # it hung: take the workers down with it
            for pid in os.popen(f"pgrep -P {proc.pid}").read().split():
                os.kill(int(pid), signal.SIGKILL)
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, (seen + output).decode()[-2000:]
    assert b"worker_died" not in output


async def test_tls_with_a_self_signed_certificate(upstream: Upstream, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        import pytest
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
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


def _workers_config(tmp_path, port: int, redis_url: str, extra: str = "", workers: int = 2) -> object:
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = {workers}\n{extra}[limits]\nstorage = "{redis_url}"\n'
                      f'[keys]\ndb = "{tmp_path / "keys.db"}"\n[logging]\nformat = "json"\n')
    return config


async def _hanging_catalog(aiohttp_server) -> tuple[asyncio.Event, str]:
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


async def _exit_of(proc: asyncio.subprocess.Process, seconds: float = 30) -> tuple[int, str]:
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


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_port_another_process_listens_on_is_refused_at_once(upstream: Upstream, redis_url, tmp_path, workers):
    """Workers listen with SO_REUSEPORT; a second gateway must still not share the port of a running
    one (here a socket that also allows sharing, as a running gateway's workers do). One process or
    several, the port is tried first, before anything is built, and the message is the same."""
    port = free_port()
    config = _workers_config(tmp_path, port, redis_url, workers=workers)
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
        code, output = await _exit_of(proc)
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
        code, output = await _exit_of(proc)
    assert code == 0
    assert f'"url":"http://[::1]:{port}"' in output.replace(" ", "")


async def test_workers_with_a_certificate_that_cannot_load_stop_at_once(upstream: Upstream, redis_url, tmp_path):
    extra = f'tls_cert = "{tmp_path / "missing.pem"}"\ntls_key = "{tmp_path / "missing.key"}"\n'
    proc = await start(_workers_config(tmp_path, free_port(), redis_url, extra), {"OPENROUTER_API_KEY": "sk-or-test"})
    code, output = await _exit_of(proc)
    assert code == 2
    assert "cannot load the TLS certificate or key" in output
    assert "worker_died" not in output  # no worker was started, let alone restarted


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_sigterm_after_the_stop_does_not_change_the_exit(upstream: Upstream, redis_url, tmp_path, workers):
    port = free_port()
    proc = await start(_workers_config(tmp_path, port, redis_url, workers=workers), {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    async with aiohttp.ClientSession() as session:
        await wait_up(session, f"http://127.0.0.1:{port}")
    await asyncio.sleep(0.3)  # every worker listening
    proc.send_signal(signal.SIGTERM)
    while proc.returncode is None:  # SIGTERMs until it has exited, through the whole of its stop
        await asyncio.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):  # (`send_signal` would reap it, behind asyncio's back)
            os.kill(proc.pid, signal.SIGTERM)
    code, output = await _exit_of(proc)
    assert code == 0, output[-2000:]


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_during_a_slow_start_up_stops_at_once(aiohttp_server, redis_url, tmp_path, workers):
    """A catalog sync that waits on its provider (up to 30 s) is cancelled by the stop: the gateway
    exits 0 without listening, well before that wait would have ended."""
    asked, provider = await _hanging_catalog(aiohttp_server)
    port = free_port()
    config = _workers_config(tmp_path, port, redis_url, workers=workers)
    config.write_text(config.read_text() + "[catalog]\nsync = true\n")
    proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test",
                                                    "OPENROUTER_BASE_URL": provider})
    await asyncio.wait_for(asked.wait(), 30)
    os.kill(proc.pid, signal.SIGTERM)
    code, output = await _exit_of(proc, 20)
    assert code == 0, output[-2000:]
    assert '"during":"start-up"' in output.replace(" ", "")
    assert "listening" not in output


async def test_the_port_is_reserved_while_the_workers_start(aiohttp_server, redis_url, tmp_path):
    """The supervisor holds the port from its first moment: a second gateway started while the first
    one's workers are still starting (their catalog sync waits) is refused, and does not share it."""
    asked, provider = await _hanging_catalog(aiohttp_server)
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": provider}
    port = free_port()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    config = _workers_config(tmp_path / "first", port, redis_url)
    config.write_text(config.read_text() + "[catalog]\nsync = true\n")
    first = await start(config, env)
    try:
        await asyncio.wait_for(asked.wait(), 30)
        second = await start(_workers_config(tmp_path / "second", port, redis_url), env)
        code, output = await _exit_of(second)
        assert code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in output
    finally:
        os.kill(first.pid, signal.SIGTERM)
        code, output = await _exit_of(first)
    assert code == 0, output[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_to_the_group_while_the_workers_start_stops_them_cleanly(redis_url, tmp_path, sig):
    """A terminal's Ctrl-C, or a SIGTERM to the process group (systemd, `timeout`), reaches the
    supervisor and every worker at once; a worker then also gets the supervisor's SIGTERM, which must
    not count as a second signal ("stop at once") while it is still building its app: every worker
    stops cleanly and the gateway exits 0."""
    marks = tmp_path / "marks"
    marks.mkdir()
    port = free_port()
    config = _workers_config(tmp_path, port, redis_url,
                             f'[[pipeline]]\nuse = "tests.custom_stages:SlowStart"\nmarks = "{marks}"\nseconds = 3.0\n')
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config), env={"PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(300):  # the supervisor's build of the app, then each worker's
            if len(list(marks.iterdir())) == 3:
                break
            await asyncio.sleep(0.05)
        assert len(list(marks.iterdir())) == 3
        os.killpg(gateway.pid, sig)
    finally:
        code, output = await _exit_of(gateway)
    assert code == 0, output[-2000:]
    assert "worker_died" not in output
    assert output.count('"during":"start-up"') == 2, output[-2000:]


async def test_port_0_is_one_free_port_for_every_worker(upstream: Upstream, redis_url, tmp_path):
    gateway = await start(_workers_config(tmp_path, 0, redis_url), {
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
        code, output = await _exit_of(gateway)
    assert code == 0, output[-2000:]


async def test_workers_stop_when_their_supervisor_is_killed(upstream: Upstream, redis_url, tmp_path):
    """A supervisor killed outright cannot pass SIGTERM on: its workers see it gone, stop, and free
    the port for the next gateway."""
    port = free_port()
    gateway = await start(_workers_config(tmp_path, port, redis_url), {
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


async def test_a_second_signal_stops_a_slow_start_up_at_once_even_as_pid_1(tmp_path):
    """In a container without an init, the gateway is PID 1, whom the kernel spares a signal's default
    action: the second signal ("stop at once") must still stop it."""
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.skip("no PID namespaces here (unshare needs root)")
    marks = tmp_path / "marks"
    marks.mkdir()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[[pipeline]]\nuse = "tests.custom_stages:SlowStart"\nmarks = "{marks}"\nseconds = 120.0\n'
                      f'[server]\nport = {free_port()}\n[keys]\ndb = "{tmp_path / "keys.db"}"\n')
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--pid", "--fork", sys.executable, "-m", "proxy", "serve", "--config", str(config),
        env={"PATH": "/usr/bin:/bin"}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    for _ in range(300):
        if (marks / "1").exists():  # PID 1 in its namespace, building its app
            break
        await asyncio.sleep(0.05)
    assert (marks / "1").exists()
    inner = int(os.popen(f"pgrep -P {proc.pid}").read().split()[0])
    os.kill(inner, signal.SIGTERM)
    await asyncio.sleep(0.2)
    os.kill(inner, signal.SIGTERM)
    await _exit_of(proc, 20)
