"""The client's side of a chat request (proxy/reply.py): keep-alives only where they belong, the real
status of an upstream error, and no reference cycle left by a refusal or a broken answer."""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter

from aiohttp import web

from tests.fakes import completion
from tests.test_cycles import ours

USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def chat(stream: bool = False, **extra: object) -> dict:
    return {"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def slow_json_upstream(aiohttp_server, body: bytes, cut: int, gap: float, status: int = 200, abort: bool = False):
    """Answers its headers at once, then `body` in two writes `gap` seconds apart (or breaks off)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        if abort:
            resp.content_length = len(body) + 1000
        await resp.prepare(request)
        await resp.write(body[:cut])
        await asyncio.sleep(gap)
        if abort:
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(body[cut:])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/chat/completions", handler)
    return str((await aiohttp_server(app)).make_url(""))


async def test_a_json_answer_to_a_stream_request_gets_no_keep_alive(gateway, aiohttp_server):
    """An upstream may answer `stream: true` with JSON. Keep-alives are for the wait and for event
    streams: within a JSON body, they made it unreadable (found in review)."""
    for size in (100, 40_000):
        doc = completion("gpt-5.4", USAGE)
        doc["choices"][0]["message"]["content"] = "x" * size
        body = json.dumps(doc).encode()
        url = await slow_json_upstream(aiohttp_server, body, cut=len(body) * 3 // 4, gap=0.35)
        client = await gateway(env={"OPENROUTER_BASE_URL": url}, upstream={"keepalive_interval": 0.1, "retries": 0})
        resp = await client.post("/v1/chat/completions", json=chat(stream=True))
        raw = await resp.read()
        assert b": keep-alive" not in raw and resp.headers["Content-Type"].startswith("application/json")
        assert json.loads(raw)["choices"][0]["message"]["content"] == "x" * size


async def test_a_slow_upstream_error_body_keeps_its_status(gateway, aiohttp_server):
    """The error's headers came before the first keep-alive, its body after: the caller gets the 400,
    not a 200 with an error chunk (found in review)."""
    body = b'{"error": {"message": "bad request", "code": 400}}'
    url = await slow_json_upstream(aiohttp_server, body, cut=10, gap=0.35, status=400)
    client = await gateway(env={"OPENROUTER_BASE_URL": url}, upstream={"keepalive_interval": 0.2, "retries": 0})
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 400 and json.loads(await resp.read())["error"]["message"] == "bad request"


async def left_behind(client, body: dict) -> tuple[int, Counter]:
    """The status of one request, and the gateway's objects that only the cycle collector would free."""
    await (await client.post("/v1/chat/completions", json=body)).read()  # warm up
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        resp = await client.post("/v1/chat/completions", json=body)
        await resp.read()
        gc.collect()
        return resp.status, Counter(filter(None, map(ours, gc.garbage)))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_a_refused_request_leaves_no_cycle(gateway, upstream):
    upstream.faults = ["reset"] * 10
    client = await gateway(upstream={"retries": 0})
    status, left = await left_behind(client, chat())
    assert status == 502 and not left, left


async def test_a_json_answer_that_breaks_off_leaves_no_cycle(gateway, aiohttp_server):
    url = await slow_json_upstream(aiohttp_server, b'{"id": "x", ', cut=12, gap=0.05, abort=True)
    client = await gateway(env={"OPENROUTER_BASE_URL": url}, upstream={"retries": 0})
    status, left = await left_behind(client, chat())
    assert status == 502 and not left, left
