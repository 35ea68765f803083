"""`kill -9` loses no billing: every request whose answer had begun reaching its client has its
ledger row once the gateway starts again (read back from the dead process's journal), its account
debited once."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp

from proxy.store import run_sync
from tests.fakes import Upstream
from tests.storedb import balance, ledger_rows

STREAMS = int(os.environ.get("TURNSTILE_CRASH_STREAMS", "300"))  # the acceptance run: 2000
from tests.processes import free_port, start, wait_up


async def test_kill_9_mid_load_loses_no_billing(upstream: Upstream, account, store_url, tmp_path):
    upstream.mode, upstream.delay = "usage", 0.05  # each stream takes about a third of a second
    upstream.usage = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
    key = account("busy", "100")
    port = free_port()
    config = tmp_path / "turnstile.toml"
    # a batch write every 30 s: without the journal, everything since the start would be lost
    config.write_text(f'[server]\nport = {port}\n[store]\nurl = "{store_url}"\n'
                      f'[ledger]\nflush_interval = 30.0\njournal = "{tmp_path}/ledger"\n'
                      '[logging]\nlevel = "warning"\n')  # no access lines: the pipe is read only at the end
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
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await wait_up(session, url)
        tasks = [asyncio.create_task(one(session)) for _ in range(STREAMS)]  # all at once: no pool limit
        while upstream.ended < STREAMS // 2:  # half answered, the rest in flight or waiting
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    await proc.wait()
    answered = upstream.started
    assert STREAMS // 2 <= len(reached) <= answered
    # SQLite: nothing written yet. PostgreSQL writes a request's row within 50 ms of its end, to
    # give its reservation back: the rows of the requests in flight at the kill are not.
    assert len(ledger_rows(store_url)) < len(reached)

    proc = await start(config, env)  # the next start reads the dead process's journal back
    async with aiohttp.ClientSession() as session:
        await wait_up(session, url)
    proc.send_signal(signal.SIGTERM)
    output, _ = await proc.communicate()
    rows = {r["request_id"]: r["cost_micros"] for r in ledger_rows(store_url)}
    # Rows: every request whose answer reached its client, and those whose first bytes the gateway
    # had written but the kernel had not delivered yet; never one that never began.
    print(f"streams {STREAMS}: upstream answered {answered}, client got bytes of {len(reached)}, ledger rows "
          f"{len(rows)} ({len(set(rows) - reached)} begun but not delivered); no row: {answered - len(rows)}")
    assert reached <= set(rows) and len(rows) <= answered, output.decode()[-1500:]
    # every reservation given back, every row's cost debited once
    assert balance(store_url) == 100_000_000 - sum(rows.values())
    assert b"ledger_recovered_from_journal" in output
    assert not list(tmp_path.glob("ledger.journal.*"))


def test_a_run_that_ended_is_read_back_whatever_its_pid_and_a_live_one_is_not(tmp_path, store_url, account):
    """A container's PID 1 is PID 1 again after a restart: runs are told apart by their lock, not pid."""
    from proxy.store import StoreSettings, journal, open_store

    account("a", "10")
    base = str(tmp_path / "ledger")
    row = lambda rid, cost: (rid, 1, None, "m", "m", "p", 1, 2, 0, 0, 0, cost, False, 200, 1.0, 2.0, "stop", True, 1.0)
    crashed, live = journal.Journal(base), journal.Journal(base)
    crashed.open()
    live.open()
    crashed.provisional(row("a", 5))
    crashed.final(row("a", 7))
    live.provisional(row("b", 9))
    for turn in (2, 10):  # read in the order written, 2 before 10 (not as text)
        with open(f"{crashed.base}.{turn}", "wb") as f:
            f.write(orjson_line(row("c", turn)))
    os.close(crashed._fd)
    os.close(crashed._lock)  # the crashed run's lock goes with its process

    async def recover() -> None:
        async with open_store(StoreSettings(url=store_url, journal=base)) as store:
            await store._recover()

    run_sync(recover)
    found = {r["request_id"]: r["cost_micros"] for r in ledger_rows(store_url)}
    assert found == {"a": 7, "c": 10}  # b's run lives: not read
    assert balance(store_url) == 10_000_000 - 17
    assert sorted(p.name for p in tmp_path.glob("ledger.journal.*")) == sorted(
        [os.path.basename(live.path), os.path.basename(live.base) + ".lock"])
    live.close(empty=False)


def orjson_line(row) -> bytes:
    import orjson

    return orjson.dumps(row) + b"\n"


def test_a_journal_that_cannot_be_written_never_fails_the_request(tmp_path):
    from proxy.store import journal

    j = journal.Journal(str(tmp_path / "keys.db"))
    j.open()
    os.close(j._fd)  # the disk is gone, say
    j.final(("a", 1, None, "m", "m", "p", 1, 2, 0, 0, 0, 3, False, 200, 1.0, 2.0, "stop", True, 1.0))
    assert j.failed
