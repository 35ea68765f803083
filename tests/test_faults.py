"""Faults injected for real: upstreams that refuse, reset, hang, fail, break mid-stream; clients that
leave. Each test checks the status, the body and what the upstream saw."""

from __future__ import annotations

import asyncio
import os
import time

from structlog.testing import capture_logs

from tests.fakes import stream_events
from tests.plugins.providers.helpers import chunks_of
from tests.test_forward import STREAM, open_raw

FAST = {"retries": 2, "backoff": 0.01, "backoff_max": 0.02}
PAID = "openai/gpt-5.4"


def chat(model: str = PAID, stream: bool = False, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


async def test_connection_reset_before_answer_is_retried_then_502(gateway, upstream):
    upstream.faults = ["reset", "reset", "reset"]
    client = await gateway(upstream=FAST)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 502
    body = await resp.json()
    assert body["error_type"] == "upstream_error" and "could not be reached" in body["message"]
    assert len(upstream.seen) == 3  # the first try and two retries


async def test_read_timeout_before_first_byte_is_504(gateway, upstream):
    upstream.faults, upstream.hang = ["hang"], 5
    client = await gateway(upstream={**FAST, "read_timeout": 0.3})
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 504 and (await resp.json())["error_type"] == "upstream_timeout"
    assert time.monotonic() - started < 3
    assert len(upstream.seen) == 1  # a slow provider is not asked again


async def test_429_then_success_honours_retry_after(gateway, upstream):
    upstream.mode, upstream.usage = "usage", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    upstream.faults, upstream.retry_after = [429], "0.2"
    client = await gateway(upstream=FAST)
    with capture_logs() as logs:
        started = time.monotonic()
        resp = await client.post("/v1/chat/completions", json=chat())
        assert resp.status == 200
        waited = time.monotonic() - started
    assert waited >= 0.2  # the upstream's Retry-After, not the 10 ms back-off
    line = next(e for e in logs if e["event"] == "request")
    assert line["retries"] == 1 and line["status"] == 200


async def test_retry_after_is_capped(gateway, upstream):
    upstream.mode, upstream.usage = "usage", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    upstream.faults, upstream.retry_after = [503], "3600"
    client = await gateway(upstream={**FAST, "retry_after_max": 0.1})
    started = time.monotonic()
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200
    assert time.monotonic() - started < 2


async def test_5xx_falls_back_to_the_requests_models(gateway, upstream):
    upstream.mode, upstream.usage = "usage", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    upstream.faults = [500, 500, 500]
    client = await gateway(upstream=FAST)
    with capture_logs() as logs:
        resp = await client.post("/v1/chat/completions", json=chat(models=["no/such-model", "openai/gpt-5.4-mini"]))
    assert resp.status == 200
    assert (await resp.json())["model"] == "openai/gpt-5.4-mini"  # names the model that answered
    assert [s.body["model"] for s in upstream.seen] == ["openai/gpt-5.4"] * 3 + ["openai/gpt-5.4-mini"]
    assert all("models" not in s.body for s in upstream.seen)
    line = next(e for e in logs if e["event"] == "request")
    assert line["fallbacks"] == ["openai/gpt-5.4-mini"] and line["model"] == "openai/gpt-5.4-mini"


async def test_configured_fallbacks_and_the_last_error(gateway, upstream):
    upstream.faults = [503] * 6
    client = await gateway(upstream={**FAST, "fallbacks": {PAID: ["openai/gpt-5.4-mini"]}})
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 503  # every try failed: the client gets the last upstream answer
    assert [s.body["model"] for s in upstream.seen] == ["openai/gpt-5.4"] * 3 + ["openai/gpt-5.4-mini"] * 3


async def test_anonymous_caller_cannot_fall_back_to_a_paid_model(kilo, upstream):
    upstream.faults = [500] * 3
    client = await kilo(upstream=FAST)
    resp = await client.post("/v1/chat/completions", json=chat("minimax/minimax-m2.5:free", models=[PAID]))
    assert resp.status == 500
    assert {s.body["model"] for s in upstream.seen} == {"minimax/minimax-m2.5:free"}


async def test_invalid_json_from_a_translated_upstream_is_502(gateway, upstream):
    upstream.replay_body = "not json at all"  # json_response of a str: valid JSON, wrong shape
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat("anthropic/claude-sonnet-4.6"))
    assert resp.status == 502 and (await resp.json())["error_type"] == "upstream_error"


