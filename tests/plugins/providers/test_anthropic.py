"""The Anthropic translator: recorded Messages payloads replayed on loopback, exact OpenAI output."""

from __future__ import annotations

import json

import openai
import pytest

from proxy.provider import UnreadableAnswer
from tests.fakes import fixture_json, fixture_lines, translate_reads
from tests.plugins.providers.helpers import assemble, chat_body, chunks_of

SONNET = "anthropic/claude-sonnet-4.6"
HAIKU = "anthropic/claude-haiku-4.5"


def chat(model: str = SONNET, stream: bool = True, **extra: object) -> dict:
    return chat_body(model, stream, **extra)


async def test_text_stream(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    docs, others = chunks_of(await resp.read())
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"].get("content") for d in docs[1:7]] == [
        "Hello", "! I", "'m doing well, thank you for asking", ". How are you doing today?", " Is",
        " there anything I can help you with?"]
    assert {d["id"] for d in docs} == {"msg_01QC4g3HwBThD4BaNtBckFDJ"}
    assert {d["model"] for d in docs} == {SONNET}
    assert docs[7]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert docs[8]["choices"] == []
    usage = docs[8]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (12, 30, 42)
    assert usage["cost"] == (12 * 3 + 30 * 15) / 1e6
    assert others == [b": ping", b"data: [DONE]"]
    sent = upstream.seen[0]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test-key" and sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body["model"] == "claude-sonnet-4-6" and sent.body["stream"] is True
    assert "Authorization" not in sent.headers


async def test_thinking_stream_with_signature(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-thinking-signature-text.jsonl")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(reasoning={"effort": "high"}))
    got = assemble(chunks_of(await resp.read())[0])
    assert got["reasoning"] == "The previous result was 925. Now I need to divide that by 5.\n\n925 ÷ 5 = 185"
    assert got["text"] == "925 ÷ 5 = 185"
    signed = [d for d in got["details"] if d.get("signature")]
    assert len(signed) == 1 and signed[0]["signature"].startswith("EvQBCkYICxgCKkAxhD4N")
    assert signed[0]["format"] == "anthropic-claude-v1"
    assert got["finish"] == "stop" and got["usage"]["completion_tokens"] == 53
    assert upstream.seen[0].body["thinking"] == {"type": "adaptive"}
    assert upstream.seen[0].body["output_config"] == {"effort": "high"}


async def test_tool_use_stream(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-tool-use.jsonl")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(HAIKU))
    docs, _ = chunks_of(await resp.read())
    got = assemble(docs)
    assert got["calls"] == [{"id": "toolu_01KFbKqPYSuAKujiL6mTfzYA", "name": "json", "arguments":
                             '{"elements": [{"location": "San Francisco", "temperature": 58, "condition": "sunny"}]}'}]
    json.loads(got["calls"][0]["arguments"])
    assert got["finish"] == "tool_calls"
    assert got["usage"]["prompt_tokens"] == 849 and got["usage"]["completion_tokens"] == 47


async def test_tool_use_response(gateway, upstream):
    upstream.replay_body = fixture_json("anthropic-messages-response-tool-use.json")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(HAIKU, stream=False))
    body = await resp.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01Q9ExVZnzZj7E2QQYHYtNUa" and call["function"]["name"] == "json"
    assert json.loads(call["function"]["arguments"])["elements"][3] == {"location": "Berlin", "temperature": -9, "condition": "snowy"}
    assert body["usage"]["prompt_tokens"] == 1151 and body["usage"]["completion_tokens"] == 87
    assert body["model"] == HAIKU


async def test_usage_not_sent_unless_asked_but_still_billed(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    client = await gateway(native=True)
    body = chat()
    del body["stream_options"]
    resp = await client.post("/v1/chat/completions", json=body)
    docs, others = chunks_of(await resp.read())
    assert all(d.get("usage") is None for d in docs)
    assert others[-1] == b"data: [DONE]"


async def test_cut_stream_ends_with_error_chunk(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    upstream.cut = 5
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat())
    docs, others = chunks_of(await resp.read())
    assert docs[-1]["choices"] == [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]
    assert docs[-1]["error"]["message"]
    assert others[-1] == b"data: [DONE]"


async def test_error_event_mid_stream(gateway, upstream):
    events = fixture_lines("anthropic-messages-stream-text.jsonl")[:4]
    upstream.replay = events + [{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}]
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat())
    docs, others = chunks_of(await resp.read())
    assert docs[-1]["error"] == {"message": "Overloaded", "code": 503, "type": "upstream_error"}
    assert docs[-1]["choices"][0]["finish_reason"] == "error"
    assert others[-1] == b"data: [DONE]"


@pytest.mark.parametrize("status, body, ours, code", [
    (429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}, 429, "upstream_error"),
    (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 503, "upstream_overloaded"),
    (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 250000 tokens > 200000 maximum"}}, 400, "context_length_exceeded"),
    (404, {"type": "error", "error": {"type": "not_found_error", "message": "model: claude-x"}}, 404, "upstream_error"),
])
async def test_errors_are_mapped(gateway, upstream, status, body, ours, code):
    upstream.status, upstream.error_body = status, json.dumps(body).encode()
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(stream=False))
    assert resp.status == ours
    got = await resp.json()
    assert got["error"]["code"] == code and body["error"]["message"] in got["error"]["message"]
    assert "sk-ant-test-key" not in json.dumps(got)


