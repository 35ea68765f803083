"""The official `openai` Python SDK completes a stream and a non-stream request on every base path."""

from __future__ import annotations

import openai
import pytest

from proxy.app import BASES


@pytest.mark.parametrize("base", BASES)
async def test_openai_sdk(gateway, upstream, base):
    client = await gateway()
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url(base)), api_key="anonymous", max_retries=0)
    try:
        reply = await sdk.chat.completions.create(model="openai/gpt-5.4", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        assert reply.usage.total_tokens > 0
        stream = await sdk.chat.completions.create(
            model="anthropic/claude-sonnet-4.6", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        assert "".join(text)
        assert usage is not None and usage.completion_tokens > 0
        models = await sdk.models.list()
        assert any(m.id == "kilo-auto/frontier" for m in models.data)
    finally:
        await sdk.close()
    assert [s.body["model"] for s in upstream.seen] == ["openai/gpt-5.4", "anthropic/claude-sonnet-4.6"]