async def test_passthrough_stream_cut_mid_way(gateway, upstream):
    events = stream_events(PAID, None, words=5)
    upstream.mode, upstream.raw, upstream.cut = "raw", b"".join(events[:4]), 1
    client = await gateway()
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    docs, others = chunks_of(await resp.read())
    assert docs[-1]["choices"][0]["finish_reason"] == "error" and docs[-1]["error"]["code"] == 502
    assert others[-1] == b"data: [DONE]"
    assert [d["choices"][0]["delta"].get("content") for d in docs[1:4]] == ["word0 ", "word1 ", "word2 "]


async def test_keepalive_while_waiting_and_between_chunks(gateway, upstream):
    upstream.faults, upstream.hang = ["hang"], 0.45
    upstream.mode, upstream.usage, upstream.delay = "usage", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, 0.35
    client = await gateway(upstream={**FAST, "keepalive_interval": 0.1})
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    raw = await resp.read()
    assert resp.status == 200
    first_data = raw.index(b"data: ")
    assert raw[:first_data].count(b": keep-alive\n\n") >= 2  # while the upstream said nothing
    assert raw[first_data:].count(b": keep-alive\n\n") >= 1  # between slow chunks
    docs, others = chunks_of(raw)
    assert others[-1] == b"data: [DONE]" and docs[-1]["usage"]["total_tokens"] == 2


async def test_failure_after_keepalives_arrives_as_error_chunk(gateway, upstream):
    upstream.faults, upstream.hang, upstream.status = ["hang"], 0.3, 503  # silence, then 503
    client = await gateway(upstream={**FAST, "keepalive_interval": 0.1, "retries": 0})
    resp = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.status == 200  # committed before the upstream answered
    raw = await resp.read()
    assert raw.startswith(b": keep-alive\n\n")
    docs, others = chunks_of(raw)
    assert docs[-1]["choices"][0]["finish_reason"] == "error" and docs[-1]["error"]["code"] == 503
    assert others[-1] == b"data: [DONE]"


async def test_client_leaving_before_first_byte_cancels_the_upstream(gateway, upstream):
    upstream.faults, upstream.hang = ["hang"], 30
    client = await gateway()
    reader, writer = await open_raw(client, STREAM)
    while not upstream.seen:
        await asyncio.sleep(0.01)
    writer.transport.abort()
    left = time.monotonic()
    while not upstream.closed_at and time.monotonic() - left < 5:
        await asyncio.sleep(0.01)
    assert upstream.closed_at and upstream.closed_at - left < 1


async def test_2000_abandoned_streams_leak_nothing(gateway, upstream):
    upstream.mode, upstream.usage, upstream.delay = "usage", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, 0.5
    upstream.hang = 30
    client = await gateway()
    for _ in range(20):  # warm up: the pool and the loop's own tasks
        await (await client.post("/v1/chat/completions", json=chat())).read()
    await asyncio.sleep(0.2)
    tasks, fds = len(asyncio.all_tasks()), len(os.listdir("/proc/self/fd"))

    async def abandon(n: int, before_first_byte: bool) -> None:
        tag = f"t{n}"
        reader, writer = await open_raw(client, {**STREAM, "fault": "hang", "tag": tag} if before_first_byte else STREAM)
        if before_first_byte:
            while tag not in upstream.tags:  # leave once the upstream is waiting on our request
                await asyncio.sleep(0.01)
        else:
            await reader.readuntil(b"data: ")
        writer.transport.abort()

    started = upstream.started
    for batch in range(20):
        await asyncio.gather(*(abandon(batch * 100 + i, i % 2 == 0) for i in range(100)))
    deadline = time.monotonic() + 15
    while (upstream.ended - started < 2000 or len(asyncio.all_tasks()) > tasks) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert upstream.started - started == 2000
    assert upstream.ended - started == 2000  # the upstream saw every connection end
    assert len(asyncio.all_tasks()) <= tasks
    assert len(os.listdir("/proc/self/fd")) <= fds + 5


async def test_connect_timeout_is_504(gateway):
    """A listener whose accept queue is full drops new SYNs: the connection never opens."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        client = await gateway(env={"OPENROUTER_BASE_URL": f"http://127.0.0.1:{port}"},
                               upstream={**FAST, "connect_timeout": 0.3, "retries": 0})
        resp = await client.post("/v1/chat/completions", json=chat())
        assert resp.status == 504
        assert (await resp.json())["error_type"] == "upstream_timeout"
    finally:
        for s in fillers:
            s.close()
        listener.close()
