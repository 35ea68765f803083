"""Rate limits in a shared Redis under pressure: a burst wider than the connection pool, Redis killed
and frozen mid-traffic, and the operator's choice between refusing and letting requests through."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid

import aiohttp
from structlog.testing import capture_logs

from tests.fakes import Upstream
from tests.processes import free_port, start, wait_up, workers_config
from tests.redis_server import RedisServer

FREE = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "x"}]}


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
    return total


async def test_300_at_once_over_two_workers_give_exactly_200_and_100_429s(upstream: Upstream, redis_url, tmp_path):
    """Before: redis-py's pool raised "Too many connections" past 100 requests at once per worker,
    and 300 requests gave 200 x 200 and 100 x 500; "X-RateLimit-Remaining" read "100" on 99 of
    100 admitted requests. /metrics with two workers showed one worker's counts."""
    port = free_port()
    config = workers_config(tmp_path, port, f"{redis_url}/{uuid.uuid4().int % 16}", 'trusted_proxies = ["127.0.0.0/8"]\n')
    pool = "[limits]\npool_size = 20  # fewer connections than requests at once\n"
    config.write_text(config.read_text().replace("[limits]\n", pool))
    proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            await wait_up(session, url)
            await asyncio.sleep(0.5)  # both workers listening

            async def one() -> tuple[int, str]:
                headers = {"X-Forwarded-For": "198.51.100.30"}
                async with session.post(url + "/v1/chat/completions", json=FREE, headers=headers) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("X-RateLimit-Remaining", "")

            answers = await asyncio.gather(*(one() for _ in range(300)))
            statuses = [status for status, _ in answers]
            assert (statuses.count(200), statuses.count(429)) == (200, 100), sorted(set(statuses))
            # each admitted request was told its own place in the window
            assert sorted(int(left) for status, left in answers if status == 200) == list(range(200))
            await asyncio.sleep(1.5)  # each worker moves its counts into the shared samples every second
            for _ in range(4):  # whichever worker answers, it reports both
                async with session.get(url + "/metrics") as resp:
                    text = await resp.text()
                assert sample(text, "turnstile_requests_total", route="chat") == 300
                # one series, the workers' (the supervisor's own check of the config is not among them)
                assert [line for line in text.splitlines() if line.startswith("turnstile_rate_limit_storage_up")] \
                    == ["turnstile_rate_limit_storage_up 1.0"]
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await proc.communicate()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in output.splitlines() if line.startswith(b"{")]
    assert not [e for e in lines if e.get("level") == "error" or "exception" in e], output[-2000:]
    assert {e.get("worker") for e in lines if e.get("event") == "request"} == {0, 1}


async def chats(client, n: int, ip: str = "198.51.100.40") -> list[tuple[int, dict]]:
    async def one() -> tuple[int, dict]:
        resp = await client.post("/v1/chat/completions", json=FREE, headers={"X-Forwarded-For": ip})
        return resp.status, await resp.json()

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def until(check, seconds: float = 15.0) -> None:
    for _ in range(int(seconds / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("did not happen in time")


async def test_redis_killed_answers_503_at_once_then_recovers(kilo, own_redis: RedisServer):
    """Before: Redis down gave a 500 with a traceback per request; frozen, 5 s then a 500 each."""
    client = await kilo(limits={"storage": own_redis.url, "timeout": 0.3})
    assert {s for s, _ in await chats(client, 5)} == {200}
    own_redis.stop()
    with capture_logs() as logged:
        answers = await chats(client, 50)
    assert {s for s, _ in answers} == {503}
    assert {b["error_type"] for _, b in answers} == {"rate_limit_storage_unavailable"}
    assert [e["event"] for e in logged if e["log_level"] in ("error", "warning")] == ["rate_limit_storage_unavailable"]
    paid = await client.post("/v1/chat/completions", json={**FREE, "model": "openai/gpt-5.4"})
    assert paid.status == 401  # refused as anonymous, as ever: only limited requests need Redis
    with capture_logs() as logged:
        own_redis.start()

        async def served() -> bool:
            return (await chats(client, 1))[0][0] == 200

        await until(served)
    assert any(e["event"] == "rate_limit_storage_recovered" for e in logged)


async def test_redis_frozen_waits_one_timeout_not_one_per_request(kilo, own_redis: RedisServer):
    client = await kilo(limits={"storage": own_redis.url, "timeout": 0.3})
    assert {s for s, _ in await chats(client, 3)} == {200}
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = await chats(client, 20)  # these wait the one timeout together
        then = await chats(client, 20)  # these are refused without waiting
        assert {s for s, _ in first + then} == {503}
        waited = loop.time() - started
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)

    async def served() -> bool:
        return (await chats(client, 1))[0][0] == 200

    await until(served)
    print(f"\n40 requests with Redis frozen answered in {waited:.2f} s")


async def test_fail_open_lets_limited_requests_through_and_counts_them(kilo, own_redis: RedisServer):
    client = await kilo(limits={"storage": own_redis.url, "timeout": 0.3, "fail_open": True})
    assert {s for s, _ in await chats(client, 2)} == {200}
    own_redis.stop()
    assert {s for s, _ in await chats(client, 10)} == {200}
    text = await (await client.get("/metrics")).text()
    assert sample(text, "turnstile_rate_limit_unchecked_total") == 10
    assert sample(text, "turnstile_rate_limit_storage_outages_total") == 1
    assert sample(text, "turnstile_rate_limit_storage_up") == 0
    own_redis.start()

    async def up() -> bool:
        await chats(client, 1)
        return sample(await (await client.get("/metrics")).text(), "turnstile_rate_limit_storage_up") == 1

    await until(up)
