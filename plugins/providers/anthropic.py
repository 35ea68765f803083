"""Anthropic Messages: OpenAI chat requests in, `/v1/messages` out, and the answer back as OpenAI
chat completions, translated event by event as it streams.

Reads ctx.body, ctx.stream, ctx.model; returns the usage with the answer when the client did not ask
for it in the stream.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson

from plugins.providers.common import (
    EFFORT_RATIO, Turns, completion, data_url, each_message, excluded, file_data, image_url, parts_of, reasoning_of, unknown_role,
    upstream_status,
)
from proxy.context import Context
from proxy.dialects import passthrough
from proxy.dialects.messages import chat_usage as usage
from proxy.errors import invalid_request
from proxy.provider import (
    EventTranslation, Translation, UpstreamRequest, WholeTranslation, error_body, error_of, under,
)

VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 32000
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
          "pause_turn": "stop", "refusal": "content_filter", "model_context_window_exceeded": "length"}
_VERSION = re.compile(r"claude-(?:opus|sonnet|haiku)-(\d+)(?:[-.](\d+))?")
FORMAT = "anthropic-claude-v1"


def _adaptive(model: str) -> bool:
    """Claude 4.6 and later think adaptively (Opus 4.7 and Claude 5 only so); older ones take a budget."""
    m = _VERSION.search(model)
    if not m:
        return True
    major, minor = int(m.group(1)), int(m.group(2) or 0)
    return (major, minor) >= (4, 6)


def _block(part: Any) -> dict[str, Any] | None:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    block: dict[str, Any] | None = None
    if kind == "text":
        block = {"type": "text", "text": part.get("text", "")}
    elif kind == "image_url":
        url = image_url(part)
        inline = data_url(url)
        source = {"type": "base64", "media_type": inline[0], "data": inline[1]} if inline else {"type": "url", "url": url}
        block = {"type": "image", "source": source}
    elif kind == "file":
        inline = file_data(part)
        if inline:
            block = {"type": "document", "source": {"type": "base64", "media_type": inline[0], "data": inline[1]}}
    if block is not None and isinstance(part.get("cache_control"), dict):
        block["cache_control"] = part["cache_control"]
    return block


def _blocks(content: Any) -> list[dict[str, Any]]:
    return parts_of(content, _block, lambda text: {"type": "text", "text": text})


def _thinking_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Signed thinking from an earlier answer, sent back unmodified (Anthropic requires it with tools)."""
    out = []
    for d in message.get("reasoning_details") or []:
        if not isinstance(d, dict) or d.get("format") not in (None, FORMAT):
            continue
        if d.get("type") == "reasoning.text" and d.get("signature"):
            out.append({"type": "thinking", "thinking": d.get("text", ""), "signature": d["signature"]})
        elif d.get("type") == "reasoning.encrypted" and d.get("data"):
            out.append({"type": "redacted_thinking", "data": d["data"]})
    return out


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw or "{}")
    except (orjson.JSONDecodeError, TypeError):
        raise invalid_request("Invalid request: tool call `arguments` must be a JSON object string.", param="messages") from None
    return value if isinstance(value, dict) else {"value": value}


