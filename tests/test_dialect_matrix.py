"""Each inbound dialect against each kind of upstream (chat completions, Anthropic, Gemini), streamed
and not: the answer in the caller's dialect, its usage and cost in the ledger, and an upstream error
before and after the first byte in the dialect's shape."""

from __future__ import annotations

import json

import pytest

from proxy.app import STORE
from tests.fakes import fixture_json, fixture_lines
from tests.storedb import ledger_rows
from tests.test_messages_inbound import CHAT_ONLY
from tests.test_responses_inbound import lifecycle_holds, sse

# upstream kind -> (model the client names, the provider, recorded stream, recorded JSON answer)
UPSTREAMS = {
    "chat": ("deepseek/deepseek-v3.2", "openrouter", None, None),
    "anthropic": ("claude-sonnet-4-6", "anthropic", "anthropic-messages-stream-text.jsonl",
                  "anthropic-messages-response-tool-use.json"),
    "gemini": ("gemini-2.5-flash", "gemini", "gemini-stream-text-thought-signature.jsonl", "gemini-response-function-call.json"),
}
PATHS = {"messages": "/v1/messages", "responses": "/v1/responses"}


def request(dialect: str, model: str, stream: bool) -> dict:
    if dialect == "messages":
        return {"model": model, "max_tokens": 200, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    return {"model": model, "stream": stream, "input": "hi"}


def answered(dialect: str, stream: bool, body: bytes) -> None:
    """A whole answer in the dialect, ending as its SDKs expect."""
    if dialect == "messages" and stream:
        kinds = [e.split(b"\n", 1)[0] for e in body.split(b"\n\n") if e.startswith(b"event: ")]
        assert kinds[0] == b"event: message_start" and kinds[-1] == b"event: message_stop"
        assert b"event: error" not in kinds
    elif dialect == "messages":
        doc = json.loads(body)
        assert doc["type"] == "message" and doc["content"] and doc["usage"]["output_tokens"] > 0
    elif stream:
        events = sse(body)
        lifecycle_holds(events)
        assert events[-1]["type"] == "response.completed" and events[-1]["response"]["usage"]["output_tokens"] > 0
    else:
        doc = json.loads(body)
        assert doc["object"] == "response" and doc["status"] == "completed" and doc["output"]


def failed(dialect: str, status: int, body: bytes, stream_started: bool) -> None:
    if stream_started:
        last = [e for e in body.split(b"\n\n") if e.strip()][-1]
        assert last.startswith(b"event: error\n" if dialect == "messages" else b"event: response.failed\n"), body[-300:]
        return
    assert status >= 400
    doc = json.loads(body)
    assert doc["type"] == "error" if dialect == "messages" else isinstance(doc["error"]["message"], str)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", UPSTREAMS)
@pytest.mark.parametrize("dialect", PATHS)
async def test_dialect_against_upstream(kilo, upstream, account, store_url, dialect, kind, stream):
    model, provider, stream_fixture, json_fixture = UPSTREAMS[kind]
    if stream_fixture:
        upstream.replay, upstream.replay_body = fixture_lines(stream_fixture), fixture_json(json_fixture)
    key = account("alice", "10")
    client = await kilo(native=True, providers=CHAT_ONLY)
    headers = {"Authorization": f"Bearer {key}"}
    resp = await client.post(PATHS[dialect], headers=headers, json=request(dialect, model, stream))
    body = await resp.read()
    assert resp.status == 200, body[:500]
    answered(dialect, stream, body)
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert row["provider"] == provider and row["estimated"] == 0 and row["prompt_tokens"] > 0 and row["cost_micros"] > 0
    gen = await client.get(f"/api/gateway/generation?id={resp.headers['X-Request-Id']}", headers=headers)
    data = (await gen.json())["data"]
    assert (data["provider_name"], data["tokens_prompt"], data["streamed"]) == (provider, row["prompt_tokens"], stream)
    # an upstream error before the first byte
    upstream.status = 429
    upstream.error_body = b'{"error": {"message": "slow down", "code": 429, "type": "rate_limit_error"}}'
    resp = await client.post(PATHS[dialect], headers=headers, json=request(dialect, model, stream))
    failed(dialect, resp.status, await resp.read(), False)
    upstream.status = 200
    if stream:  # and after it: the stream is cut
        if stream_fixture:
            upstream.cut = 3
        else:
            upstream.mode, upstream.cut = "raw", 1
            upstream.raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n"
                                    for c in fixture_lines("openai-chat-stream-text-with-usage.jsonl")[:3])
        resp = await client.post(PATHS[dialect], headers=headers, json=request(dialect, model, stream))
        failed(dialect, resp.status, await resp.read(), True)


