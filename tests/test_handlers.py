"""Routes and request validation: every refusal is a documented status in the superset error shape."""

from __future__ import annotations

import json

import pytest

from proxy.app import BASES

OK = {"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "hi"}]}


def assert_error_shape(body: dict, status: int, error_type: str) -> None:
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error_type"] == error_type
    assert body["message"] == body["error"]["message"]
    assert {"type", "code", "param"} <= body["error"].keys()


BAD = [
    ("not json", b"{'model': nope", 400, "invalid_request"),
    ("truncated json", b'{"model": "openai/gpt-5.4", "messages": [', 400, "invalid_request"),
    ("json array", b"[1, 2]", 400, "invalid_request"),
    ("invalid utf-8", b'{"model": "\xff\xfe", "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request"),
    ("model missing", json.dumps({"messages": OK["messages"]}).encode(), 404, "model_not_found"),
    ("model empty", json.dumps({**OK, "model": ""}).encode(), 404, "model_not_found"),
    ("model not a string", json.dumps({**OK, "model": 42}).encode(), 404, "model_not_found"),
    ("model unknown", json.dumps({**OK, "model": "nobody/nothing"}).encode(), 404, "model_not_found"),
    ("messages missing", json.dumps({"model": "openai/gpt-5.4"}).encode(), 400, "invalid_request"),
    ("messages not a list", json.dumps({**OK, "messages": "hi"}).encode(), 400, "invalid_request"),
    ("messages empty", json.dumps({**OK, "messages": []}).encode(), 400, "invalid_request"),
    ("stream not a bool", json.dumps({**OK, "stream": "yes"}).encode(), 400, "invalid_request"),
]


@pytest.mark.parametrize("name, raw, status, error_type", BAD, ids=[b[0] for b in BAD])
async def test_bad_request(gateway, upstream, name, raw, status, error_type):
    """Each refusal for its own reason: the body of every JSON case but the broken ones is otherwise valid."""
    client = await gateway()
    resp = await client.post("/api/gateway/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == status
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Request-Id"]
    body = await resp.json()
    assert_error_shape(body, status, error_type)
    if name in ("not json", "truncated json", "invalid utf-8"):
        assert body["error"]["code"] == "invalid_json"
    assert upstream.seen == []


async def test_malformed_json_message_names_the_parser_error(gateway):
    client = await gateway()
    resp = await client.post("/v1/chat/completions", data=b"{nope")
    body = await resp.json()
    assert body["message"].startswith("Request body is not valid JSON: ")


async def test_body_over_the_limit_is_413(gateway, upstream):
    client = await gateway(server={"max_body_bytes": 64 * 1024})
    big = {**OK, "messages": [{"role": "user", "content": "x" * (65 * 1024)}]}
    resp = await client.post("/v1/chat/completions", json=big)
    assert resp.status == 413
    assert_error_shape(await resp.json(), 413, "request_too_large")
    assert upstream.seen == []


async def test_default_body_limit_is_4_mib(gateway):
    client = await gateway()
    big = {**OK, "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024)}]}
    resp = await client.post("/v1/chat/completions", json=big)
    assert resp.status == 413


async def test_unknown_path_is_404_in_error_shape(gateway):
    client = await gateway()
    for path in ("/", "/v1/completions", "/api/gateway/responses", "/api/gateway/chat/completions/x"):
        resp = await client.post(path, json=OK)
        assert resp.status == 404, path
        assert_error_shape(await resp.json(), 404, "not_found")


async def test_wrong_method_is_405(gateway):
    client = await gateway()
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert_error_shape(await resp.json(), 405, "method_not_allowed")
    resp = await client.post("/v1/models", json={})
    assert resp.status == 405


@pytest.mark.parametrize("base", BASES)
async def test_every_base_serves_chat_and_models(gateway, base):
    client = await gateway()
    resp = await client.post(base + "/chat/completions", json=OK)
    assert resp.status == 200
    await resp.read()
    resp = await client.get(base + "/models")
    assert resp.status == 200
    assert (await resp.json())["data"]


async def test_healthz(gateway):
    client = await gateway()
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json()) == {"status": "ok"}
