"""A key's own controls against the real server: budgets, requests and tokens per minute, requests
in flight, model lists after kilo-auto resolution, expiry; and the caller's view of them."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from proxy.cli import main
from proxy.store import create_key
from tests.storedb import query

SONNET = "anthropic/claude-sonnet-4.6"
USAGE = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}  # $0.00153 of Sonnet


def chat(model: str = SONNET, stream: bool = False, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": stream, **extra}


def settle(store_url: str, key_id: int, *flags: str) -> None:
    assert main(["keys", "--db", store_url, "update", str(key_id), *flags]) == 0


async def post(client, key: str, body: dict, **headers: str):
    resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}", **headers})
    await resp.read()
    return resp


async def test_the_request_that_would_cross_a_budget_is_the_first_refused(kilo, upstream, store_url):
    upstream.mode, upstream.usage = "usage", USAGE
    key = create_key(store_url, "budgeted", "10")
    settle(store_url, 1, "--budget", "0.005/day", "--budget", "1/month")
    client = await kilo()
    body = chat(max_tokens=100)  # at most $0.001623: each request is admitted only if that fits
    statuses = [(await post(client, key, body)).status for _ in range(4)]
    assert statuses == [200, 200, 200, 402]  # 3 x $0.00153 = $0.00459; a 4th could take it past $0.005
    resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    error = (await resp.json())["error"]
    assert resp.status == 402 and error["code"] == "budget_exceeded"
    assert error["budget"]["window"] == "day" and error["budget"]["limit"] == 0.005
    assert error["budget"]["spent"] == pytest.approx(0.00459)
    assert error["budget"]["resets_at"].endswith("T00:00:00Z") and "per day" in error["message"]
    assert (await post(client, key, chat("minimax/minimax-m2.5:free"))).status == 200  # free models cost nothing
    quota = (await (await client.get("/api/gateway/usage", headers={"Authorization": f"Bearer {key}"})).json())["data"]
    day, month = quota["budgets"]
    assert (day["window"], day["limit"], day["spent"]) == ("day", 0.005, pytest.approx(0.00459))
    assert day["remaining"] == pytest.approx(0.00041) and month["remaining"] == pytest.approx(1 - 0.00459)


async def test_a_sliding_budget_says_when_its_oldest_spend_leaves_it(kilo, upstream, store_url):
    upstream.mode, upstream.usage = "usage", USAGE
    key = create_key(store_url, "sliding", "10")
    settle(store_url, 1, "--budget", "0.002/24h")
    client = await kilo()
    assert (await post(client, key, chat(max_tokens=100))).status == 200
    resp = await client.post("/v1/chat/completions", json=chat(max_tokens=100), headers={"Authorization": f"Bearer {key}"})
    error = (await resp.json())["error"]
    assert resp.status == 402 and error["budget"]["sliding"] is True
    resets = time.mktime(time.strptime(error["budget"]["resets_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert 86_390 < resets - time.time() < 86_401  # a day after the one request it holds


async def test_300_concurrent_requests_on_a_50_rpm_key_admit_exactly_50(kilo, upstream, store_url):
    key = create_key(store_url, "rpm", "0")
    settle(store_url, 1, "--rpm", "50")
    client = await kilo()
    free = chat("minimax/minimax-m2.5:free")
    responses = await asyncio.gather(*(post(client, key, free) for _ in range(300)))
    statuses = [r.status for r in responses]
    assert statuses.count(200) == 50 and statuses.count(429) == 250
    refused = next(r for r in responses if r.status == 429)
    assert refused.headers["x-ratelimit-limit-requests"] == "50" and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "Retry-After" not in refused.headers
    body = json.loads(await refused.read())["error"]
    assert body["code"] == "requests_per_minute" and body["limit"] == "requests_per_minute" and body["resets_at"]


async def test_a_concurrency_limit_of_3_holds_with_20_slow_streams(kilo, upstream, store_url):
    upstream.mode, upstream.delay, upstream.usage = "usage", 0.05, USAGE
    key = create_key(store_url, "three", "10")
    settle(store_url, 1, "--concurrency", "3")
    client = await kilo()
    most_at_once, now = 0, 0

    async def one() -> int:
        nonlocal most_at_once, now
        resp = await client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=100),
                                 headers={"Authorization": f"Bearer {key}"})
        if resp.status == 200:
            now += 1
            most_at_once = max(most_at_once, now)
            await resp.read()
            now -= 1
        else:
            assert (await resp.json())["error"]["code"] == "concurrent_requests"
        return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(20)))
    assert statuses.count(200) == 3 and statuses.count(429) == 17 and most_at_once == 3
    assert upstream.started == 3
    assert [await one() for _ in range(4)] == [200] * 4  # one at a time: each frees its place


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_tokens_per_minute_count_the_usage_of_each_answer(kilo, upstream, store_url, stream):
    upstream.mode, upstream.usage = "usage", {"prompt_tokens": 400, "completion_tokens": 200, "total_tokens": 600}
    key = create_key(store_url, "tpm", "10")
    settle(store_url, 1, "--tpm", "1000")
    client = await kilo()
    first = await post(client, key, chat(stream=stream, max_tokens=200))
    assert first.status == 200 and first.headers["x-ratelimit-remaining-tokens"] == "1000"
    await asyncio.sleep(0.1)  # the first answer's 600 tokens are counted as it is recorded
    second = await post(client, key, chat(stream=stream, max_tokens=200))
    assert second.status == 200 and second.headers["x-ratelimit-remaining-tokens"] == "400"
    await asyncio.sleep(0.1)
    third = await client.post("/v1/chat/completions", json=chat(stream=stream), headers={"Authorization": f"Bearer {key}"})
    assert third.status == 429 and (await third.json())["error"]["code"] == "tokens_per_minute"
    assert third.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_model_list_applies_to_the_model_kilo_auto_chose(kilo, upstream, store_url):
    upstream.mode, upstream.usage = "usage", USAGE
    key = create_key(store_url, "claude-only", "10")
    settle(store_url, 1, "--allow", "anthropic/*", "--deny", "anthropic/claude-opus-*")
    client = await kilo()
    assert (await post(client, key, chat("kilo-auto/frontier"), **{"x-kilocode-mode": "code"})).status == 200  # Sonnet
    for model, mode in (("kilo-auto/frontier", "plan"), ("kilo-auto/balanced", "code")):  # Opus; GPT-5.3-Codex
        resp = await client.post("/v1/chat/completions", json=chat(model),
                                 headers={"Authorization": f"Bearer {key}", "x-kilocode-mode": mode})
        error = (await resp.json())["error"]
        assert resp.status == 403 and error["code"] == "model_not_allowed" and error["param"] == "model"
        assert ("anthropic/claude-opus-4.7" if mode == "plan" else "openai/gpt-5.3-codex") in error["message"]
    assert upstream.started == 1


async def test_an_expired_key_is_refused_as_a_revoked_one_is(kilo, upstream, store_url):
    key = create_key(store_url, "brief", "10")
    settle(store_url, 1, "--expires", "2020-01-01T00:00:00Z")
    client = await kilo()
    for path in ("/v1/chat/completions", "/api/v1/key", "/api/gateway/usage"):
        resp = await (client.post(path, json=chat(), headers={"Authorization": f"Bearer {key}"}) if "chat" in path
                      else client.get(path, headers={"Authorization": f"Bearer {key}"}))
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    settle(store_url, 1, "--expires", "2999-01-01T00:00:00Z")
    for _ in range(50):
        if (await post(client, key, chat("minimax/minimax-m2.5:free"))).status == 200:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("a key whose expiry moved on was still refused")


async def test_the_caller_sees_its_own_limits_and_the_ledger_reports_by_tag(kilo, upstream, store_url, capsys):
    upstream.mode, upstream.usage = "usage", USAGE
    alice, bob = create_key(store_url, "alice", "10"), create_key(store_url, "bob", "10")
    settle(store_url, 1, "--rpm", "10", "--concurrency", "2", "--tag", "team=search", "--allow", "anthropic/*",
           "--expires", "2999-01-01T00:00:00Z")
    settle(store_url, 2, "--tag", "team=ads", "--tag", "env=prod")
    client = await kilo()
    for key in (alice, bob, bob):
        assert (await post(client, key, chat(max_tokens=100))).status == 200
    quota = (await (await client.get("/api/gateway/usage", headers={"Authorization": f"Bearer {alice}"})).json())["data"]
    assert quota["limits"]["requests_per_minute"]["limit"] == 10 and quota["limits"]["requests_per_minute"]["remaining"] == 9
    assert quota["limits"]["concurrent_requests"] == {"limit": 2, "in_flight": 0}
    assert quota["models"]["allow"] == ["anthropic/*"] and quota["expires_at"] == "2999-01-01T00:00:00Z"
    assert "bob" not in json.dumps(quota)
    key = (await (await client.get("/api/v1/key", headers={"Authorization": f"Bearer {alice}"})).json())["data"]
    assert key["expires_at"] == "2999-01-01T00:00:00Z"
    await client.close()  # the rows written
    capsys.readouterr()
    assert main(["usage", "--db", store_url, "--by", "tag", "--json"]) == 0
    rows = {r["tag"]: r["requests"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {"team=search": 1, "team=ads": 2, "env=prod": 2}
    assert query(store_url, "SELECT COUNT(*) AS n FROM key_tags")[0]["n"] == 3


async def test_a_50_rpm_key_admits_exactly_50_of_300_across_two_workers_on_redis(upstream, redis_url, tmp_path, store_url):
    import aiohttp

    from tests.processes import free_port, start, wait_up

    key = create_key(store_url, "rpm", "0")
    settle(store_url, 1, "--rpm", "50")
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 2\n[limits]\nstorage = "{redis_url}"\n'
                      f'[store]\nurl = "{store_url}"\n[ledger]\njournal = "{tmp_path}/ledger"\n[logging]\nlevel = "warning"\n')
    proc = await start(config, {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url})
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            await wait_up(session, url)

            async def one() -> int:
                async with session.post(url + "/v1/chat/completions", json=chat("minimax/minimax-m2.5:free"),
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one() for _ in range(300)))
    finally:
        proc.terminate()
        await proc.communicate()
    assert statuses.count(200) == 50 and statuses.count(429) == 250


async def test_a_budget_holds_under_a_burst_of_concurrent_streams(kilo, upstream, store_url):
    """Before: only written rows counted, so 40 streams at once all passed a budget worth 8."""
    upstream.mode, upstream.delay, upstream.usage = "usage", 0.02, USAGE
    key = create_key(store_url, "burst", "10")
    settle(store_url, 1, "--budget", "0.0135/day")  # 8 requests' most ($0.001623 each)
    client = await kilo()
    statuses = [r.status for r in await asyncio.gather(*(post(client, key, chat(stream=True, max_tokens=100))
                                                         for _ in range(40)))]
    assert statuses.count(200) == 8 and statuses.count(402) == 32


async def test_hostile_settings_and_ids_are_400s_and_404s_never_500s(kilo, store_url):
    token = "hostile-admin-token"
    client = await kilo(env={"TURNSTILE_ADMIN_TOKEN": token})
    admin = {"Authorization": f"Bearer {token}"}
    for settings in ({"budgets": ["NaN/day"]}, {"budgets": ["1e400/day"]}, {"budgets": ["5/99999999999999999999d"]},
                     {"budgets": ["5/²h"]}, {"rpm": 10**17}, {"expires_at": "9999-12-31T23:59:59-14:00"},
                     {"tags": {"a=b": "c", "a": "b=c"}}):
        resp = await client.post("/admin/v1/keys", json={"name": "x", "settings": settings}, headers=admin)
        assert resp.status == 400, settings
    for name in ("", "\x1b[31mred", "a\nb", "x" * 201):
        assert (await client.post("/admin/v1/keys", json={"name": name}, headers=admin)).status == 400
    assert query(store_url, "SELECT COUNT(*) AS n FROM accounts")[0]["n"] == 0  # nothing half made
    for path in ("/admin/v1/keys/²", "/admin/v1/keys/99999999999999999999", "/admin/v1/keys/٣"):
        assert (await client.get(path, headers=admin)).status == 404, path
    for query_ in ("after=²", "limit=99999999999999999999"):
        assert (await client.get(f"/admin/v1/keys?{query_}", headers=admin)).status == 400, query_


async def test_the_quota_of_a_key_made_a_moment_ago_is_answered_at_once(kilo, store_url):
    client = await kilo(keys={"refresh_interval": 3600.0})
    key = create_key(store_url, "fresh", "1")
    settle(store_url, 1, "--rpm", "7")
    for path in ("/api/gateway/usage", "/api/v1/key"):
        resp = await client.get(path, headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200, path
    key_data = (await (await client.get("/api/v1/key", headers={"Authorization": f"Bearer {key}"})).json())["data"]
    assert key_data["rate_limit"]["requests"] == 7