async def test_upstream_refusing_our_key_is_503_for_the_client(gateway, upstream):
    upstream.status = 401
    upstream.error_body = b'{"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}'
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(stream=False))
    assert resp.status == 503
    body = await resp.json()
    assert body["error_type"] == "temporarily_unavailable" and "x-api-key" not in body["message"]


def tool_conversation() -> dict:
    return {
        "model": SONNET,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/sky.jpg"}},
            ]},
            {"role": "assistant", "content": "Checking.", "reasoning_details": [
                {"type": "reasoning.text", "text": "Need the tool.", "signature": "sig-1", "format": "anthropic-claude-v1"}],
             "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                            {"id": "toolu_2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "14C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
            {"role": "user", "content": "Thanks. And tomorrow?"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather by city",
                                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "required", "parallel_tool_calls": False,
        "max_tokens": 500, "stop": "END", "temperature": 1.7, "top_p": 0.9, "user": "u-42",
    }


async def test_request_mapping(gateway, upstream):
    upstream.replay_body = fixture_json("anthropic-messages-response-tool-use.json")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=tool_conversation())
    assert resp.status == 200
    sent = upstream.seen[0].body
    assert sent["system"] == [{"type": "text", "text": "Be terse."},
                              {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}]
    assert sent["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/sky.jpg"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Need the tool.", "signature": "sig-1"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "14C"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
            {"type": "text", "text": "Thanks. And tomorrow?"}]},
    ]
    assert sent["tools"] == [{"name": "weather", "description": "Weather by city",
                              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert (sent["max_tokens"], sent["stop_sequences"], sent["temperature"], sent["top_p"]) == (500, ["END"], 1.0, 0.9)
    assert sent["metadata"] == {"user_id": "u-42"}
    assert "stream" not in sent


@pytest.mark.parametrize("model, reasoning, thinking, output_config, max_tokens", [
    ("anthropic/claude-haiku-4.5", {"effort": "high"}, {"type": "enabled", "budget_tokens": 3200}, None, 4000),
    ("anthropic/claude-haiku-4.5", {"max_tokens": 500}, {"type": "enabled", "budget_tokens": 1024}, None, 4000),
    ("anthropic/claude-haiku-4.5", {"max_tokens": 6000}, {"type": "enabled", "budget_tokens": 6000}, None, 7024),
    ("anthropic/claude-opus-4.7", {"effort": "low"}, {"type": "adaptive"}, {"effort": "low"}, 4000),
    ("anthropic/claude-sonnet-4.6", {"enabled": True}, {"type": "adaptive"}, None, 4000),
    ("anthropic/claude-sonnet-4.6", {"effort": "none"}, None, None, 4000),
])
async def test_reasoning_to_thinking(gateway, upstream, model, reasoning, thinking, output_config, max_tokens):
    upstream.replay_body = fixture_json("anthropic-messages-response-tool-use.json")
    client = await gateway(native=True)
    await client.post("/v1/chat/completions", json=chat(model, stream=False, reasoning=reasoning, max_tokens=4000, temperature=0.5))
    sent = upstream.seen[0].body
    assert sent.get("thinking") == thinking
    assert sent.get("output_config") == output_config
    assert sent["max_tokens"] == max_tokens
    assert ("temperature" in sent) == (thinking is None)


async def test_default_max_tokens_from_the_catalog(gateway, upstream):
    upstream.replay_body = fixture_json("anthropic-messages-response-tool-use.json")
    client = await gateway(native=True)
    await client.post("/v1/chat/completions", json=chat(HAIKU, stream=False))
    assert upstream.seen[0].body["max_tokens"] == 32000


async def test_openai_sdk_streams_a_tool_call(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-tool-use.jsonl")
    client = await gateway(native=True)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/api/gateway")), api_key="anonymous", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(model=HAIKU, messages=[{"role": "user", "content": "weather"}], stream=True,
                                                   tools=[{"type": "function", "function": {"name": "json", "parameters": {"type": "object"}}}])
        args, name = "", None
        async for chunk in stream:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
        assert name == "json" and json.loads(args)["elements"][0]["location"] == "San Francisco"
    finally:
        await sdk.close()


@pytest.mark.parametrize("name", ["anthropic-messages-stream-text.jsonl", "anthropic-messages-stream-tool-use.jsonl",
                                  "anthropic-messages-stream-thinking-signature-text.jsonl"])
async def test_same_chunks_however_the_stream_is_cut_into_reads(name):
    """Each read is translated in one piece: where the reads end changes nothing but the grouping."""
    from types import SimpleNamespace

    from plugins.providers.anthropic import Anthropic

    frames = [b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in fixture_lines(name)]
    whole = b"".join(frames) + b'event: ping\ndata: {"type":"ping"}\n\n'  # after the end: never read
    provider = Anthropic(name="anthropic", base_url="http://127.0.0.1:1")
    ctx = SimpleNamespace(body=chat(), request_id="r1", model=SimpleNamespace(id=SONNET), stream=True)

    async def translated(reads: list[bytes]) -> list[dict]:
        out = translate_reads(provider, ctx, reads)
        docs, others = chunks_of(out)
        assert others[-1] == b"data: [DONE]" and others.count(b"data: [DONE]") == 1
        return [{k: v for k, v in d.items() if k != "created"} for d in docs]

    expected = await translated(frames)
    assert await translated([whole]) == expected
    assert await translated([whole[i:i + 7] for i in range(0, len(whole), 7)]) == expected


async def test_text_before_an_event_that_cannot_be_translated_still_goes_out():
    """An event that breaks the translator comes after what the same read already gave: that text
    is sent, then the error."""
    from types import SimpleNamespace

    from plugins.providers.anthropic import Anthropic

    read = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","usage":{}}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"Hello"}}\n\n'
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":"not an object"}\n\n')
    provider = Anthropic(name="anthropic", base_url="http://127.0.0.1:1")
    ctx = SimpleNamespace(body=chat(), request_id="r1", model=SimpleNamespace(id=SONNET), stream=True)

    with pytest.raises(UnreadableAnswer) as broken:
        provider.translation(ctx, "text/event-stream").feed(read)
    docs, _ = chunks_of(broken.value.made)
    assert [d["choices"][0]["delta"].get("content") for d in docs] == ["", "Hello"]


async def test_text_passed_on_as_sent_reads_as_the_parsed_way_does():
    """Compact text deltas (as Anthropic writes them) go out as the JSON strings they came as; they
    read the same as what parsing and writing them again gives (the spaced form takes that way)."""
    import orjson
    from types import SimpleNamespace

    from plugins.providers.anthropic import Anthropic

    texts = ['plain', 'quote " and \\ backslash', 'é, ☃, 😀 and \u2028', '\n\t', '', '}}"}}']
    events = [{"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 3}}}]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in texts]
    events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x", "extra": 1}},
               {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}},
               {"type": "message_stop"}]
    provider = Anthropic(name="anthropic", base_url="http://127.0.0.1:1")
    ctx = SimpleNamespace(body=chat(), request_id="r1", model=SimpleNamespace(id=SONNET), stream=True)

    def frames(dump) -> list[bytes]:
        return [b"event: " + e["type"].encode() + b"\ndata: " + dump(e) + b"\n\n" for e in events]

    compact = translate_reads(provider, ctx, frames(orjson.dumps))
    spaced = translate_reads(provider, ctx, frames(lambda e: json.dumps(e).encode()))
    assert [d["choices"] for d in chunks_of(compact)[0]] == [d["choices"] for d in chunks_of(spaced)[0]]
    whole = b"".join(frames(orjson.dumps))  # the run made in one piece, or cut anywhere
    for reads in ([whole], [whole[i:i + 7] for i in range(0, len(whole), 7)], [whole[:300], whole[300:]]):
        made = translate_reads(provider, ctx, reads)
        assert [d["choices"] for d in chunks_of(made)[0]] == [d["choices"] for d in chunks_of(spaced)[0]]
    contents = [d["choices"][0]["delta"].get("content") for d in chunks_of(compact)[0] if d["choices"]]
    assert contents == ["", *texts, "x", None]
