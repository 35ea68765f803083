"""Every request priced from upstream usage and catalog prices, the account debited, a ledger row
written, and the client told `usage.cost`."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from decimal import Decimal

import pytest
from structlog.testing import capture_logs

from proxy.app import STORE
from proxy.cli import main
from tests.storedb import balance, ledger_rows
from tests.test_forward import STREAM, open_raw

SONNET = "anthropic/claude-sonnet-4.6"
FREE = "minimax/minimax-m2.5:free"


def usage(cached: int) -> dict:
    return {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
            "prompt_tokens_details": {"cached_tokens": cached}, "completion_tokens_details": {"reasoning_tokens": 50}}


def by_hand(cached: int) -> int:
    usd = (1000 - cached) * Decimal("0.000003") + 200 * Decimal("0.000015") + cached * Decimal("0.0000003")
    return int(usd * 1_000_000)


async def client_cost(resp, stream: bool) -> float:
    if not stream:
        return (await resp.json())["usage"]["cost"]
    events = [json.loads(e[6:]) for e in (await resp.read()).split(b"\n\n") if e.startswith(b"data: {")]
    return next(e["usage"]["cost"] for e in events if e.get("usage"))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", [SONNET, FREE])
@pytest.mark.parametrize("cached", [0, 300], ids=["uncached", "cached"])
async def test_cost_everywhere_equals_the_hand_figure(kilo, upstream, account, store_url, stream, model, cached):
    upstream.mode, upstream.usage = "usage", usage(cached)
    key = account("alice", "10")
    client = await kilo()
    resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream})
    assert resp.status == 200
    expected = 0 if model == FREE else by_hand(cached)
    assert await client_cost(resp, stream) == expected / 1e6
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert row["cost_micros"] == expected
    assert (row["prompt_tokens"], row["completion_tokens"], row["reasoning_tokens"], row["cached_tokens"]) == (1000, 200, 50, cached)
    assert row["account_id"] == 1 and row["model"] == model and row["provider"] == "openrouter"
    assert row["status"] == 200 and row["estimated"] == 0 and row["finish_reason"] == "stop"
    assert row["request_id"] == resp.headers["X-Request-Id"]
    assert balance(store_url) == 10_000_000 - expected


async def test_spending_down_to_402_then_small_goes_free(kilo, upstream, account, store_url):
    upstream.mode, upstream.usage = "usage", usage(0)
    key = account("frugal", "0.013")
    client = await kilo()
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": SONNET, "messages": [{"role": "user", "content": "hi"}]}
    statuses = []
    for _ in range(5):
        resp = await client.post("/v1/chat/completions", json=body, headers=auth)
        statuses.append(resp.status)
        await resp.read()
    assert statuses == [200, 200, 200, 402, 402]  # 3 x 6000 µ$ takes 13000 µ$ below zero
    resp = await client.post("/v1/chat/completions", json={**body, "model": "kilo-auto/small"}, headers=auth)
    assert resp.status == 200
    assert upstream.seen[-1].body["model"] == "google/gemma-4-26b-a4b-it:free"
    await client.app[STORE].flush()
    assert balance(store_url) == 13_000 - 3 * by_hand(0) < 0
    assert sum(r["cost_micros"] for r in ledger_rows(store_url)) == 3 * by_hand(0)


async def test_abandoned_stream_is_billed_by_estimate(kilo, upstream, account, store_url):
    upstream.mode = "slow"
    key = account("leaver", "10")
    client = await kilo()
    reader, writer = await open_raw(client, {**STREAM, "model": SONNET}, headers={"Authorization": f"Bearer {key}"})
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    while upstream.bytes_sent < 5:
        await asyncio.sleep(0.02)
    writer.transport.abort()
    while not upstream.closed_at:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert row["status"] == 499 and row["estimated"] == 1
    assert row["completion_tokens"] >= 3 and row["cost_micros"] > 0
    assert balance(store_url) == 10_000_000 - row["cost_micros"]


async def test_failed_upstream_costs_nothing(kilo, upstream, account, store_url):
    upstream.status, upstream.error_body = 500, b'{"error": {"message": "boom"}}'
    key = account("unlucky", "10")
    client = await kilo()
    resp = await client.post("/v1/chat/completions", json={"model": SONNET, "messages": [{"role": "user", "content": "x"}]},
                             headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 500
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert row["status"] == 500 and row["cost_micros"] == 0
    assert balance(store_url) == 10_000_000


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("count", [-5, "12", None, 10**12, 10**30])
async def test_usage_that_cannot_be_believed_is_billed_by_estimate(kilo, upstream, account, store_url, stream, count,
                                                                    caplog):
    """Before: -5, "12", null or 10^30 tokens cost nothing, silently, and 10^12 tokens were believed
    (a $17,500,000 debit). Now the row is billed by the gateway's own estimate, flagged `estimated`,
    a warning names the provider and request, and later rows are written as usual."""
    upstream.mode = "usage"
    upstream.usage = {**usage(0), "prompt_tokens": count}
    key = account("odd", "10")
    client = await kilo()
    chat = {"model": SONNET, "messages": [{"role": "user", "content": "x" * 4000}], "stream": stream}
    with capture_logs() as logged:
        resp = await client.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
        await resp.read()
    rid = resp.headers["X-Request-Id"]
    assert await client.app[STORE].flush() == 1
    upstream.usage = usage(0)
    await (await client.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})).read()
    assert await client.app[STORE].flush() == 1
    first, second = ledger_rows(store_url)
    assert first["estimated"] == 1 and first["prompt_tokens"] >= 1000 and 0 < first["cost_micros"] < 100_000
    assert second["estimated"] == 0 and second["cost_micros"] == by_hand(0)
    assert balance(store_url) == 10_000_000 - first["cost_micros"] - second["cost_micros"]
    warning = next(e for e in logged if e["event"] == "usage_not_believed")
    assert warning["request_id"] == rid and warning["provider"] == "openrouter"


async def test_two_gateways_one_store_no_lost_debit(kilo, upstream, account, store_url):
    upstream.mode, upstream.usage = "usage", usage(300)
    key = account("busy", "100")
    first, second = await kilo(), await kilo()
    auth = {"Authorization": f"Bearer {key}"}

    async def one(client, i: int) -> int:
        resp = await client.post("/v1/chat/completions", headers=auth,
                                 json={"model": SONNET, "messages": [{"role": "user", "content": "x"}], "stream": i % 2 == 0,
                                       "max_tokens": 2000})  # each reserves at most $0.03 of the $100
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(one(first if i % 2 else second, i) for i in range(200)))
    assert statuses == [200] * 200
    await asyncio.gather(first.app[STORE].flush(), second.app[STORE].flush())
    rows = ledger_rows(store_url)
    assert len(rows) == 200
    assert balance(store_url) == 100_000_000 - sum(r["cost_micros"] for r in rows) == 100_000_000 - 200 * by_hand(300)


@pytest.mark.parametrize("bound", [None, 999], ids=["default", "sqlite-before-3.32"])
async def test_a_large_batch_is_written_whole(kilo, store_url, bound):
    """More rows than one INSERT takes: every one is written, each column in its place, also where
    SQLite binds at most 999 parameters per statement."""
    from proxy.store import Row

    if bound is not None and "://" in store_url:
        pytest.skip("SQLite's own limit")
    client = await kilo()
    ledger = client.app[STORE]
    if bound is not None:
        ledger._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, bound)
    for i in range(1201):
        ledger.record(Row(f"req-{i}", None, "ip", "asked", "model", "prov", i, 2, 3, 4, 5, 0, i % 2 == 0, 200,
                          None if i % 3 else 1.5, 2.5, "stop", True, 1700000000.0 + i))
    assert await ledger.flush() == 1201
    rows = {r["request_id"]: r for r in ledger_rows(store_url)}
    assert len(rows) == 1201
    assert rows["req-1200"] == {
        "request_id": "req-1200", "account_id": None, "ip_hash": "ip", "model_asked": "asked", "model": "model",
        "provider": "prov", "prompt_tokens": 1200, "completion_tokens": 2, "reasoning_tokens": 3, "cached_tokens": 4,
        "cache_write_tokens": 5, "cost_micros": 0, "estimated": 1, "status": 200, "ttfb_ms": 1.5, "duration_ms": 2.5,
        "finish_reason": "stop", "streamed": 1, "created_at": 1700001200.0}
    assert rows["req-1199"]["ttfb_ms"] is None and rows["req-1199"]["estimated"] == 0


def test_batches_are_cut_into_few_statement_sizes():
    """Any batch is written with the same ten INSERTs (sqlite3 keeps them compiled), in order, whole."""
    from proxy.store.sqlite import _parts

    sizes = set()
    for count, most in [(0, 512), (1, 512), (700, 512), (1201, 512), (5000, 512), (700, 52), (1023, 1724)]:
        parts = _parts(count, most)
        assert [start for start, _ in parts] == [sum(size for _, size in parts[:i]) for i in range(len(parts))]
        assert sum(size for _, size in parts) == count
        assert all(size <= min(most, 512) and size & (size - 1) == 0 for _, size in parts)
        sizes |= {size for _, size in parts}
    assert len(sizes) <= 10


async def test_key_and_generation_endpoints(kilo, upstream, account):
    upstream.mode, upstream.usage = "usage", usage(0)
    alice, bob = account("alice", "1"), account("bob", "1")
    client = await kilo()
    resp = await client.post("/api/gateway/chat/completions", headers={"Authorization": f"Bearer {alice}"},
                             json={"model": SONNET, "messages": [{"role": "user", "content": "x"}]})
    request_id = resp.headers["X-Request-Id"]
    for flushed in (False, True):  # served from memory before the batch is written, and after
        if flushed:
            await client.app[STORE].flush()
        key = await (await client.get("/api/gateway/key", headers={"Authorization": f"Bearer {alice}"})).json()
        assert key["data"]["usage"] == by_hand(0) / 1e6
        assert key["data"]["limit_remaining"] == (1_000_000 - by_hand(0)) / 1e6
        assert key["data"]["is_free_tier"] is False and alice not in json.dumps(key)
        gen = await client.get(f"/api/gateway/generation?id={request_id}", headers={"Authorization": f"Bearer {alice}"})
        data = (await gen.json())["data"]
        assert (data["id"], data["model"], data["provider_name"]) == (request_id, SONNET, "openrouter")
        assert (data["tokens_prompt"], data["tokens_completion"], data["total_cost"]) == (1000, 200, by_hand(0) / 1e6)
        assert data["streamed"] is False and data["usage_estimated"] is False
        other = await client.get(f"/api/gateway/generation?id={request_id}", headers={"Authorization": f"Bearer {bob}"})
        assert other.status == 404
    assert (await client.get("/v1/key")).status == 401
    assert (await client.get("/v1/auth/key", headers={"Authorization": f"Bearer {bob}"})).status == 200
    assert (await client.get("/v1/generation", headers={"Authorization": f"Bearer {bob}"})).status == 400


async def test_usage_command(kilo, upstream, account, store_url, capsys):
    upstream.mode, upstream.usage = "usage", usage(0)
    key = account("alice", "1")
    client = await kilo()
    for model in (SONNET, SONNET, FREE):
        await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": model, "messages": [{"role": "user", "content": "x"}]})
    await client.app[STORE].flush()
    capsys.readouterr()
    assert main(["usage", "--db", store_url, "--by", "model", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[SONNET]["requests"] == 2 and rows[SONNET]["cost_usd"] == 2 * by_hand(0) / 1e6
    assert rows[FREE]["cost_usd"] == 0
    assert main(["usage", "--db", store_url, "--by", "account", "--account", "1", "--since", "2020-01-01"]) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and f"{2 * by_hand(0) / 1e6:.6f}" in table
    assert main(["usage", "--db", store_url, "--by", "day", "--since", "2999-01-01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def _long_chat() -> dict:
    return {"model": SONNET, "messages": [{"role": "user", "content": "hi " * 2000}], "stream": True}


@pytest.mark.parametrize("keepalive", [False, True], ids=["answered-at-once", "after-keep-alives"])
async def test_an_upstream_that_fails_before_answering_costs_nothing(kilo, upstream, account, store_url, keepalive):
    """Keep-alive comments (sent while a slow provider has not answered) and the error chunk that
    ends such a stream are the gateway's, not the answer: the row is the same as without them."""
    upstream.faults, upstream.hang, upstream.status = ["hang"], 0.3 if keepalive else 0, 502
    key = account("alice", "10")
    before = balance(store_url)
    client = await kilo(upstream={"retries": 0, "keepalive_interval": 0.1})
    resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=_long_chat())
    raw = await resp.read()
    assert (resp.status, b": keep-alive" in raw) == ((200, True) if keepalive else (502, False))
    await client.app[STORE].flush()
    [row] = ledger_rows(store_url)
    assert (row["status"], row["cost_micros"], row["estimated"], row["ttfb_ms"]) == (502, 0, 0, None)
    assert balance(store_url) == before


