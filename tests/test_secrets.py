"""No key, the caller's or a provider's, in any log line, error body or response header, even when
upstreams fail or quote the key back."""

from __future__ import annotations

import json
import logging

import pytest
from structlog.testing import capture_logs

from proxy import reply
from tests.fakes import fixture_lines

PROVIDER_KEYS = {"OPENROUTER_API_KEY": "sk-or-v1-provider-secret-0001", "ANTHROPIC_API_KEY": "sk-ant-provider-secret-0002",
                 "GEMINI_API_KEY": "AIza-provider-secret-0003"}
WRONG_KEY = "tsk_this-key-does-not-exist-0004"


async def test_no_key_anywhere(kilo, upstream, account, caplog, unused_tcp_port):
    user_key = account("alice", "10")
    client = await kilo(env={**PROVIDER_KEYS, "ANTHROPIC_BASE_URL": upstream.url, "GEMINI_BASE_URL": upstream.url},
                        upstream={"retries": 1, "backoff": 0.01})
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    seen_bodies, seen_headers = [], []

    async def call(body: dict, key: str | None = user_key, path: str = "/v1/chat/completions", method: str = "POST") -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = await client.request(method, path, json=body, headers=headers)
        seen_bodies.append(await resp.read())
        seen_headers.append(json.dumps(dict(resp.headers)))

    def chat(model: str, **extra: object) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}

    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        await call(chat("openai/gpt-5.4"))                                   # fine
        await call(chat("openai/gpt-5.4", stream=True))
        await call(chat("anthropic/claude-sonnet-4.6", stream=True))          # translated
        await call(chat("openai/gpt-5.4", fault="echo"))                     # the upstream quotes our key
        await call(chat("anthropic/claude-sonnet-4.6", fault="echo"))
        await call(chat("openai/gpt-5.4", fault="reset"))                    # the upstream breaks
        await call(chat("openai/gpt-5.4", fault=401))                        # the upstream refuses our key
        await call(chat("openai/gpt-5.4"), key=WRONG_KEY)                    # a wrong client key
        await call(chat("openai/gpt-5.4"), key=WRONG_KEY + "\udcff")
        await call({"model": 5}, key=user_key)                               # a bad request
        await call({}, key=user_key, path="/v1/key", method="GET")
        await call({}, key=WRONG_KEY, path="/v1/generation?id=x", method="GET")
    everything = "\n".join([json.dumps(logs, default=str), caplog.text,
                            *(b.decode("utf-8", "replace") for b in seen_bodies), *seen_headers])
    for secret in [user_key, WRONG_KEY, *PROVIDER_KEYS.values()]:
        assert secret not in everything, secret
        assert secret[4:24] not in everything, secret
    assert "[redacted]" in everything  # the echoed key was found and removed


UNREADABLE = "The openrouter provider answered 400, with an error body too large to relay, or that broke off or did not end."


@pytest.mark.parametrize("fault, message", [
    ("echo-split", "Incorrect API key provided: Bearer [redacted]"),
    ("echo-big", UNREADABLE),
    ("echo-stall", UNREADABLE),
])
async def test_an_echoed_key_is_redacted_whole_or_not_relayed(gateway, upstream, monkeypatch, fault, message):
    """The error body is read to its end before the key is looked for: read as it first came (two
    reads here), the body would hold the key but its last four characters, which no redaction could
    recognise. A body too large to hold, or that stops short of its end, is not relayed at all."""
    monkeypatch.setattr(reply, "ERROR_BODY_SECONDS", 0.5)  # the stalled body's second read is 30 s away
    secret = PROVIDER_KEYS["OPENROUTER_API_KEY"]
    client = await gateway(env={"OPENROUTER_API_KEY": secret})
    resp = await client.post("/v1/chat/completions", json={"model": "openai/gpt-5.4", "fault": fault,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    raw = await resp.read()
    assert resp.status == 400
    assert secret[4:24].encode() not in raw
    assert json.loads(raw)["error"]["message"] == message


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("padding", [0, 40_000], ids=["small", "large"])
async def test_a_key_quoted_in_an_answer_does_not_reach_the_caller(gateway, stream, padding):
    """Before: redaction covered error bodies only, and a 200 answer quoting the provider key was
    relayed verbatim. Here the key comes split across two upstream reads; a large JSON answer is
    relayed as it arrives, its tail held back."""
    secret = PROVIDER_KEYS["OPENROUTER_API_KEY"]
    client = await gateway(env={"OPENROUTER_API_KEY": secret})
    resp = await client.post("/v1/chat/completions", json={"model": "openai/gpt-5.4", "fault": "echo-200", "stream": stream,
                                                           "padding": padding, "messages": [{"role": "user", "content": "hi"}]})
    raw = await resp.read()
    assert resp.status == 200
    assert secret[4:24].encode() not in raw and secret[-8:].encode() not in raw
    assert b"Your key is [redacted]." in raw
