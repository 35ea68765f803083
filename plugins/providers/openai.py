"""OpenAI-compatible upstreams (OpenRouter, OpenAI, xAI, DeepSeek, Moonshot, MiniMax, NIM, vLLM…).

One class serves them all; each upstream is a `[[providers]]` row. Bytes are copied through
untouched unless `reasoning_alias` is on: then events carrying `reasoning_content` (DeepSeek,
Moonshot, NIM, xAI) also get it as `reasoning`, so clients read one field whatever the upstream.
Reads ctx.body and ctx.stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from proxy.dialects import passthrough
from proxy.config import ConfigError
from proxy.provider import Passthrough, Translation, UpstreamRequest, under

if TYPE_CHECKING:
    from proxy.context import Context, Native

# Fields that only mean something to the gateway: never sent upstream.
_GATEWAY_ONLY = ("models",)
_MARKERS = (b'"reasoning_content":"', b'"reasoning_content": "')  # searched in whole events


def _marked(data: bytes) -> bool:
    """Does `data` hold a `reasoning_content` string? (`find`: `in` on bytes first tries the needle as
    an integer, and formats the error it gets, on every call.)"""
    return data.find(_MARKERS[0]) >= 0 or data.find(_MARKERS[1]) >= 0


def alias_reasoning(doc: Any) -> None:
    for choice in doc.get("choices") or [] if isinstance(doc, dict) else []:
        for key in ("delta", "message"):
            part = choice.get(key) if isinstance(choice, dict) else None
            if isinstance(part, dict) and isinstance(part.get("reasoning_content"), str) and not part.get("reasoning"):
                part["reasoning"] = part["reasoning_content"]


def _alias_events(data: bytes) -> bytes:
    out = []
    for event in data.split(b"\n\n"):
        if event.startswith((b"data: {", b"data:{")) and _marked(event):
            try:
                doc = orjson.loads(event[5:])
            except orjson.JSONDecodeError:
                out.append(event)
                continue
            alias_reasoning(doc)
            event = b"data: " + orjson.dumps(doc)
        out.append(event)
    return b"\n\n".join(out)


class _Aliased:
    """An answer whose `reasoning_content` is also sent as `reasoning`: streams event by event
    (whole events only), JSON once it has all arrived."""

    __slots__ = ("stream", "_pending")
    over = False

    def __init__(self, content_type: str) -> None:
        self.stream = content_type.startswith("text/event-stream")
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        if not self.stream:
            self._pending = data
            return b""
        if data.find(b"\r") >= 0:  # CRLF line ends as LF (a CR that may start a split pair waits)
            data = data[:-1].replace(b"\r\n", b"\n") + data[-1:] if data.endswith(b"\r") else data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        cut = end + 2 if end >= 0 else 0
        self._pending, data = data[cut:], data[:cut]
        return _alias_events(data) if data and _marked(data) else data

    def end(self) -> tuple[bytes, None]:
        data, self._pending = self._pending, b""
        if self.stream:
            return (_alias_events(data) if _marked(data) else data), None
        if not _marked(data):
            return data, None
        doc = orjson.loads(data)
        alias_reasoning(doc)
        return orjson.dumps(doc), None


_DIALECTS = ("messages", "responses")


class OpenAICompatible:
    """`dialects`: the inbound dialects this upstream also serves at `{base_url}/messages` and
    `{base_url}/responses` (OpenRouter both, OpenAI Responses): requests in them are passed through.
    `hosted_tools`: its Responses API takes OpenAI's own tools (web search, namespaces, shell…), as
    OpenAI's does; a Responses request with such tools for an upstream without them is translated
    (functions kept, namespaces flattened), since OpenRouter refuses them (openai/codex#12114)."""

    def __init__(
        self, *, name: str, base_url: str, api_key: str = "", headers: dict[str, str] | None = None,
        reasoning_alias: bool = False, dialects: list[str] | tuple[str, ...] = (), hosted_tools: bool = False,
    ) -> None:
        unknown = [d for d in dialects if d not in _DIALECTS]
        if unknown:
            raise ConfigError(f"providers: {name}: unknown dialect {unknown[0]!r} (dialects: {', '.join(_DIALECTS)})")
        self.name = name
        self.speaks = frozenset(dialects)
        self.hosted_tools = hosted_tools
        self.base = base_url
        self.url = under(base_url, "/chat/completions")
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.translator = _Aliased if reasoning_alias else Passthrough

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest:
        body = {k: v for k, v in ctx.body.items() if k not in _GATEWAY_ONLY}
        body["model"] = upstream_model
        if ctx.stream:
            options = body.get("stream_options")
            body["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        return UpstreamRequest(self.url, self.headers, orjson.dumps(body))

    def takes(self, native: Native) -> bool:
        return native.dialect in self.speaks and (self.hosted_tools or native.dialect != "responses"
                                                  or not native.hosted_tools)

    def native_request(self, ctx: Context, upstream_model: str) -> UpstreamRequest:
        assert ctx.native is not None
        return UpstreamRequest(under(self.base, "/" + ctx.native.dialect), passthrough.headers(ctx, self.headers),
                               passthrough.body(ctx, upstream_model))

    def translation(self, ctx: Context, content_type: str) -> Translation:
        return self.translator(content_type)

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        return status, body
