"""The Gemini translator: recorded generateContent payloads replayed on loopback, exact OpenAI output."""

from __future__ import annotations

import json
import re

import openai
import pytest

from tests.fakes import fixture_bytes, fixture_json, fixture_lines, translate_reads
from tests.plugins.providers.helpers import assemble, chat_body, chunks_of

PRO = "google/gemini-3.1-pro-preview"
FLASH = "google/gemini-2.5-flash"


def chat(model: str = PRO, stream: bool = True, **extra: object) -> dict:
    return chat_body(model, stream, **extra)


async def test_text_stream_with_signature(gateway, upstream):
    upstream.replay = fixture_lines("gemini-stream-text-thought-signature.jsonl")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat())
    assert resp.status == 200
    docs, others = chunks_of(await resp.read())
    assert docs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [d["choices"][0]["delta"].get("content") for d in docs[1:3]] == [
        "There are **3**", ' "r"s in strawberry.\n\nst**r**awbe**rr**y']
    assert docs[3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    usage = docs[4]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (9, 23 + 185, 217)
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 185
    assert {d["id"] for d in docs} == {"bH6LaZW8Fp_3nsEPqtaSwQ4"} and {d["model"] for d in docs} == {PRO}
    assert others == [b"data: [DONE]"]
    sent = upstream.seen[0]
    assert sent.path == "/models/gemini-3.1-pro-preview:streamGenerateContent?alt=sse"
    assert sent.headers["x-goog-api-key"] == "gm-test-key" and "Authorization" not in sent.headers


async def test_function_call_stream(gateway, upstream):
    upstream.replay = fixture_lines("gemini-stream-function-call.jsonl")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat())
    got = assemble(chunks_of(await resp.read())[0])
    (call,) = got["calls"]
    assert call["name"] == "weather" and json.loads(call["arguments"]) == {"location": "San Francisco"}
    assert call["id"].startswith("call_")
    (detail,) = got["details"]
    assert detail["id"] == call["id"] and detail["data"].startswith("EqUCCqICAb4") and detail["format"] == "google-gemini-v1"
    assert got["finish"] == "tool_calls"
    assert got["usage"]["prompt_tokens"] == 29 and got["usage"]["completion_tokens"] == 15 + 45


async def test_function_call_response(gateway, upstream):
    upstream.replay_body = fixture_json("gemini-response-function-call.json")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(stream=False))
    body = await resp.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["native_finish_reason"] == "STOP"
    (call,) = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"location": "San Francisco"}
    assert choice["message"]["reasoning_details"][0]["id"] == call["id"]
    assert body["usage"] == {"prompt_tokens": 29, "completion_tokens": 908, "total_tokens": 937,
                             "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 893},
                             "cost": body["usage"]["cost"]}
    assert upstream.seen[0].path == "/models/gemini-3.1-pro-preview:generateContent"


async def test_blocked_prompt(gateway, upstream):
    upstream.replay_body = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 4}}
    client = await gateway(native=True)
    body = await (await client.post("/v1/chat/completions", json=chat(stream=False))).json()
    assert body["choices"][0]["finish_reason"] == "content_filter" and body["choices"][0]["message"]["content"] == ""


async def test_cut_stream_ends_with_error_chunk(gateway, upstream):
    upstream.replay = fixture_lines("gemini-stream-text-thought-signature.jsonl")
    upstream.cut = 2
    client = await gateway(native=True)
    docs, others = chunks_of(await (await client.post("/v1/chat/completions", json=chat())).read())
    assert docs[-1]["choices"][0]["finish_reason"] == "error" and docs[-1]["error"]["message"]
    assert others[-1] == b"data: [DONE]"


async def test_quota_error(gateway, upstream):
    upstream.status, upstream.error_body = 429, fixture_bytes("gemini-error-429-resource-exhausted.json")
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(stream=False))
    assert resp.status == 429
    assert "You exceeded your current quota" in (await resp.json())["error"]["message"]


async def test_invalid_gateway_key_is_not_blamed_on_the_client(gateway, upstream):
    upstream.status = 400
    upstream.error_body = json.dumps({"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT",
                                                "details": [{"reason": "API_KEY_INVALID"}]}}).encode()
    client = await gateway(native=True)
    resp = await client.post("/v1/chat/completions", json=chat(stream=False))
    assert resp.status == 503  # Gemini says 400 INVALID_ARGUMENT with reason API_KEY_INVALID: our key
    assert "gm-test-key" not in await resp.text()