async def test_messages_to_gemini_tool_call_over_two_turns_keeps_the_thought_signature(gateway, upstream):
    """Gemini's thought signature comes with its function call: it reaches the Messages client as a
    redacted_thinking block and goes back to Gemini with the call next turn (Gemini requires it)."""
    events = fixture_lines("gemini-stream-function-call.jsonl")
    signature = next(p["thoughtSignature"] for e in events for c in e.get("candidates", [])
                     for p in c["content"]["parts"] if "thoughtSignature" in p)
    upstream.replay = events
    client = await gateway(native=True)
    tool = {"name": "weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}
    resp = await client.post("/v1/messages", json={"model": "gemini-2.5-flash", "max_tokens": 500, "stream": True,
                                                   "tools": [tool], "messages": [{"role": "user", "content": "Weather?"}]})
    out = [json.loads(e.split(b"data: ", 1)[1]) for e in (await resp.read()).split(b"\n\n") if b"data: " in e]
    blocks = [e["content_block"] for e in out if e["type"] == "content_block_start"]
    assert [b["type"] for b in blocks] == ["redacted_thinking", "tool_use"]
    args = "".join(e["delta"]["partial_json"] for e in out if e.get("delta", {}).get("type") == "input_json_delta")
    call = {**blocks[1], "input": json.loads(args)}
    upstream.replay = fixture_lines("gemini-stream-text-thought-signature.jsonl")
    resp = await client.post("/v1/messages", json={"model": "gemini-2.5-flash", "max_tokens": 500, "stream": True,
                                                   "tools": [tool], "messages": [
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": [blocks[0], call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny"}]}]})
    assert resp.status == 200 and b"event: message_stop" in await resp.read()
    parts = [p for t in upstream.seen[-1].body["contents"] for p in t["parts"]]
    sent = next(p for p in parts if "functionCall" in p)
    assert sent["thoughtSignature"] == signature and any("functionResponse" in p for p in parts)


async def test_responses_to_anthropic_tool_call_over_two_turns(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-tool-use.jsonl")
    client = await gateway(native=True)
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    resp = await client.post("/v1/responses", json={"model": "claude-sonnet-4-6", "stream": True, "tools": [tool],
                                                    "input": "Weather in Paris?"})
    events = sse(await resp.read())
    lifecycle_holds(events)
    output = events[-1]["response"]["output"]
    call = next(i for i in output if i["type"] == "function_call")
    assert call["call_id"].startswith("toolu_") and json.loads(call["arguments"])
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    resp = await client.post("/v1/responses", json={"model": "claude-sonnet-4-6", "stream": True, "tools": [tool], "input": [
        {"role": "user", "content": "Weather in Paris?"}, *output,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "18C"}]})
    lifecycle_holds(sse(await resp.read()))
    turns = upstream.seen[-1].body["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    use = next(b for b in turns[1]["content"] if b["type"] == "tool_use")
    assert use["id"] == call["call_id"] and use["input"] == json.loads(call["arguments"])
    assert turns[2]["content"][0] == {"type": "tool_result", "tool_use_id": call["call_id"], "content": "18C"}
