"""The anonymous free-model limit: exact under concurrency, per client IP, shared through Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from proxy.app import create_app
from proxy.config import ConfigError
from proxy.errors import GatewayError
from tests.conftest import make_config

FREE = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}]}


def from_ip(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


async def burst(client, n: int, headers: dict[str, str]) -> list[int]:
    async def one() -> int:
        resp = await client.post("/v1/chat/completions", json=FREE, headers=headers)
        await resp.read()
        return resp.status

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_exactly_200_per_ip_with_concurrency(kilo, account):
    key = account("alice", balance="0")
    client = await kilo()
    ip = "198.51.100.7"
    remaining = []
    for _ in range(150):
        resp = await client.post("/v1/chat/completions", json=FREE, headers=from_ip(ip))
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Limit"] == "200"
        remaining.append(int(resp.headers["X-RateLimit-Remaining"]))
        await resp.read()
    assert remaining == list(range(199, 49, -1))
    statuses = await burst(client, 100, from_ip(ip))  # 100 at once across the boundary: exactly 50 fit
    assert (statuses.count(200), statuses.count(429)) == (50, 50)
    statuses = await burst(client, 50, from_ip(ip))
    assert statuses == [429] * 50
    # another IP, and a caller with a key, are unaffected
    assert (await burst(client, 5, from_ip("203.0.113.9"))) == [200] * 5
    assert (await burst(client, 5, {**from_ip(ip), "Authorization": f"Bearer {key}"})) == [200] * 5


async def test_paid_models_are_not_counted(kilo, account):
    key = account("alice", balance="10")
    # who = "free" counts key holders too: only the model being paid keeps these out of the count
    client = await kilo(pipeline=[{"use": "auth"}, {"use": "ratelimit", "limit": "1/hour", "who": "free"}])
    paid = {**FREE, "model": "openai/gpt-5.4"}
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=paid, headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200 and "X-RateLimit-Remaining" not in resp.headers


async def test_who_free_limits_key_holders_too(kilo, account):
    key = account()
    client = await kilo(pipeline=[{"use": "auth"}, {"use": "ratelimit", "limit": "2/hour", "who": "free"}])
    statuses = await burst(client, 3, {"Authorization": f"Bearer {key}"})
    assert sorted(statuses) == [200, 200, 429]


async def test_retry_after_only_when_turned_on(kilo):
    client = await kilo(pipeline=[{"use": "ratelimit", "limit": "1/hour", "retry_after": True}])
    await burst(client, 1, {})
    resp = await client.post("/v1/chat/completions", json=FREE)
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= 3600


async def test_two_gateways_share_one_redis_limit(gateway, aiohttp_client, upstream, redis_url, store_url):
    ip = f"2001:db8:{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}::1"  # a fresh /64: the server may be shared between runs
    cfg = dict(limits={"storage": redis_url}, server={"trusted_proxies": ["127.0.0.0/8"]},
               keys={"db": store_url}, pipeline=[{"use": "auth"}, {"use": "ratelimit"}])
    first, second = await gateway(**cfg), await gateway(**cfg)
    statuses = await asyncio.gather(burst(first, 150, from_ip(ip)), burst(second, 150, from_ip(ip)))
    flat = statuses[0] + statuses[1]
    assert flat.count(200) == 200
    assert flat.count(429) == 100


def test_memory_storage_with_several_workers_is_refused():
    cfg = make_config(server={"workers": 2})
    with pytest.raises(ConfigError, match=r"multiply the limit; set \[limits\] storage = \"redis://"):
        create_app(cfg, {})


def test_redis_storage_with_several_workers_is_accepted(redis_url):
    create_app(make_config(server={"workers": 2}, limits={"storage": redis_url}), {})


def test_keys_are_the_ones_limits_builds():
    """Instances of other versions (or limits' own strategies) sharing a Redis count the same keys."""
    from limits import parse

    from plugins.ratelimit import _Window

    hourly = parse("200/hour")
    for ip in ("198.51.100.7", "2001:db8::/64"):
        assert _Window(hourly, "free").key(ip) == hourly.key_for("free", ip)


async def test_a_refusal_after_the_count_still_carries_the_limit_headers(kilo, unused_tcp_port):
    """Counted when the request starts (as the real gateway does): what failed later says what is left."""
    client = await kilo(env={"OPENROUTER_BASE_URL": f"http://127.0.0.1:{unused_tcp_port}"}, upstream={"retries": 0})
    resp = await client.post("/v1/chat/completions", json=FREE, headers=from_ip("198.51.100.9"))
    assert resp.status == 502
    assert (resp.headers["X-RateLimit-Limit"], resp.headers["X-RateLimit-Remaining"]) == ("200", "199")
    assert resp.headers["X-Request-Id"]


async def test_a_request_no_provider_can_serve_is_not_counted(kilo):
    """Before: a 503 provider_not_configured used up one of the anonymous caller's 200."""
    pipeline = [{"use": "auth"}, {"use": "ratelimit", "limit": "2/hour"}]
    client = await kilo(env={"OPENROUTER_API_KEY": ""}, pipeline=pipeline)  # the free model's provider has no key
    for _ in range(3):
        resp = await client.post("/v1/chat/completions", json=FREE, headers=from_ip("198.51.100.10"))
        assert resp.status == 503 and (await resp.json())["error_type"] == "provider_not_configured"
        assert "X-RateLimit-Remaining" not in resp.headers


async def test_the_daily_cap_keeps_counters_not_an_entry_per_request():
    """An IP at its hourly limit all day would otherwise leave 4,800 entries in memory (or Redis)."""
    from types import SimpleNamespace

    from plugins.ratelimit import RateLimit
    from proxy.limitstore import SweptMemoryStorage

    storage = SweptMemoryStorage()
    stage = RateLimit(storage, limit="50/hour", daily_limit="45/day")

    async def served(ctx):
        return "served"

    answers = []
    for _ in range(48):
        ctx = SimpleNamespace(model=SimpleNamespace(free=True), account=None, client_ip="198.51.100.40",
                              response_headers={})
        try:
            answers.append(await stage(ctx, served))
        except GatewayError as exc:
            answers.append(exc.status)
    assert answers == ["served"] * 45 + [401] * 3  # the hourly window (50) counted all 48
    assert [len(entries) for entries in storage.events.values()] == [48]  # the hourly window's only
    assert sorted(storage.storage.values()) == [45]  # the daily cap: one counter for this day


@pytest.mark.parametrize("limit, daily, counted", [("200/hour", "10000/day", False), ("500/hour", "10000/day", True),
                                                   ("50/hour", "45/day", True), ("10/minute", "28800/day", False)])
async def test_a_daily_cap_the_window_can_never_reach_is_not_counted(limit, daily, counted):
    """The daily cap counts admitted requests: where the hourly window admits too few to reach it
    (at most two days' worth weigh in), it cannot refuse anything, and is not counted (with Redis,
    a round trip a request saved)."""
    from types import SimpleNamespace

    from plugins.ratelimit import RateLimit
    from proxy.limitstore import SweptMemoryStorage

    storage = SweptMemoryStorage()
    stage = RateLimit(storage, limit=limit, daily_limit=daily)

    async def served(ctx):
        return "served"

    for _ in range(3):
        ctx = SimpleNamespace(model=SimpleNamespace(free=True), account=None, client_ip="198.51.100.41",
                              response_headers={})
        assert await stage(ctx, served) == "served"
    assert any("promo" in key for key in storage.storage) is counted