async def test_a_client_that_leaves_during_keep_alives_is_a_499_that_costs_nothing(kilo, upstream, account, store_url):
    upstream.faults, upstream.hang = ["hang"], 30
    key = account("alice", "10")
    client = await kilo(upstream={"keepalive_interval": 0.1})
    reader, writer = await open_raw(client, _long_chat(), headers={"Authorization": f"Bearer {key}"})
    await reader.readuntil(b": keep-alive\n\n")
    writer.transport.abort()
    for _ in range(50):
        await asyncio.sleep(0.05)
        if client.app[STORE].rows:
            break
    await client.app[STORE].flush()
    [row] = ledger_rows(store_url)
    assert (row["status"], row["cost_micros"], row["estimated"]) == (499, 0, 0)


@pytest.mark.parametrize("fault", ["write", "reload"])
async def test_the_ledger_writer_survives_a_database_error(kilo, upstream, account, store_url, fault):
    """Before: one sqlite3 error in the key reload that follows a write ended the writer loop without
    a log line; later rows were never written, not even at shutdown (286 of 400 in the report).
    The same for either backend's error, in the write or in the reload."""
    key = account("alice", "10")
    client = await kilo(ledger={"flush_interval": 0.05})
    ledger = client.app[STORE]
    failures = []

    async def broken(*args):
        failures.append(fault)
        raise ledger.errors[0]("disk I/O error")

    with capture_logs() as logged:
        if fault == "write":
            real, ledger._write = ledger._write, broken
        else:
            real, ledger._refresh = ledger._refresh, broken
        chat = {"model": SONNET, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(5):
            assert (await client.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})).status == 200
        for _ in range(100):
            if failures:
                break
            await asyncio.sleep(0.05)
        if fault == "write":
            ledger._write = real
        else:
            ledger._refresh = real
        for _ in range(5):
            assert (await client.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})).status == 200
        for _ in range(100):  # the writer loop itself, still running, writes all ten
            if len(ledger_rows(store_url)) == 10:
                break
            await asyncio.sleep(0.05)
    assert len(ledger_rows(store_url)) == 10
    assert balance(store_url) == 10_000_000 - sum(r["cost_micros"] for r in ledger_rows(store_url))
    assert any(e["event"] in ("ledger_write_failed", "keys_reload_failed") for e in logged)


