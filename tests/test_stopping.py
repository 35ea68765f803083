"""Signals at every moment of a gateway's life: while it starts (imports, app build, catalog sync),
while its workers start, after its stop began; from a terminal, a process group, or as PID 1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from tests.fakes import Upstream
from tests.processes import exit_of, free_port, hanging_catalog, start, wait_up, workers_config


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


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_sigterm_after_the_stop_does_not_change_the_exit(upstream: Upstream, redis_url, tmp_path, workers):
    port = free_port()
    proc = await start(workers_config(tmp_path, port, redis_url, workers=workers), {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    async with aiohttp.ClientSession() as session:
        await wait_up(session, f"http://127.0.0.1:{port}")
    await asyncio.sleep(0.3)  # every worker listening
    proc.send_signal(signal.SIGTERM)
    while proc.returncode is None:  # SIGTERMs until it has exited, through the whole of its stop
        await asyncio.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):  # (`send_signal` would reap it, behind asyncio's back)
            os.kill(proc.pid, signal.SIGTERM)
    code, output = await exit_of(proc)
    assert code == 0, output[-2000:]


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_during_a_slow_start_up_stops_at_once(aiohttp_server, redis_url, tmp_path, workers):
    """A catalog sync that waits on its provider (up to 30 s) is cancelled by the stop: the gateway
    exits 0 without listening, well before that wait would have ended."""
    asked, provider = await hanging_catalog(aiohttp_server)
    port = free_port()
    config = workers_config(tmp_path, port, redis_url, workers=workers)
    config.write_text(config.read_text() + "[catalog]\nsync = true\n")
    proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test",
                                                    "OPENROUTER_BASE_URL": provider})
    await asyncio.wait_for(asked.wait(), 30)
    os.kill(proc.pid, signal.SIGTERM)
    code, output = await exit_of(proc, 20)
    assert code == 0, output[-2000:]
    assert '"during":"start-up"' in output.replace(" ", "")
    assert "listening" not in output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_to_the_group_while_the_workers_start_stops_them_cleanly(redis_url, tmp_path, sig):
    """A terminal's Ctrl-C, or a SIGTERM to the process group (systemd, `timeout`), reaches the
    supervisor and every worker at once; a worker then also gets the supervisor's SIGTERM, which must
    not count as a second signal ("stop at once") while it is still building its app: every worker
    stops cleanly and the gateway exits 0."""
    marks = tmp_path / "marks"
    marks.mkdir()
    port = free_port()
    config = workers_config(tmp_path, port, redis_url,
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
        code, output = await exit_of(gateway)
    assert code == 0, output[-2000:]
    assert "worker_died" not in output
    assert output.count('"during":"start-up"') == 2, output[-2000:]


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
    await exit_of(proc, 20)
