"""OpenAI Responses served inbound (`POST {base}/responses`), translated over the chat pipeline, with the
official `openai` SDK as the client and real loopback upstreams speaking chat completions, Anthropic
and Gemini."""

from __future__ import annotations

import json

import openai
import pytest

from proxy.app import BASES, STORE
from tests.fakes import fixture_json, fixture_lines
from tests.storedb import balance, ledger_rows
from tests.test_messages_inbound import CHAT_ONLY, chat_stream

TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sdk(client, base: str = "/api/gateway", key: str = "anonymous") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url(base)), api_key=key, max_retries=0)


def sse(body: bytes) -> list[dict]:
    return [json.loads(e.split(b"data: ", 1)[1]) for e in body.split(b"\n\n") if b"data: {" in e]


def lifecycle_holds(events: list[dict]) -> None:
    """What the SDKs and Codex rely on: numbered events, one terminal event, every item added before
    its deltas and done after them, one item open at a time."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["model"] and events[0]["response"]["usage"] is None
    terminal = [e for e in events if e["type"] in ("response.completed", "response.incomplete", "response.failed")]
    assert terminal == [events[-1]]
    open_item = None
    for e in events[2:-1]:
        if e["type"] == "response.output_item.added":
            assert open_item is None
            open_item = e["item"]["id"]
        elif e["type"] == "response.output_item.done":
            assert open_item == e["item"]["id"]
            open_item = None
        elif "item_id" in e:
            assert e["item_id"] == open_item
    assert open_item is None
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert events[-1]["response"]["output"] == done


@pytest.mark.parametrize("base", BASES)
async def test_text_non_stream_and_stream_on_every_base(gateway, upstream, base):
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client, base)
    try:
        reply = await api.responses.create(model="anthropic/claude-sonnet-4.6", input="hi")
        assert reply.status == "completed" and reply.output_text and reply.output[-1].type == "message"
        assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
        assert reply.usage.output_tokens_details.reasoning_tokens == 0
        stream = await api.responses.create(model="anthropic/claude-sonnet-4.6", input="hi", stream=True)
        kinds = [event.type async for event in stream]
    finally:
        await api.close()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.done" in kinds and "response.reasoning_summary_text.delta" in kinds
    resp = await client.post(base + "/responses", json={"model": "anthropic/claude-sonnet-4.6", "input": "hi", "stream": True})
    lifecycle_holds(sse(await resp.read()))
    assert [s.body["model"] for s in upstream.seen] == ["anthropic/claude-sonnet-4.6"] * 3
    assert upstream.seen[0].body["messages"] == [{"role": "user", "content": "hi"}]


async def test_a_function_call_over_two_turns(gateway, upstream):
    """Reasoning, then a tool call, streamed: a reasoning item and a function_call item whose
    arguments arrive in fragments; the second turn sends the call and its output back."""
    upstream.mode, upstream.raw = "raw", chat_stream("deepseek-chat-stream-reasoning-tool-call.jsonl")
    client = await gateway(providers=CHAT_ONLY)
    resp = await client.post("/v1/responses", json={"model": "deepseek/deepseek-v3.2", "input": "Weather in Paris?",
                                                    "tools": [TOOL], "stream": True})
    events = sse(await resp.read())
    lifecycle_holds(events)
    output = events[-1]["response"]["output"]
    assert [i["type"] for i in output] == ["reasoning", "function_call"]
    call = output[-1]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(call["arguments"]) and deltas == call["arguments"]
    assert call["call_id"] and call["name"] and call["status"] == "completed"
    upstream.mode = "fixture"
    api = sdk(client, "/v1")
    try:
        second = await api.responses.create(model="deepseek/deepseek-v3.2", tools=[TOOL], input=[
            {"role": "user", "content": "Weather in Paris?"}, *output,
            {"type": "function_call_output", "call_id": call["call_id"], "output": "Sunny"}])
    finally:
        await api.close()
    assert second.status == "completed"
    sent = upstream.seen[-1].body
    assert sent["tools"] == [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"] == [{"id": call["call_id"], "type": "function", "function": {
        "name": call["name"], "arguments": call["arguments"]}}]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call["call_id"], "content": "Sunny"}


async def test_anthropic_upstream_thinking_signature_survives_two_turns(gateway, upstream):
    """Responses in, Anthropic out: the thinking block's signature rides in the reasoning item's
    `encrypted_content` and reaches Anthropic unchanged on the next turn."""
    events = fixture_lines("anthropic-messages-stream-thinking-signature-text.jsonl")
    signature = next(e["delta"]["signature"] for e in events if e.get("delta", {}).get("type") == "signature_delta")
    upstream.replay = events
    client = await gateway(native=True)
    resp = await client.post("/v1/responses", json={"model": "claude-sonnet-4-6", "input": "hi", "stream": True,
                                                    "reasoning": {"effort": "high"}})
    out = sse(await resp.read())
    lifecycle_holds(out)
    output = out[-1]["response"]["output"]
    assert output[0]["type"] == "reasoning" and output[0]["encrypted_content"]
    assert output[-1]["type"] == "message" and output[-1]["content"][0]["text"]
    assert upstream.seen[0].path == "/v1/messages" and upstream.seen[0].body["thinking"] == {"type": "adaptive"}
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    resp = await client.post("/v1/responses", json={"model": "claude-sonnet-4-6", "stream": True, "input": [
        {"role": "user", "content": "hi"}, *output, {"role": "user", "content": "and then?"}]})
    assert resp.status == 200
    lifecycle_holds(sse(await resp.read()))
    history = upstream.seen[-1].body["messages"]
    assert history[1]["role"] == "assistant" and history[1]["content"][0] == {
        "type": "thinking", "thinking": history[1]["content"][0]["thinking"], "signature": signature}


async def test_gemini_upstream_function_call(gateway, upstream):
    upstream.replay = fixture_lines("gemini-stream-function-call.jsonl")
    client = await gateway(native=True)
    resp = await client.post("/v1/responses", json={"model": "gemini-2.5-flash", "input": "Weather in Paris?",
                                                    "tools": [TOOL], "stream": True})
    events = sse(await resp.read())
    lifecycle_holds(events)
    output = events[-1]["response"]["output"]
    assert [i["type"] for i in output] == ["function_call", "reasoning"]
    assert events[-1]["response"]["usage"]["input_tokens"] > 0
    assert upstream.seen[0].path.startswith("/models/gemini-2.5-flash:streamGenerateContent")
    # Gemini's thought signature came with the call: it rides in a reasoning item, and goes back with
    # the call on the next turn, as Gemini requires.
    upstream.replay = fixture_lines("gemini-stream-text-thought-signature.jsonl")
    resp = await client.post("/v1/responses", json={"model": "gemini-2.5-flash", "tools": [TOOL], "stream": True, "input": [
        {"role": "user", "content": "Weather in Paris?"}, *output,
        {"type": "function_call_output", "call_id": output[0]["call_id"], "output": "Sunny"}]})
    lifecycle_holds(sse(await resp.read()))
    turns = upstream.seen[-1].body["contents"]
    call = next(p for t in turns for p in t["parts"] if "functionCall" in p)
    signature = next(e for e in fixture_lines("gemini-stream-function-call.jsonl")
                     for c in e.get("candidates", []) for p in c["content"]["parts"] if "thoughtSignature" in p)
    assert call["thoughtSignature"] == next(p["thoughtSignature"] for c in signature["candidates"]
                                            for p in c["content"]["parts"] if "thoughtSignature" in p)


async def test_usage_and_cost_reach_the_ledger(kilo, upstream, account, store_url):
    upstream.mode = "usage"
    upstream.usage = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200,
                      "prompt_tokens_details": {"cached_tokens": 300}, "completion_tokens_details": {"reasoning_tokens": 50}}
    key = account("alice", "10")
    client = await kilo(providers=CHAT_ONLY)
    for stream in (False, True):
        resp = await client.post("/api/openrouter/responses", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "anthropic/claude-sonnet-4.6", "input": "hi", "stream": stream})
        body = await resp.read()
        usage = sse(body)[-1]["response"]["usage"] if stream else json.loads(body)["usage"]
        assert usage["input_tokens"] == 1000 and usage["input_tokens_details"] == {"cached_tokens": 300}
        assert usage["output_tokens"] == 200 and usage["output_tokens_details"] == {"reasoning_tokens": 50}
    await client.app[STORE].flush()
    rows = ledger_rows(store_url)
    assert [(r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"], r["estimated"]) for r in rows] == [
        (1000, 200, 300, 0)] * 2
    assert usage["cost"] == rows[1]["cost_micros"] / 1e6 > 0
    assert balance(store_url) == 10_000_000 - 2 * rows[0]["cost_micros"]


async def test_kilo_rules_hold_on_responses(kilo, upstream):
    """Anonymous callers get free models only, with the limit's headers; refusals in the OpenAI shape."""
    client = await kilo(providers=CHAT_ONLY)
    resp = await client.post("/api/gateway/responses", json={"model": "anthropic/claude-sonnet-4.6", "input": "hi"})
    assert resp.status == 401 and (await resp.json())["error"]["message"]
    resp = await client.post("/api/gateway/responses", json={"model": "minimax/minimax-m2.5:free", "input": "hi"})
    assert resp.status == 200 and resp.headers["X-RateLimit-Limit"] == "200"
    assert (await resp.json())["object"] == "response"