async def test_concurrent_streams_overspend_at_most_one_request(kilo, upstream, account, store_url):
    """50 paid streams at once, $0.00153 each, on a $0.005 key (before reservations: all 50 were
    served and the balance ended at -$0.0715). Each reserves the most it may cost before it is
    sent; once nothing is left they get 402. By construction the balance ends no lower than minus
    one request's most cost."""
    upstream.mode, upstream.delay = "usage", 0.05  # streams that overlap
    upstream.usage = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
    key = account("small", "0.005")
    client = await kilo()
    body = {"model": SONNET, "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}

    async def one() -> int:
        resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
        await resp.read()
        return resp.status

    async def refused() -> dict:
        resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
        return await resp.json()

    statuses, held = await asyncio.gather(asyncio.gather(*(one() for _ in range(50))), refused())
    # refused while credit is held by requests in flight: it says so
    assert "held by its requests in progress" in held["error"]["message"] and held["error"]["reserved"] > 0
    await client.app[STORE].flush()
    rows = ledger_rows(store_url)
    served = statuses.count(200)
    assert set(statuses) == {200, 402} and served == len(rows) and 1 <= served <= 4
    assert all(r["cost_micros"] == 1530 for r in rows)
    most = (len(json.dumps(body)) // 3) * 3 + 100 * 15  # micro-dollars: the prompt bound and 100 output tokens
    print(f"50 streams on $0.005: {served} served, balance {balance(store_url)} µ$ (bound -{most} µ$)")
    assert balance(store_url) == 5000 - served * 1530 >= -most
    await client.app[STORE].flush()
    assert (await client.app[STORE].held(1))[1] == 0  # every reservation given back


async def test_a_request_reserves_at_the_price_of_the_dearest_model_it_may_fall_back_to(kilo, upstream, account):
    upstream.mode, upstream.delay = "usage", 0.2  # in flight while the second request comes
    upstream.usage = usage(0)
    key = account("small", "0.05")
    client = await kilo()
    cheap = {"model": "minimax/minimax-m2.7", "stream": True, "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]}
    first = asyncio.create_task(client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                            json={**cheap, "models": ["anthropic/claude-opus-4.7"]}))
    await asyncio.sleep(0.05)
    reserved = (await client.app[STORE].held(1))[1]
    opus = 1000 * 25  # micro-dollars: 1,000 output tokens at Opus's $25 per million (more than MiniMax's)
    assert reserved >= opus
    await (await first).read()
