"""OpenAI-compatible upstreams: the request body, and DeepSeek's reasoning_content exposed as reasoning."""

from __future__ import annotations

import json

from tests.fakes import fixture_bytes
from tests.plugins.providers.helpers import assemble, chunks_of


async def deepseek(gateway, upstream):
    return await gateway(env={"DEEPSEEK_API_KEY": "sk-ds", "DEEPSEEK_BASE_URL": upstream.url},
                         models=[{"id": "deepseek/deepseek-v4-flash", "name": "DeepSeek V4 Flash", "context_length": 1000000,
                                  "pricing": {"prompt": "0.00000014", "completion": "0.00000028"},
                                  "routes": {"deepseek": "deepseek-v4-flash"}}])


async def test_deepseek_stream_gets_reasoning_too(gateway, upstream, aiohttp_server):
    lines = fixture_bytes("deepseek-chat-stream-reasoning-tool-call.jsonl").splitlines()
    upstream.mode = "raw"
    upstream.raw = b"".join(b"data: " + line + b"\n\n" for line in lines) + b"data: [DONE]\n\n"
    client = await deepseek(gateway, upstream)
    resp = await client.post("/v1/chat/completions", json={"model": "deepseek/deepseek-v4-flash", "stream": True,
                                                           "messages": [{"role": "user", "content": "weather?"}]})
    docs, others = chunks_of(await resp.read())
    raw = [json.loads(line) for line in lines]
    assert len(docs) == len(raw) and others == [b"data: [DONE]"]
    with_reasoning = [d for d in docs if d["choices"] and d["choices"][0]["delta"].get("reasoning_content")]
    assert with_reasoning and all(d["choices"][0]["delta"]["reasoning"] == d["choices"][0]["delta"]["reasoning_content"]
                                  for d in with_reasoning)
    got = assemble(docs)
    expected = "".join(r["choices"][0]["delta"].get("reasoning_content") or "" for r in raw if r["choices"])
    assert got["reasoning"] == expected
    assert got["finish"] == "tool_calls" and json.loads(got["calls"][0]["arguments"])
    assert upstream.seen[0].body["model"] == "deepseek-v4-flash"
    assert upstream.seen[0].headers["Authorization"] == "Bearer sk-ds"


async def test_deepseek_response_gets_reasoning_too(gateway, upstream):
    upstream.mode = "raw"
    upstream.raw_json = fixture_bytes("deepseek-chat-response-reasoning-tool-call.json")
    client = await deepseek(gateway, upstream)
    resp = await client.post("/v1/chat/completions", json={"model": "deepseek/deepseek-v4-flash",
                                                           "messages": [{"role": "user", "content": "weather?"}]})
    message = (await resp.json())["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] and message["reasoning"].startswith("The user is asking")
    assert message["tool_calls"][0]["function"]["name"] == "weather"
