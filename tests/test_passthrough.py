"""Messages and Responses passed through where the upstream speaks them (Anthropic, OpenRouter, OpenAI):
the request as it came with only its model changed, the answer relayed byte for byte, usage read from
the dialect's own events and billed."""

from __future__ import annotations

import json

import anthropic
import openai

from proxy.app import STORE
from tests.fakes import fixture_lines
from tests.storedb import balance, ledger_rows

SONNET = "anthropic/claude-sonnet-4.6"
# A history whose thinking block must reach Anthropic exactly as the client sent it: odd spacing,
# an escaped character and a signature, none of which a re-serialisation would keep.
HISTORY = (b'{"model" :  "claude-sonnet-4-6", "max_tokens": 1000, "stream": true, "messages": [\n'
           b' {"role": "user", "content": "Weather in Paris?"},\n'
           b' {"role": "assistant", "content": [{"type": "thinking", "thinking": "caf\\u00e9 \\/ ok",'
           b' "signature": "EqQBCkYIBxgCKkBsig=="}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather",'
           b' "input": {"city": "Paris"}}]},\n'
           b' {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}]}]}')


def events_of(name: str) -> bytes:
    """A recorded stream as the fake upstream frames it."""
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n"
                    for e in fixture_lines(name))


async def test_messages_to_openrouter_go_as_they_came_and_come_back_byte_for_byte(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-thinking-signature-text.jsonl")
    client = await gateway()
    resp = await client.post("/api/openrouter/messages?beta=true", data=HISTORY, headers={
        "x-api-key": "client-key", "anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14",
        "Content-Type": "application/json"})
    body = await resp.read()
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    assert body == events_of("anthropic-messages-stream-thinking-signature-text.jsonl")
    (seen,) = upstream.seen
    assert seen.path == "/messages"
    assert seen.raw == HISTORY.replace(b'"claude-sonnet-4-6"', b'"anthropic/claude-sonnet-4.6"')
    assert seen.headers["Authorization"] == "Bearer sk-or-test-key" and "x-api-key" not in seen.headers
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"


async def test_messages_to_anthropic_with_the_sdk_billed_from_message_start_and_delta(kilo, upstream, account, store_url):
    upstream.replay = fixture_lines("anthropic-messages-stream-tool-use.jsonl")
    key = account("alice", "10")
    client = await kilo(native=True)
    api = anthropic.AsyncAnthropic(base_url=str(client.make_url("/api/gateway")), api_key=key, max_retries=0)
    try:
        async with api.messages.stream(model="claude-sonnet-4-6", max_tokens=1000, messages=[
                {"role": "user", "content": "Weather in Paris?"}], tools=[{
                    "name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]) as s:
            final = await s.get_final_message()
    finally:
        await api.close()
    assert final.stop_reason == "tool_use" and final.content[-1].type == "tool_use" and final.content[-1].input
    (seen,) = upstream.seen
    assert seen.path == "/v1/messages" and seen.body["model"] == "claude-sonnet-4-6"
    assert seen.headers["x-api-key"] == "sk-ant-test-key" and "Authorization" not in seen.headers
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    start = fixture_lines("anthropic-messages-stream-tool-use.jsonl")[0]["message"]["usage"]
    delta = [e for e in fixture_lines("anthropic-messages-stream-tool-use.jsonl") if e["type"] == "message_delta"][-1]
    prompt = start["input_tokens"] + start.get("cache_read_input_tokens", 0) + start.get("cache_creation_input_tokens", 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, delta["usage"]["output_tokens"])
    assert row["provider"] == "anthropic" and row["estimated"] == 0 and row["cost_micros"] > 0
    assert balance(store_url) == 10_000_000 - row["cost_micros"]


async def test_frontier_on_messages_gets_adaptive_thinking_and_medium_effort(kilo, upstream, account):
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    key = account("alice", "10")
    client = await kilo()
    resp = await client.post("/api/openrouter/messages", headers={"x-api-key": key, "Authorization": f"Bearer {key}"},
                             json={"model": "kilo-auto/frontier", "max_tokens": 8192, "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200 and (await resp.read()).endswith(b'"message_stop"}\n\n')
    (seen,) = upstream.seen
    assert seen.body["model"] == SONNET
    assert seen.body["thinking"] == {"type": "adaptive"} and seen.body["output_config"] == {"effort": "medium"}


async def test_responses_to_openrouter_with_the_sdk(kilo, upstream, account, store_url):
    upstream.replay, upstream.done = fixture_lines("openai-responses-stream-text-with-usage.jsonl"), True
    key = account("alice", "10")
    client = await kilo()
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/api/gateway")), api_key=key, max_retries=0)
    try:
        stream = await api.responses.create(model="openai/gpt-5.4", input="19 times 30?", stream=True, store=False)
        kinds = [event.type async for event in stream]
        raw = await client.post("/api/gateway/responses", headers={"Authorization": f"Bearer {key}"},
                                json={"model": "gpt-5.4", "input": "19 times 30?", "stream": True})
        body = await raw.read()
    finally:
        await api.close()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert body == events_of("openai-responses-stream-text-with-usage.jsonl") + b"data: [DONE]\n\n"
    assert [s.path for s in upstream.seen] == ["/responses"] * 2
    assert upstream.seen[1].body == {"model": "openai/gpt-5.4", "input": "19 times 30?", "stream": True}
    await client.app[STORE].flush()
    rows = ledger_rows(store_url)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["estimated"]) for r in rows] == [(299, 12, 0)] * 2
    assert balance(store_url) == 10_000_000 - sum(r["cost_micros"] for r in rows) and rows[0]["cost_micros"] > 0


async def test_passthrough_errors_before_and_after_the_first_byte_are_in_the_dialect(gateway, upstream):
    client = await gateway()
    upstream.status, upstream.error_body = 429, b'{"error": {"message": "slow down", "code": 429}}'
    resp = await client.post("/v1/messages", json={"model": "claude-sonnet-4-6", "max_tokens": 10,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 429
    assert (await resp.json())["error"]["type"] == "rate_limit_error"
    resp = await client.post("/v1/responses", json={"model": "gpt-5.4", "input": "hi"})
    assert resp.status == 429 and (await resp.json())["error"]["message"]
    upstream.status = 200
    upstream.replay, upstream.cut = fixture_lines("anthropic-messages-stream-text.jsonl"), 3
    resp = await client.post("/v1/messages", json={"model": "claude-sonnet-4-6", "max_tokens": 10, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    body = await resp.read()
    assert body.startswith(b"event: message_start") and body.endswith(b"\n\n")
    last = body.split(b"\n\n")[-2]
    assert last.startswith(b"event: error\n") and json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "api_error"
    upstream.replay = fixture_lines("openai-responses-stream-text-with-usage.jsonl")
    resp = await client.post("/v1/responses", json={"model": "gpt-5.4", "input": "hi", "stream": True})
    events = (await resp.read()).split(b"\n\n")
    assert events[-3].startswith(b"event: error\n") and events[-2].startswith(b"event: response.failed\n")
