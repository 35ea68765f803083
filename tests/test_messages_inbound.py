"""Anthropic Messages served inbound (`POST {base}/messages`), translated over the chat pipeline, with
the official `anthropic` SDK as the client and a real loopback upstream speaking chat completions."""

from __future__ import annotations

import json

import anthropic
import pytest

from proxy.app import BASES
from tests.fakes import fixture_lines

TOOL = {"name": "get_weather", "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


# OpenRouter serves Messages itself: these tests have it take chat completions only, so that the
# gateway translates (tests/test_passthrough.py has the other way).
CHAT_ONLY = [{"name": "openrouter", "options": {"dialects": []}}]


def sdk(client, base: str = "/api/openrouter", key: str = "anonymous") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=str(client.make_url(base)), api_key=key, max_retries=0)


def chat_stream(name: str) -> bytes:
    """A recorded chat completions stream, as the upstream sends it."""
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in fixture_lines(name)) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("base", BASES)
async def test_text_non_stream_and_stream_on_every_base(gateway, upstream, base):
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client, base)
    try:
        reply = await api.messages.create(model="claude-sonnet-4-6", max_tokens=100,
                                          messages=[{"role": "user", "content": "hi"}])
        assert reply.type == "message" and reply.content[-1].type == "text" and reply.content[-1].text
        assert reply.model == "claude-sonnet-4-6" and reply.stop_reason == "end_turn"
        assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
        async with api.messages.stream(model="anthropic/claude-sonnet-4.6", max_tokens=100,
                                       messages=[{"role": "user", "content": "hi"}]) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert final.content[-1].type == "text" and final.content[-1].text
        assert final.usage.output_tokens > 0
    finally:
        await api.close()
    # what went upstream is a chat request for the catalog's model
    assert [s.body["model"] for s in upstream.seen] == ["anthropic/claude-sonnet-4.6"] * 2
    assert upstream.seen[0].body["max_completion_tokens"] == 100


async def test_a_tool_call_streams_as_tool_use_then_the_result_goes_back(gateway, upstream):
    """Reasoning, then a tool call: a thinking block, then a tool_use block whose input arrives as
    JSON fragments; the second turn sends the tool result back as a tool message."""
    upstream.mode, upstream.raw = "raw", chat_stream("deepseek-chat-stream-reasoning-tool-call.jsonl")
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client)
    try:
        async with api.messages.stream(model="anthropic/claude-sonnet-4.6", max_tokens=1000, tools=[TOOL],
                                       messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
            final = await stream.get_final_message()
        kinds = [block.type for block in final.content]
        assert kinds[0] == "thinking" and kinds[-1] == "tool_use" and final.stop_reason == "tool_use"
        call = final.content[-1]
        assert call.name and isinstance(call.input, dict) and call.input
        upstream.mode = "fixture"
        await api.messages.create(model="anthropic/claude-sonnet-4.6", max_tokens=100, tools=[TOOL], messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
        ])
    finally:
        await api.close()
    sent = upstream.seen[-1].body
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}


async def test_errors_come_in_anthropics_shape(gateway, upstream):
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client)
    try:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await api.messages.create(model="claude-opus-9-9", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        assert "claude-opus-9-9" in missing.value.message and "/models" in missing.value.message
        resp = await client.post("/v1/messages", json={"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "x"}]})
        doc = await resp.json()
        assert resp.status == 400 and doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
        upstream.status, upstream.error_body = 429, b'{"error": {"message": "slow down", "code": 429}}'
        with pytest.raises(anthropic.RateLimitError):
            await api.messages.create(model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    finally:
        await api.close()


async def test_keys_by_x_api_key_and_the_kilo_rules(kilo, upstream, account):
    """Anthropic clients send their key as `x-api-key`: a paid model needs one, as on chat."""
    key = account("alice", "10")
    client = await kilo(providers=CHAT_ONLY)
    anonymous, keyed = sdk(client), sdk(client, key=key)
    try:
        with pytest.raises(anthropic.AuthenticationError):
            await anonymous.messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                            messages=[{"role": "user", "content": "hi"}])
        reply = await keyed.messages.create(model="claude-sonnet-4-6", max_tokens=10,
                                            messages=[{"role": "user", "content": "hi"}])
        assert reply.content
    finally:
        await anonymous.close()
        await keyed.close()
    both = await client.post("/api/openrouter/messages", headers={"x-api-key": key, "Authorization": "Bearer anonymous"},
                             json={"model": "kilo-auto/frontier", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert both.status == 200  # x-api-key wins when both are sent (the Kilo CLI sends both)


async def test_count_tokens_and_the_probe(gateway):
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client)
    try:
        counted = await api.messages.count_tokens(model="claude-sonnet-4-6",
                                                  messages=[{"role": "user", "content": "foo " * 100}])
        assert counted.input_tokens >= 100
    finally:
        await api.close()
    assert (await client.head("/")).status == 200
    assert (await client.head("/api/openrouter")).status == 200
    assert (await client.get("/")).status == 404


async def test_an_operator_alias_names_a_model(gateway, upstream):
    """Claude Code asks for `claude-opus-4-8` by default: an operator can point that name at a model."""
    client = await gateway(providers=CHAT_ONLY, models=[{"id": "anthropic/claude-opus-4.7", "aliases": ["claude-opus-4-8"]}])
    resp = await client.post("/v1/messages", headers={"x-api-key": "anonymous"}, json={
        "model": "claude-opus-4-8", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200 and (await resp.json())["model"] == "claude-opus-4-8"
    assert upstream.seen[-1].body["model"] == "anthropic/claude-opus-4.7"
    models = await (await client.get("/v1/models")).json()
    assert not any("aliases" in m for m in models["data"])  # the operator's own names stay private


async def test_a_stream_that_ends_without_done_still_closes_its_message(gateway, upstream):
    """The chat stream ends after its finish reason and usage, without `data: [DONE]`: the Messages
    stream still gets its content_block_stop, message_delta and message_stop."""
    events = [json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}),
              json.dumps({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
              json.dumps({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})]
    upstream.mode, upstream.raw = "raw", b"".join(b"data: " + e.encode() + b"\n\n" for e in events)
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client)
    try:
        async with api.messages.stream(model="claude-sonnet-4-6", max_tokens=10,
                                       messages=[{"role": "user", "content": "hi"}]) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
    finally:
        await api.close()
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == "Hi" and final.usage.output_tokens == 1 and final.stop_reason == "end_turn"
