"""The OpenAI-compatible relay: right upstream, right headers, bytes unchanged, SSE headers."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from proxy.catalog import Catalog, seed_rows
from tests.fakes import JSON_BODY, STREAM_BODY, without_cost

SEED = Catalog(seed_rows())
ROUTED = [m for m in SEED.models.values() if "openrouter" in m.routes]


def chat(model: str, stream: bool = False, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


@pytest.mark.parametrize("model", [m.id for m in ROUTED])
async def test_every_seed_model_reaches_openrouter_unchanged(gateway, upstream, model):
    client = await gateway()
    resp = await client.post("/api/gateway/chat/completions", json=chat(model))
    assert resp.status == 200
    assert without_cost(await resp.read()) == without_cost(JSON_BODY)  # only usage.cost is ours
    resp = await client.post("/api/gateway/chat/completions", json=chat(model, stream=True))
    assert resp.status == 200
    assert without_cost(await resp.read()) == without_cost(STREAM_BODY)
    assert len(upstream.seen) == 2
    for seen in upstream.seen:
        assert seen.path == "/chat/completions"
        assert seen.body["model"] == SEED.models[model].routes["openrouter"]
        assert seen.headers["Authorization"] == "Bearer sk-or-test-key"
        assert seen.headers["X-Title"] == "Turnstile"
        assert seen.headers["Content-Type"] == "application/json"
    assert upstream.seen[1].body["stream_options"] == {"include_usage": True}
    assert "stream_options" not in upstream.seen[0].body


async def test_stream_response_headers(gateway):
    client = await gateway()
    resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4", stream=True))
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Request-Id"]
    await resp.read()


async def test_unknown_keys_pass_through_and_client_stream_options_are_kept(gateway, upstream):
    client = await gateway()
    body = chat("openai/gpt-5.4", stream=True, description="from the catalog", usage={"include": True},
                stream_options={"include_obfuscation": False}, models=["a/b"])
    resp = await client.post("/v1/chat/completions", json=body)
    await resp.read()
    seen = upstream.seen[0].body
    assert seen["description"] == "from the catalog"
    assert seen["usage"] == {"include": True}
    assert seen["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert "models" not in seen  # our fallback list is not the upstream's business


async def test_upstream_error_status_and_body_are_relayed(gateway, upstream):
    upstream.status = 400
    upstream.error_body = (json.dumps({"error": {"code": 400, "message": "Provider returned error"}})).encode()
    client = await gateway()
    resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4"))
    assert resp.status == 400
    assert await resp.read() == upstream.error_body


async def test_direct_provider_preferred_when_its_key_is_set(gateway, upstream):
    client = await gateway(env={"OPENAI_API_KEY": "sk-openai", "OPENAI_BASE_URL": upstream.url})
    resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4"))
    assert resp.status == 200
    await resp.read()
    assert upstream.seen[0].body["model"] == "gpt-5.4"
    assert upstream.seen[0].headers["Authorization"] == "Bearer sk-openai"
    # Anthropic's own adapter is not configured: Claude still goes through OpenRouter.
    resp = await client.post("/v1/chat/completions", json=chat("anthropic/claude-sonnet-4.6"))
    await resp.read()
    assert upstream.seen[1].body["model"] == "anthropic/claude-sonnet-4.6"
    assert upstream.seen[1].headers["Authorization"] == "Bearer sk-or-test-key"


async def test_model_without_configured_provider_names_the_variable(gateway):
    client = await gateway(env={"OPENROUTER_API_KEY": ""})
    resp = await client.post("/v1/chat/completions", json=chat("x-ai/grok-4"))
    assert resp.status == 503
    body = await resp.json()
    assert body["error_type"] == "provider_not_configured"
    assert "XAI_API_KEY" in body["error"]["message"] and "OPENROUTER_API_KEY" in body["error"]["message"]


async def test_unreachable_upstream_is_502(gateway, unused_tcp_port):
    client = await gateway(env={"OPENROUTER_BASE_URL": f"http://127.0.0.1:{unused_tcp_port}"})
    resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4"))
    assert resp.status == 502
    body = await resp.json()
    assert body["error_type"] == "upstream_error"
    assert "sk-or-test-key" not in json.dumps(body)


async def test_small_json_answer_goes_out_whole_with_its_length(gateway, upstream):
    client = await gateway()
    resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4"))
    body = await resp.read()
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["Content-Length"]) == len(body) and "Transfer-Encoding" not in resp.headers
    assert json.loads(body)["usage"]["cost"] > 0 and resp.headers["X-Request-Id"]


async def test_large_json_answer_is_relayed_as_it_arrives(gateway, upstream):
    doc = json.loads(JSON_BODY)
    doc["choices"][0]["message"]["content"] = "word " * 20_000  # 100 KB: more than the meter holds
    upstream.mode, upstream.raw_json = "raw", json.dumps(doc).encode()
    client = await gateway()
    resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4"))
    got = json.loads(await resp.read())
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    assert got["choices"] == doc["choices"] and got["usage"]["cost"] > 0


async def test_upstream_cookies_are_not_kept_or_sent_back(gateway, upstream):
    upstream.cookie = "session=abc123; Path=/"
    client = await gateway(env={"OPENROUTER_BASE_URL": upstream.url.replace("127.0.0.1", "localhost")})  # a jar keeps no IP's cookies
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4"))
        assert resp.status == 200
        assert "Set-Cookie" not in resp.headers  # nor passed on to our caller
    assert all("Cookie" not in seen.headers for seen in upstream.seen)
    assert upstream.seen[0].headers["User-Agent"] == "turnstile"


async def test_json_answer_cut_short_is_a_clean_502(gateway, aiohttp_server):
    async def short(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"id": "chatcmpl-1", ')
        await asyncio.sleep(0.05)
        request.transport.abort()
        return resp

    app = web.Application()
    app.router.add_post("/chat/completions", short)
    server = await aiohttp_server(app)
    client = await gateway(env={"OPENROUTER_BASE_URL": str(server.make_url(""))})
    resp = await client.post("/v1/chat/completions", json=chat("openai/gpt-5.4"))
    assert resp.status == 502
    body = await resp.json()
    assert body["error_type"] == "upstream_error" and "stopped mid-answer" in body["error"]["message"]


async def test_translated_stream_goes_out_in_one_write_per_upstream_read(gateway, upstream, monkeypatch):
    from proxy.provider import EventTranslation
    from proxy.reply import Reply
    from tests.fakes import fixture_lines

    reads, writes = [], []
    real_feed, real_write = EventTranslation.feed, Reply._write

    def counted_feed(self, chunk):
        reads.append(chunk)
        return real_feed(self, chunk)

    async def counted_write(self, data, answer=True):
        writes.append(data)
        await real_write(self, data, answer)

    monkeypatch.setattr(EventTranslation, "feed", counted_feed)
    monkeypatch.setattr(Reply, "_write", counted_write)
    upstream.replay, upstream.one_write = fixture_lines("anthropic-messages-stream-text.jsonl"), True
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat("anthropic/claude-sonnet-4.6", stream=True))
    body = await resp.read()
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert resp.status == 200 and body.endswith(b"data: [DONE]\n\n") and len(events) >= 5
    assert b"".join(writes) == body
    assert len(writes) <= len(reads) + 1 < len(events)  # one per read (and the end), not one per event


async def test_translated_stream_cut_short_keeps_what_was_translated(gateway, upstream):
    from tests.fakes import fixture_lines

    upstream.replay, upstream.one_write = fixture_lines("anthropic-messages-stream-text.jsonl"), True
    upstream.cut = 5  # the connection drops after five events
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat("anthropic/claude-sonnet-4.6", stream=True))
    body = await resp.read()
    events = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    assert resp.status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(e["choices"][0]["delta"].get("content") for e in events[:-1])  # the text before the break
    assert events[-1]["error"]["code"] == 502 and events[-1]["choices"][0]["finish_reason"] == "error"
