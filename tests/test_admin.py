"""The admin API: refused without its token, before any handler; a key's whole lifecycle by HTTP;
usage queries with pagination; the OpenAPI description."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.processes import free_port, start, wait_up
from tests.storedb import query

TOKEN = "adm_" + "s3cret-admin-token-value"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FREE = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def admin(kilo):
    return await kilo(env={"TURNSTILE_ADMIN_TOKEN": TOKEN})


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}], ids=["none", "wrong", "no-scheme", "basic"])
async def test_no_token_or_a_wrong_one_is_401_and_changes_nothing(admin, store_url, headers):
    for method, path in (("POST", "/admin/v1/keys"), ("GET", "/admin/v1/keys"), ("GET", "/admin/v1/openapi.json"),
                         ("POST", "/admin/v1/keys/1/balance"), ("GET", "/admin/v1/nope")):
        resp = await admin.request(method, path, json={"name": "mallory", "balance": "100"}, headers=headers)
        error = (await resp.json())["error"]
        assert resp.status == 401 and error["code"] == "invalid_admin_token", (method, path)
    assert query(store_url, "SELECT COUNT(*) AS n FROM accounts")[0]["n"] == 0


async def test_a_disabled_api_is_401_for_everyone(kilo, store_url):
    client = await kilo()  # no TURNSTILE_ADMIN_TOKEN
    for headers in ({}, ADMIN):
        resp = await client.post("/admin/v1/keys", json={"name": "x"}, headers=headers)
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "admin_disabled"
    assert query(store_url, "SELECT COUNT(*) AS n FROM accounts")[0]["n"] == 0


async def test_a_key_s_lifecycle_over_http(admin, upstream, store_url):
    upstream.mode, upstream.usage = "usage", {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
    with capture_logs() as logged:
        resp = await admin.post("/admin/v1/keys", headers=ADMIN, json={
            "name": "ci-bot", "balance": "2.5", "settings": {"rpm": 100, "budgets": ["5/day"], "tags": {"team": "search"}}})
        assert resp.status == 201
        made = await resp.json()
        key, data = made["key"], made["data"]
        assert key.startswith("tsk_") and data["key_hint"] == key[:4] + "…" + key[-4:] and data["balance"] == 2.5
        assert data["settings"] == {"budgets": ["5/day"], "rpm": 100, "tags": {"team": "search"}}
        auth = {"Authorization": f"Bearer {key}"}
        chat = {**FREE, "model": "anthropic/claude-sonnet-4.6", "max_tokens": 100}
        assert (await admin.post("/v1/chat/completions", json=chat, headers=auth)).status == 200  # at once

        for _ in range(3):
            await admin.post("/admin/v1/keys", headers=ADMIN, json={"name": "more"})
        page = await (await admin.get("/admin/v1/keys?limit=2", headers=ADMIN)).json()
        assert [k["id"] for k in page["data"]] == [1, 2] and page["next_after"] == 2
        page = await (await admin.get("/admin/v1/keys?limit=2&after=2", headers=ADMIN)).json()
        assert [k["id"] for k in page["data"]] == [3, 4] and page["next_after"] is None
        assert all("key" not in k and "key_hash" not in k for k in page["data"])

        resp = await admin.patch("/admin/v1/keys/1", headers=ADMIN, json={"name": "ci-bot-2", "settings": {
            "rpm": None, "allow": ["anthropic/*"], "expires_at": "2999-01-01T00:00:00Z"}})
        shown = (await resp.json())["data"]
        assert shown["name"] == "ci-bot-2" and shown["settings"] == {
            "budgets": ["5/day"], "allow": ["anthropic/*"], "expires_at": "2999-01-01T00:00:00Z", "tags": {"team": "search"}}
        before = shown["balance"]
        shown = (await (await admin.post("/admin/v1/keys/1/balance", headers=ADMIN, json={"add": "1.5"})).json())["data"]
        assert shown["balance"] == pytest.approx(before + 1.5)
        shown = (await (await admin.post("/admin/v1/keys/1/balance", headers=ADMIN, json={"set": 7})).json())["data"]
        assert shown["balance"] == 7

        await asyncio.sleep(0.3)  # the gateway's key reload
        assert (await admin.post("/v1/chat/completions", json={**chat, "model": "openai/gpt-5.4"}, headers=auth)).status == 403
        shown = (await (await admin.delete("/admin/v1/keys/1", headers=ADMIN)).json())["data"]
        assert shown["revoked_at"] is not None
        for _ in range(30):
            if (await admin.post("/v1/chat/completions", json=FREE, headers=auth)).status == 401:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("a key revoked over the API still works")

        await admin.app[__import__("proxy.app", fromlist=["STORE"]).STORE].flush()
        for by, field in (("model", "anthropic/claude-sonnet-4.6"), ("key", 1), ("tag", "team=search")):
            rows = (await (await admin.get(f"/admin/v1/usage?by={by}", headers=ADMIN)).json())["data"]
            assert any(r[by] == field and r["requests"] >= 1 for r in rows), (by, rows)
        day = await (await admin.get("/admin/v1/usage?by=day&limit=1&since=2020-01-01T00:00:00Z", headers=ADMIN)).json()
        assert len(day["data"]) == 1 and day["next_offset"] is None
        spec = await (await admin.get("/admin/v1/openapi.json", headers=ADMIN)).json()
        assert spec["openapi"] == "3.1.0" and "/keys/{id}/balance" in spec["paths"]
    lines = [e for e in logged if e.get("event") == "request" and e.get("path", "").startswith("/admin/")]
    assert len(lines) >= 12 and TOKEN not in json.dumps(logged, default=str) and key not in json.dumps(logged, default=str)


@pytest.mark.parametrize(("body", "param"), [
    (b"{", None), (b"[]", None), (json.dumps({"name": ""}).encode(), "name"),
    (json.dumps({"name": "x", "balance": "lots"}).encode(), "balance"),
    (json.dumps({"name": "x", "settings": {"rpm": 0}}).encode(), "settings"),
    (json.dumps({"name": "x", "settings": {"budgets": ["5/fortnight"]}}).encode(), "settings"),
    (json.dumps({"name": "x", "settings": {"colour": "red"}}).encode(), "settings"),
])
async def test_a_bad_request_is_a_400_in_the_error_shape(admin, body, param):
    resp = await admin.post("/admin/v1/keys", data=body, headers={**ADMIN, "Content-Type": "application/json"})
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == param and error["message"]


async def test_unknown_keys_and_paths_are_404(admin):
    for method, path in (("GET", "/admin/v1/keys/99"), ("PATCH", "/admin/v1/keys/abc"), ("GET", "/admin/v1/nothing")):
        resp = await admin.request(method, path, headers=ADMIN, json={})
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_a_key_created_over_the_api_works_at_once_on_every_worker(upstream, redis_url, tmp_path, store_url):
    port = free_port()
    config = tmp_path / "turnstile.toml"
    config.write_text(f'[server]\nport = {port}\nworkers = 2\n[limits]\nstorage = "{redis_url}"\n'
                      f'[store]\nurl = "{store_url}"\n[ledger]\njournal = "{tmp_path}/ledger"\n[logging]\nlevel = "warning"\n')
    env = {"OPENROUTER_API_KEY": "sk-or-test", "OPENROUTER_BASE_URL": upstream.url, "TURNSTILE_ADMIN_TOKEN": TOKEN}
    proc = await start(config, env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            await wait_up(session, url)
            async with session.post(url + "/admin/v1/keys", json={"name": "fresh"}, headers=ADMIN) as resp:
                key = (await resp.json())["key"]

            async def one() -> int:
                async with session.post(url + "/v1/chat/completions", json=FREE,
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    await resp.read()
                    return resp.status

            # new connections, spread by the kernel over both workers' sockets
            assert await asyncio.gather(*(one() for _ in range(40))) == [200] * 40
    finally:
        proc.terminate()
        await proc.communicate()
