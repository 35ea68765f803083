"""`kill -9` loses no billing: every request whose answer had begun reaching its client has its
ledger row once the gateway starts again (read back from the dead process's journal), its account
debited once."""

from __future__ import annotations

import asyncio
import signal
import sqlite3

import aiohttp

from tests.fakes import Upstream
from tests.processes import free_port, start, wait_up


async def test_kill_9_mid_load_loses_no_billing(upstream: Upstream, account, keys_db, tmp_path):
    upstream.mode, upstream.delay = "usage", 0.05  # each stream takes about a third of a second
    upstream.usage = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
    key = account("busy", "100")
    port = free_port()
    config = tmp_path / "turnstile.toml"
    # a batch write every 30 s: without the journal, everything since the start would be lost
    config.write_text(f'[server]\nport = {port}\n[keys]\ndb = "{keys_db}"\n[ledger]\nflush_interval = 30.0\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url}
    url = f"http://127.0.0.1:{port}"
    body = {"model": "anthropic/claude-sonnet-4.6", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "x"}]}
    reached: set[str] = set()  # requests of which the client got some of the answer

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(url + "/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {key}"}) as resp:
                async for chunk in resp.content.iter_any():
                    if chunk.strip() and not chunk.startswith(b":"):
                        reached.add(resp.headers["X-Request-Id"])
        except aiohttp.ClientError:
            pass  # cut by the kill

    proc = await start(config, env)
    async with aiohttp.ClientSession() as session:
        await wait_up(session, url)
        tasks = [asyncio.create_task(one(session)) for _ in range(300)]
        while upstream.ended < 150:  # half answered, the rest in flight or waiting
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    await proc.wait()
    answered = upstream.started
    assert 150 <= len(reached) <= answered
    db = sqlite3.connect(keys_db)
    assert db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0] == 0  # nothing had been written yet

    proc = await start(config, env)  # the next start reads the dead process's journal back
    async with aiohttp.ClientSession() as session:
        await wait_up(session, url)
    proc.send_signal(signal.SIGTERM)
    output, _ = await proc.communicate()
    rows = {r[0]: r[1] for r in db.execute("SELECT request_id, cost_micros FROM ledger")}
    assert reached <= set(rows) and len(rows) <= answered, output.decode()[-1500:]
    balance = db.execute("SELECT balance_micros FROM accounts").fetchone()[0]
    assert balance == 100_000_000 - sum(rows.values())
    assert b"ledger_recovered_from_journal" in output
    assert not list(tmp_path.glob("keys.db.journal.*"))