def messages(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, messages) in Anthropic's shape."""
    system: list[dict[str, Any]] = []
    turns = Turns("content")
    add = turns.add
    for m in each_message(body):
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(b for b in _blocks(m.get("content")) if b["type"] == "text")
        elif role == "user":
            add("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _thinking_blocks(m) + _blocks(m.get("content"))
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                               "name": fn.get("name", ""), "input": _arguments(fn.get("arguments"))})
            add("assistant", blocks)
        elif role == "tool":
            content = m.get("content")
            result = {"type": "tool_result", "tool_use_id": m.get("tool_call_id", ""),
                      "content": content if isinstance(content, str) else _blocks(content)}
            add("user", [result])
        else:
            raise unknown_role(role)
    return system, turns.turns


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None = None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name", "")}
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def _thinking(wish: dict[str, Any], model: str, payload: dict[str, Any]) -> None:
    if wish.get("off"):
        return
    if _adaptive(model):
        payload["thinking"] = {"type": "adaptive"}
        effort = wish.get("effort")
        if not effort and isinstance(wish.get("max_tokens"), int):
            budget = wish["max_tokens"]
            effort = "low" if budget < 2048 else "medium" if budget < 8192 else "high"
        if effort in ("minimal", "low", "medium", "high", "xhigh", "max"):
            payload["output_config"] = {"effort": "low" if effort == "minimal" else effort}
        return
    max_tokens = payload["max_tokens"]
    if isinstance(wish.get("max_tokens"), int):
        budget = max(wish["max_tokens"], 1024)
    else:
        budget = max(min(int(max_tokens * EFFORT_RATIO.get(wish.get("effort") or "medium", 0.5)), 128000), 1024)
    payload["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if max_tokens <= budget:
        payload["max_tokens"] = budget + 1024


class Anthropic:
    speaks = frozenset({"messages"})

    def __init__(self, *, name: str, base_url: str, api_key: str = "", headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.url = under(base_url, "/v1/messages")
        self.headers = {"Content-Type": "application/json", "anthropic-version": VERSION, **(headers or {})}
        if api_key:
            self.headers["x-api-key"] = api_key

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest:
        body = ctx.body
        system, turns = messages(body)
        limit = ctx.model.entry.get("top_provider", {}).get("max_completion_tokens") or DEFAULT_MAX_TOKENS
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        payload: dict[str, Any] = {
            "model": upstream_model,
            "max_tokens": asked if isinstance(asked, int) and asked > 0 else min(limit, DEFAULT_MAX_TOKENS),
            "messages": turns,
        }
        if system:
            payload["system"] = system
        if ctx.stream:
            payload["stream"] = True
        stop = body.get("stop")
        if stop:
            payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            payload["tools"] = [self._tool(t) for t in tools if isinstance(t, dict)]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice and payload.get("tools"):
            payload["tool_choice"] = choice
        user = body.get("safety_identifier") or body.get("user")
        if isinstance(user, str) and user:
            payload["metadata"] = {"user_id": user[:256]}
        wish = reasoning_of(body)
        forced = choice is not None and choice["type"] in ("any", "tool")
        if wish is not None and not forced:
            _thinking(wish, upstream_model, payload)
        if "thinking" not in payload:  # Anthropic refuses sampling changes while thinking
            if isinstance(body.get("temperature"), (int, float)):
                payload["temperature"] = max(0.0, min(float(body["temperature"]), 1.0))
            for key in ("top_p", "top_k"):
                if isinstance(body.get(key), (int, float)):
                    payload[key] = body[key]
        return UpstreamRequest(self.url, self.headers, orjson.dumps(payload))

    def native_request(self, ctx: Context, upstream_model: str) -> UpstreamRequest:
        """A Messages request as it came: the client's version and betas, our key, the model's id here."""
        return UpstreamRequest(self.url, passthrough.headers(ctx, self.headers), passthrough.body(ctx, upstream_model))

    @staticmethod
    def _tool(tool: dict[str, Any]) -> dict[str, Any]:
        fn = tool.get("function") or {}
        out = {"name": fn.get("name", ""), "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
        if fn.get("description"):
            out["description"] = fn["description"]
        if isinstance(tool.get("cache_control"), dict):
            out["cache_control"] = tool["cache_control"]
        return out

    def translation(self, ctx: Context, content_type: str) -> Translation:
        return _Stream(ctx) if ctx.stream else _Message(ctx)

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        message = error_of(body)[1]
        ours, code = upstream_status(status, message)
        return error_body(ours, f"Anthropic: {message or f'HTTP {status}'}", code=code)


class _Message(WholeTranslation):
    """An Anthropic message in, an OpenAI chat completion out."""

    compact = True  # every chunk made by `Chunks` or orjson

    def translate(self, body: bytes) -> bytes:
        ctx = self.ctx
        msg = orjson.loads(body)
        exclude = excluded(ctx.body)
        text, reasoning, details, calls = [], [], [], []
        for i, block in enumerate(msg.get("content") or []):
            kind = block.get("type")
            if kind == "text":
                text.append(block.get("text", ""))
            elif kind == "tool_use":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": orjson.dumps(block.get("input", {})).decode()}})
            elif kind == "thinking" and not exclude:
                reasoning.append(block.get("thinking", ""))
                details.append({"type": "reasoning.text", "text": block.get("thinking", ""),
                                "signature": block.get("signature"), "format": FORMAT, "index": i})
            elif kind == "redacted_thinking" and not exclude:
                details.append({"type": "reasoning.encrypted", "data": block.get("data"), "format": FORMAT, "index": i})
        stop = msg.get("stop_reason")
        return completion(ctx, msg.get("id"), text, calls, reasoning, details, FINISH.get(stop, "stop"), stop,
                          usage(msg.get("usage") or {}))


_TEXT_EVENT = b'{"type":"content_block_delta","index":'
_TEXT_DELTA = b',"delta":{"type":"text_delta","text":'
_TEXT_HEAD = b"event: content_block_delta\ndata: " + _TEXT_EVENT
_EVENT_END = b"}}\n\n"


class _Stream(EventTranslation):
    """Anthropic events in, OpenAI chunks out."""

    compact = True  # every chunk made by `Chunks` or orjson

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.exclude = excluded(ctx.body)
        self.tool_index: dict[int, int] = {}
        self.counts: dict[str, Any] = {}

    def read(self, chunk: bytes) -> None:
        """A read's run of text deltas (most of a stream) is made in a few C-level passes and one
        slice per event, whatever its length; what comes before and after it goes event by event,
        in order.

        The run is `P s E P s E … P s E`: P, the event's head up to its text (the `event:` line,
        the type, the block's index, the delta's type), the same for each; s, the text as a JSON
        string; E, `}}` and the blank line, which no JSON string can hold: the run splits on it.
        Every piece must be P and a string, and the strings must parse as one array (a delta with
        another field after its text, or a cut string, would not)."""
        events = self._events
        mid = -1 if events.pending else chunk.find(_TEXT_DELTA)
        if mid < 0:
            self.translate(events.feed(chunk))
            return
        first = chunk.rfind(b"\n\n", 0, mid)
        first = 0 if first < 0 else first + 2
        head = chunk[first:mid + len(_TEXT_DELTA)] + b'"'
        whole = chunk.rfind(b"\n\n") + 2  # the end of the read's last whole event
        last = chunk.rfind(head[-60:], first, whole)  # (under 100 bytes: CPython need not prepare it)
        if not head.startswith(_TEXT_HEAD) or not head[len(_TEXT_HEAD):-len(_TEXT_DELTA) - 1].isdigit() or last < 0:
            self.translate(events.feed(chunk))
            return
        end = chunk.find(b"\n\n", last) + 2
        run = chunk[first:end]
        size = len(head) - 1
        pieces = run.split(_EVENT_END)
        texts = [piece[size:] for piece in pieces if piece[:size + 1] == head]
        try:
            made = len(texts) == len(pieces) - 1 and len(orjson.loads(b"[" + b",".join(texts) + b"]")) == len(texts)
        except orjson.JSONDecodeError:
            made = False
        if first:
            self.translate(events.feed(chunk[:first]))
        if not self.over:
            if made:
                self.parts.append(self.out.contents(texts))
            else:
                self.translate(events.feed(run))
        if end < len(chunk):
            self.translate(events.feed(chunk[end:]))

    def translate(self, events: list[tuple[str, bytes]]) -> None:
        out, parts = self.out, self.parts
        for name, raw in events:
            if not name or self.over:
                continue
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parts.append(out.error("The provider sent an invalid event."))
                self.over = True
                continue
            kind = event.get("type", name)
            if kind == "content_block_delta":  # most events: first
                delta = event.get("delta") or {}
                dtype = delta.get("type")
                if dtype == "text_delta":
                    parts.append(out.delta({"content": delta.get("text", "")}))
                else:
                    part = self._delta(event.get("index", 0), dtype, delta)
                    if part:
                        parts.append(part)
            elif kind == "ping":
                parts.append(b": ping\n\n")
            elif kind == "message_start":
                message = event.get("message") or {}
                if message.get("id"):
                    out.id = message["id"]
                self.counts.update(message.get("usage") or {})
                parts.append(out.delta({"role": "assistant", "content": ""}))
            elif kind == "content_block_start":
                part = self._start(event.get("index", 0), event.get("content_block") or {})
                if part:
                    parts.append(part)
            elif kind == "message_delta":
                self.counts.update(event.get("usage") or {})
                stop = (event.get("delta") or {}).get("stop_reason")
                if stop:
                    parts.append(out.delta({}, FINISH.get(stop, "stop")))
            elif kind == "message_stop":
                parts.append(self.totals(usage(self.counts)))
                self.over = True
            elif kind == "error":
                err = event.get("error") or {}
                status, _ = upstream_status(529 if err.get("type") == "overloaded_error" else 502, err.get("message", ""))
                parts.append(out.error(err.get("message") or "The provider reported an error.", status))
                self.over = True

    def _start(self, index: int, block: dict[str, Any]) -> bytes:
        out = self.out
        if block.get("type") == "tool_use":
            self.tool_index[index] = len(self.tool_index)
            return out.delta({"tool_calls": [{"index": self.tool_index[index], "id": block.get("id"), "type": "function",
                                              "function": {"name": block.get("name"), "arguments": ""}}]})
        if block.get("type") == "text" and block.get("text"):
            return out.delta({"content": block["text"]})
        if block.get("type") == "redacted_thinking" and not self.exclude:
            return out.delta({"reasoning_details": [{"type": "reasoning.encrypted", "data": block.get("data"),
                                                     "format": FORMAT, "index": index}]})
        return b""

    def _delta(self, index: int, dtype: Any, delta: dict[str, Any]) -> bytes:
        out = self.out
        if dtype == "input_json_delta" and delta.get("partial_json"):
            return out.delta({"tool_calls": [{"index": self.tool_index.get(index, 0),
                                              "function": {"arguments": delta["partial_json"]}}]})
        if dtype == "thinking_delta" and not self.exclude and delta.get("thinking"):
            text = delta["thinking"]
            return out.delta({"reasoning": text, "reasoning_details": [
                {"type": "reasoning.text", "text": text, "format": FORMAT, "index": index}]})
        if dtype == "signature_delta" and not self.exclude:
            return out.delta({"reasoning_details": [
                {"type": "reasoning.text", "signature": delta.get("signature"), "format": FORMAT, "index": index}]})
        return b""
