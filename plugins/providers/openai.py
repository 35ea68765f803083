"""OpenAI-compatible upstreams (OpenRouter, OpenAI, xAI, DeepSeek, Moonshot, MiniMax, NIM, vLLM…).

One class serves them all; each upstream is a `[[providers]]` row. Reads ctx.body and ctx.stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator

import orjson

from plugins.providers.base import UpstreamRequest

if TYPE_CHECKING:
    from proxy.context import Context

# Fields that only mean something to the gateway: never sent upstream.
_GATEWAY_ONLY = ("models",)


class OpenAICompatible:
    passthrough = True

    def __init__(self, *, name: str, base_url: str, api_key: str = "", headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest:
        body = ctx.body
        for key in _GATEWAY_ONLY:
            body.pop(key, None)
        body["model"] = upstream_model
        if ctx.stream:
            options = body.get("stream_options")
            body["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        return UpstreamRequest(self.url, self.headers, orjson.dumps(body))

    def translate_body(self, ctx: Context, body: bytes) -> bytes:
        return body

    async def translate_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