async def test_stateful_fields_and_unknown_models_are_refused(gateway, upstream):
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client)
    try:
        for extra, field in (({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id")):
            with pytest.raises(openai.BadRequestError) as refused:
                await api.responses.create(model="gpt-5.4", input="hi", **extra)
            assert refused.value.status_code == 400 and field in refused.value.message
            assert refused.value.body["param"] == field
        with pytest.raises(openai.NotFoundError) as missing:
            await api.responses.create(model="gpt-9-turbo", input="hi")
        assert "gpt-9-turbo" in missing.value.message and "/api/gateway/models" in missing.value.message
        reply = await api.responses.create(model="gpt-5.4", input="hi", store=False)  # store: false is fine
        assert reply.status == "completed"
    finally:
        await api.close()
    assert not any(s.body["model"] == "gpt-9-turbo" for s in upstream.seen)


async def test_upstream_errors_before_and_after_the_first_byte(gateway, upstream):
    client = await gateway(providers=CHAT_ONLY)
    api = sdk(client)
    upstream.status, upstream.error_body = 400, fixture_json("openai-chat-error-400-unsupported-parameter.json") and \
        json.dumps(fixture_json("openai-chat-error-400-unsupported-parameter.json")).encode()
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            await api.responses.create(model="gpt-5.4", input="hi")
        assert refused.value.message
    finally:
        await api.close()
    upstream.status = 200
    upstream.mode, upstream.cut = "raw", 1
    upstream.raw = chat_stream("openai-chat-stream-text-with-usage.jsonl")[:300]
    resp = await client.post("/v1/responses", json={"model": "gpt-5.4", "input": "hi", "stream": True})
    events = sse(await resp.read())
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-2]["type"] == "error" and events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["code"] == "server_error"


async def test_codex_request_tools_namespace_and_developer_messages(gateway, upstream):
    """Codex's recorded request: developer messages become system, hosted tools are left out, a
    namespace's functions are flattened and a call to one comes back with its namespace."""
    body = fixture_json("codex-0.171.0-responses-request.json")["body"]
    namespace = next(t for t in body["tools"] if t["type"] == "namespace")
    inner = namespace["tools"][0]["name"]
    flat = f"{namespace['name']}__{inner}"
    upstream.mode, upstream.raw = "raw", chat_stream("openai-chat-stream-tool-call-with-usage.sdk-dump.jsonl").replace(
        b'"get_weather"', json.dumps(flat).encode())
    client = await gateway(providers=CHAT_ONLY)
    resp = await client.post("/v1/responses", json=body, headers={"Authorization": "Bearer anonymous"})
    events = sse(await resp.read())
    lifecycle_holds(events)
    sent = upstream.seen[0].body
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user", "user"]
    names = [t["function"]["name"] for t in sent["tools"]]
    assert flat in names and len(names) == len(set(names)) and not any(t["type"] != "function" for t in sent["tools"])
    assert sent["model"] == "openai/gpt-5.4" and sent["prompt_cache_key"] == body["prompt_cache_key"]
    call = events[-1]["response"]["output"][-1]
    assert call["type"] == "function_call" and (call["name"], call["namespace"]) == (inner, namespace["name"])
