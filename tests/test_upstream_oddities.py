"""Found by a second review of the request path: an upstream sending odd or broken answers, and a
client leaving at the last moment, never make a 500, a lost usage or a duplicated [DONE]."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from proxy.app import STORE
from tests.storedb import ledger_rows
from tests.fakes import fixture_lines
from tests.test_forward import STREAM, open_raw


def chat(model="openai/gpt-5.4", stream=False, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def raw_upstream(aiohttp_server, writes, content_type="text/event-stream", gap=0.02, abort=False, path="/chat/completions"):
    async def handler(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        for w in writes:
            await resp.write(w)
            await asyncio.sleep(gap)
        if abort:
            request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post(path, handler)
    app.router.add_post("/v1/messages", handler)
    app.router.add_post("/models/{action}", handler)
    return str((await aiohttp_server(app)).make_url(""))


DEEP = b'"usage":{"prompt_tokens":1,"completion_tokens":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}"


async def test_deeply_nested_usage_in_a_stream_is_not_a_500(gateway, aiohttp_server):
    event = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}],' + DEEP + b"}\n\n"
    url = await raw_upstream(aiohttp_server, [event, b"data: [DONE]\n\n"])
    client = await gateway(env={"OPENROUTER_BASE_URL": url}, upstream={"retries": 0})
    with capture_logs() as logs:
        resp = await client.post("/v1/chat/completions", json=chat(stream=True))
        await resp.read()
    assert not [l for l in logs if l["event"] == "unhandled_error"], logs


async def test_deeply_nested_usage_in_a_json_answer_is_not_a_500(gateway, aiohttp_server):
    body = b'{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],' + DEEP + b"}"
    url = await raw_upstream(aiohttp_server, [body], content_type="application/json")
    client = await gateway(env={"OPENROUTER_BASE_URL": url}, upstream={"retries": 0})
    with capture_logs() as logs:
        resp = await client.post("/v1/chat/completions", json=chat())
        await resp.read()
    assert resp.status != 500 and not [l for l in logs if l["event"] == "unhandled_error"]


async def test_ipv4_mapped_forwarded_clients_do_not_share_one_bucket(kilo):
    client = await kilo(server={"trusted_proxies": ["127.0.0.0/8"]})
    free = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}]}
    left = []
    for ip in ("::ffff:198.51.100.1", "::ffff:203.0.113.9"):
        resp = await client.post("/v1/chat/completions", json=free, headers={"X-Forwarded-For": ip})
        await resp.read()
        left.append(int(resp.headers["X-RateLimit-Remaining"]))
    assert left == [199, 199]  # two different IPv4 clients; got [199, 198]: both in ::/64


async def test_done_then_broken_upstream_sends_done_once(gateway, aiohttp_server, store_url):
    events = [b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n',
              b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n',
              b"data: [DONE]\n\n"]
    url = await raw_upstream(aiohttp_server, events, abort=True)
    client = await gateway(env={"OPENROUTER_BASE_URL": url}, upstream={"retries": 0})
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    body = await resp.read()
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert body.count(b"data: [DONE]") == 1, body
    assert row["status"] == 200


async def test_gemini_error_body_with_odd_details_is_not_a_500(gateway, upstream):
    upstream.status = 400
    upstream.error_body = b'{"error": {"code": 400, "message": "bad", "details": 5}}'
    client = await gateway(native=True, upstream={"retries": 0})
    with capture_logs() as logs:
        resp = await client.post("/v1/chat/completions", json=chat("google/gemini-3.1-pro-preview"))
        await resp.read()
    assert resp.status == 400 and not [l for l in logs if l["event"] == "unhandled_error"], resp.status


def test_reasoning_alias_crlf_stream():
    from types import SimpleNamespace
    from plugins.providers.openai import OpenAICompatible

    p = OpenAICompatible(name="deepseek", base_url="http://x", reasoning_alias=True)
    ctx = SimpleNamespace(body={}, stream=True)
    ev = b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"think"}}]}\r\n\r\n'
    t = p.translation(ctx, "text/event-stream")
    first = t.feed(ev)
    assert first, "a whole CRLF event is held back (the whole stream is buffered to its end)"
    assert b'"reasoning":"think"' in first + t.end()[0]



@pytest.mark.parametrize("model,fixture", [("anthropic/claude-sonnet-4.6", "anthropic-messages-stream-text.jsonl"),
                                           ("google/gemini-3.1-pro-preview", "gemini-stream-text-thought-signature.jsonl")])
async def test_translated_stream_usage_billed_without_include_usage(gateway, upstream, store_url, model, fixture):
    upstream.replay = fixture_lines(fixture)
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(model, stream=True))
    body = await resp.read()
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert body.count(b"[DONE]") == 1 and b'"usage"' not in body
    assert row["estimated"] == 0 and row["prompt_tokens"] > 0, row


async def test_usage_kept_when_the_client_leaves_at_the_last_write(gateway, upstream, store_url, monkeypatch):
    """The client is gone when [DONE] is written: the translator had the usage; the old code observed it
    before writing."""
    from proxy.reply import Reply
    real = Reply._write

    async def write(self, data, answer=True):
        if data.endswith(b"data: [DONE]\n\n"):
            self.ctx.request.transport.close()  # the client is gone: this write fails
        await real(self, data, answer)

    monkeypatch.setattr(Reply, "_write", write)
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat("anthropic/claude-sonnet-4.6", stream=True))
    with contextlib.suppress(Exception):
        await resp.read()
    await asyncio.sleep(0.1)
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert row["status"] == 499
    assert (row["estimated"], row["prompt_tokens"], row["completion_tokens"]) == (0, 12, 30), row



@pytest.mark.parametrize("stream", [True, False])
async def test_client_gone_before_the_upstream_answers_is_a_499_not_a_500(gateway, upstream, store_url, stream):
    upstream.faults, upstream.hang = ["hang"], 0.3
    client = await gateway(upstream={"retries": 0, "keepalive_interval": 0})
    with capture_logs() as logs:
        reader, writer = await open_raw(client, {**STREAM, "stream": stream})
        await asyncio.sleep(0.05)
        writer.transport.abort()
        await asyncio.sleep(0.6)
        await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    bad = [l for l in logs if l["event"] == "unhandled_error"]
    assert not bad and row["status"] == 499, (row["status"], bad)