async def test_request_mapping(gateway, upstream):
    upstream.replay_body = fixture_json("gemini-response-function-call.json")
    client = await gateway(native=True)
    body = {
        "model": FLASH,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": '{"location": "SF"}'}}],
             "reasoning_details": [{"type": "reasoning.encrypted", "id": "call_a", "data": "SIG", "format": "google-gemini-v1"}]},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"tempC": 14}'},
            {"role": "tool", "tool_call_id": "call_a", "content": "plain text"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "d",
                                                      "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "max_tokens": 1000, "temperature": 0.7, "top_p": 0.9, "stop": ["END"],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "reasoning": {"effort": "low"},
    }
    assert (await client.post("/v1/chat/completions", json=body)).status == 200
    sent = upstream.seen[0].body
    assert sent["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    assert sent["contents"] == [
        {"role": "user", "parts": [{"text": "Weather?"}, {"inlineData": {"mimeType": "image/png", "data": "iVBOR"}}]},
        {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"location": "SF"}}, "thoughtSignature": "SIG"}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"tempC": 14}}},
                                   {"functionResponse": {"name": "weather", "response": {"result": "plain text"}}}]},
    ]
    assert sent["tools"] == [{"functionDeclarations": [{"name": "weather", "description": "d", "parametersJsonSchema":
                                                        {"type": "object", "properties": {"location": {"type": "string"}}}}]}]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}}
    assert sent["generationConfig"] == {"maxOutputTokens": 1000, "temperature": 0.7, "topP": 0.9, "stopSequences": ["END"],
                                        "responseMimeType": "application/json", "responseJsonSchema": {"type": "object"},
                                        "thinkingConfig": {"includeThoughts": True, "thinkingBudget": 200}}


@pytest.mark.parametrize("reasoning, expected", [
    ({"effort": "xhigh"}, {"includeThoughts": True, "thinkingLevel": "HIGH"}),
    ({"effort": "low", "exclude": True}, {"includeThoughts": False, "thinkingLevel": "LOW"}),
    ({"max_tokens": 2048}, {"includeThoughts": True, "thinkingBudget": 2048}),
])
async def test_gemini_3_thinking_level(gateway, upstream, reasoning, expected):
    upstream.replay_body = fixture_json("gemini-response-function-call.json")
    client = await gateway(native=True)
    await client.post("/v1/chat/completions", json=chat(stream=False, reasoning=reasoning))
    assert upstream.seen[0].body["generationConfig"]["thinkingConfig"] == expected


async def test_openai_sdk_streams_a_tool_call(gateway, upstream):
    upstream.replay = fixture_lines("gemini-stream-function-call.jsonl")
    client = await gateway(native=True)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="anonymous", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(model=PRO, messages=[{"role": "user", "content": "weather"}], stream=True,
                                                   tools=[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}])
        args = ""
        async for chunk in stream:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                args += tc.function.arguments or ""
        assert json.loads(args) == {"location": "San Francisco"}
    finally:
        await sdk.close()


@pytest.mark.parametrize("name", ["gemini-stream-text-thought-signature.jsonl", "gemini-stream-function-call.jsonl"])
async def test_same_chunks_however_the_stream_is_cut_into_reads(name):
    """Each read is translated in one piece: where the reads end changes nothing but the grouping; an
    error ends the translation even with more events in the same read."""
    from types import SimpleNamespace

    from plugins.providers.gemini import Gemini

    frames = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in fixture_lines(name)]
    provider = Gemini(name="gemini", base_url="http://127.0.0.1:1")

    async def translated(reads: list[bytes]) -> list[dict]:
        ctx = SimpleNamespace(body=chat_body(PRO, True), request_id="r1", model=SimpleNamespace(id=PRO), stream=True)

        out = translate_reads(provider, ctx, reads)
        docs, others = chunks_of(re.sub(rb"call_[0-9a-f]{24}", b"call_made_up", out))  # ids made per call
        assert others == [b"data: [DONE]"]
        return [{k: v for k, v in d.items() if k not in ("created", "id")} for d in docs]

    expected = await translated(frames)
    whole = b"".join(frames)
    assert await translated([whole]) == expected
    assert await translated([whole[i:i + 7] for i in range(0, len(whole), 7)]) == expected
    broken = await translated([frames[0] + b'data: {"error": {"code": 503, "message": "overloaded"}}\n\n' + frames[1]])
    assert broken[-1]["error"]["message"] == "Gemini: overloaded" and len(broken) == 3  # role, first part, error
