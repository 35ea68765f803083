"""The load-test kit's mock provider is also what a new user can try the gateway against: every
provider format it speaks goes through the gateway whole, as JSON and as a stream."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy" / "loadtest"))

from mock_upstream import make_app  # noqa: E402

MODELS = ["openai/gpt-5.4", "anthropic/claude-sonnet-4.6", "google/gemini-2.5-flash"]


@pytest.mark.parametrize("model", MODELS)
async def test_every_format_of_the_mock_goes_through(aiohttp_server, gateway, model):
    mock = await aiohttp_server(make_app(chunks=5, delay=0))
    url = str(mock.make_url("")).rstrip("/")
    client = await gateway(native=True, env={"OPENROUTER_BASE_URL": url + "/v1", "ANTHROPIC_BASE_URL": url,
                                             "GEMINI_BASE_URL": url + "/v1beta"})
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/chat/completions", json=chat)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "word " * 5
    assert body["usage"]["prompt_tokens"] == 12
    assert body["usage"]["completion_tokens"] == 5  # a token per chunk, in every format

    resp = await client.post("/v1/chat/completions", json={**chat, "stream": True})
    assert resp.status == 200
    events = (await resp.read()).split(b"\n\n")
    docs = [json.loads(e[6:]) for e in events if e.startswith(b"data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"]) == "word " * 5
    assert b"data: [DONE]" in events
