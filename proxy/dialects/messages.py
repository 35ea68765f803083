"""Anthropic Messages served inbound: a Messages request becomes the gateway's chat request (so every
stage and every provider serve it unchanged), and the chat answer goes back as a Messages answer with
the event sequence Anthropic's SDKs and Claude Code expect.

Mappings: Messages request to chat, and chat answer (JSON or chunks) to Messages, block by block:
thinking, then text, then tool_use, each opened, filled and closed in turn; usage in Anthropic's
convention (input tokens without cache reads and writes); errors as `{"type":"error",…}`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import GatewayError, invalid_request


FORMAT = "anthropic-claude-v1"  # reasoning_details format of Anthropic thinking, as OpenRouter names it
STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
        "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


# -- errors ---------------------------------------------------------------------------------------

def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_doc(status: int, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type(status), "message": message}})


def render(error: GatewayError) -> web.Response:
    """A refusal in Anthropic's shape (the endpoint wrapper's renderer for Messages routes)."""
    return web.Response(status=error.status, body=error_doc(error.status, error.message),
                        content_type="application/json", headers=error.headers)


_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'


def _event(kind: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def error_event(status: int, message: str) -> bytes:
    return _event("error", {"type": "error", "error": {"type": error_type(status), "message": message}})


# -- request: Messages -> chat ----------------------------------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _media(source: Any) -> str | None:
    """A data URL (or plain URL) for an image or document source."""
    if not isinstance(source, dict):
        return None
    if source.get("type") == "base64":
        return f"data:{source.get('media_type', 'application/octet-stream')};base64,{source.get('data', '')}"
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return None


def _part(block: dict[str, Any]) -> dict[str, Any] | None:
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    if kind == "image":
        url = _media(block.get("source"))
        return {"type": "image_url", "image_url": {"url": url}} if url else None
    if kind == "document":
        source = block.get("source") or {}
        if isinstance(source, dict) and source.get("type") == "text":
            return {"type": "text", "text": source.get("data", "")}
        url = _media(source)
        if url and url.startswith("data:"):
            return {"type": "file", "file": {"filename": block.get("title") or "document.pdf", "file_data": url}}
        return None
    return None


def _user(content: Any, out: list[dict[str, Any]]) -> None:
    """A user turn: its tool results first, each its own tool message, then the rest."""
    if isinstance(content, str):
        out.append({"role": "user", "content": content})
        return
    parts: list[dict[str, Any]] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "tool_result":
            text = _text(block.get("content"))
            if block.get("is_error"):
                text = "Error: " + text
            out.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text})
        elif block.get("type") == "mid_conv_system":
            out.append({"role": "system", "content": _text(block.get("content"))})
        else:
            part = _part(block)
            if part is not None:
                parts.append(part)
    if parts:
        out.append({"role": "user", "content": parts})


def _assistant(content: Any, out: list[dict[str, Any]]) -> None:
    if isinstance(content, str):
        out.append({"role": "assistant", "content": content})
        return
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    for i, block in enumerate(content if isinstance(content, list) else []):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": block.get("name", ""), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind == "thinking":  # carried as it came, signature and all, for the next turn
            details.append({"type": "reasoning.text", "text": block.get("thinking", ""),
                            "signature": block.get("signature"), "format": FORMAT, "index": i})
        elif kind == "redacted_thinking":
            details.append({"type": "reasoning.encrypted", "data": block.get("data"), "format": FORMAT, "index": i})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if details:
        message["reasoning_details"] = details
    out.append(message)


def _tool(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or "input_schema" not in tool:
        raise invalid_request("Invalid request: only custom tools (with an `input_schema`) are supported.",
                              param="tools")
    fn: dict[str, Any] = {"name": tool.get("name", ""), "parameters": tool.get("input_schema") or {}}
    if tool.get("description"):
        fn["description"] = tool["description"]
    return {"type": "function", "function": fn}


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions request for a Messages request (already checked for its shape)."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for m in body["messages"]:
        role, content = m.get("role"), m.get("content")
        if role == "user":
            _user(content, messages)
        elif role == "assistant":
            _assistant(content, messages)
        elif role == "system":
            messages.append({"role": "system", "content": _text(content)})
        else:
            raise invalid_request(f"Invalid request: unknown message role {str(role)[:40]!r}.", param="messages")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages,
                            "max_completion_tokens": body["max_tokens"]}
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    for key in ("temperature", "top_p"):
        if isinstance(body.get(key), (int, float)) and not isinstance(body.get(key), bool):
            chat[key] = body[key]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chat["tools"] = [_tool(t) for t in tools]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        chat["tool_choice"] = mapped if mapped else {"type": "function", "function": {"name": choice.get("name", "")}}
        if choice.get("disable_parallel_tool_use") is True:
            chat["parallel_tool_calls"] = False
    thinking = body.get("thinking")
    effort = (body.get("output_config") or {}).get("effort") if isinstance(body.get("output_config"), dict) else None
    if isinstance(thinking, dict):
        if thinking.get("type") == "enabled" and isinstance(thinking.get("budget_tokens"), int):
            chat["reasoning"] = {"max_tokens": max(thinking["budget_tokens"], 1024)}
        elif thinking.get("type") == "adaptive":
            chat["reasoning"] = {"effort": effort} if isinstance(effort, str) else {"enabled": True}
        elif thinking.get("type") == "disabled":
            chat["reasoning"] = {"enabled": False}
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt.get("schema") or {}, "strict": True}}
    user = (body.get("metadata") or {}).get("user_id") if isinstance(body.get("metadata"), dict) else None
    if isinstance(user, str) and user:
        chat["user"] = hashlib.sha256(user.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return chat


def check(body: Any, counting: bool = False) -> dict[str, Any]:
    """The Messages body, or a 400 saying what is wrong with it."""
    if not isinstance(body, dict):
        raise invalid_request("Request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise invalid_request("messages: must be a non-empty array of objects.", param="messages")
    if not counting:
        limit = body.get("max_tokens")
        if type(limit) is not int or limit < 0:
            raise invalid_request("max_tokens: Field required, a whole number of 0 or more.", param="max_tokens")
        if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
            raise invalid_request("stream: must be a boolean.", param="stream")
    return body


def count_tokens(body: dict[str, Any]) -> int:
    """An estimate of a request's input tokens: a token per four characters of what the model would
    read (system, messages, tools), never 0 for a request with any content."""
    size = len(orjson.dumps([body.get("system"), body.get("messages"), body.get("tools")]))
    return max(1, math.ceil(size / 4))


# -- answer: chat -> Messages -------------------------------------------------------------------------

def _usage(chat: Any) -> dict[str, int]:
    """Anthropic's usage from OpenAI's: input tokens do not include cache reads and writes."""
    u = chat if isinstance(chat, dict) else {}
    details = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    read = int(details.get("cached_tokens") or 0)
    write = int(details.get("cache_write_tokens") or 0)
    prompt = int(u.get("prompt_tokens") or 0)
    return {"input_tokens": max(prompt - read - write, 0), "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read, "output_tokens": int(u.get("completion_tokens") or 0)}


def _arguments(raw: Any) -> Any:
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


class MessagesAnswer:
    """The chat answer on its way out, turned into Messages. For a stream, `feed` takes whole chat
    events (what the meter releases) and returns Anthropic events; JSON is turned at `end`."""

    def __init__(self, request_id: str, model: str, stream: bool, input_estimate: int) -> None:
        self.id = "msg_" + request_id
        self.model = model  # the name the client asked for
        self.stream = stream
        self.input_estimate = input_estimate
        self._json: list[bytes] = []
        self._started = False
        self._block: str | None = None  # the open block's kind: thinking, text, tool_use
        self._index = -1  # the open block's index
        self._tools: dict[int, int] = {}  # chat tool-call index -> block index
        self._signature = ""
        self._stop: str | None = None
        self._usage: dict[str, int] | None = None
        self._done = False

    # JSON
    def body(self, chat: bytes) -> bytes:
        doc = orjson.loads(chat)
        if "error" in doc and "choices" not in doc:
            err = doc.get("error") or {}
            return error_doc(502, str(err.get("message") or "The provider sent an error."))
        choice = (doc.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        content: list[dict[str, Any]] = []
        for d in message.get("reasoning_details") or []:
            if isinstance(d, dict) and d.get("type") == "reasoning.text":
                content.append({"type": "thinking", "thinking": d.get("text") or "", "signature": d.get("signature") or ""})
            elif isinstance(d, dict) and d.get("type") == "reasoning.encrypted" and d.get("format") == FORMAT:
                content.append({"type": "redacted_thinking", "data": d.get("data") or ""})
        reasoning = message.get("reasoning") or message.get("reasoning_content")
        if not content and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{self.id}", "name": fn.get("name", ""),
                            "input": _arguments(fn.get("arguments"))})
        stop = "tool_use" if message.get("tool_calls") else STOP.get(choice.get("finish_reason"), "end_turn")
        return orjson.dumps({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                             "content": content, "stop_reason": stop, "stop_sequence": None,
                             "usage": _usage(doc.get("usage"))})

    # stream
    def feed(self, data: bytes) -> bytes:
        if not self.stream:
            self._json.append(data)
            return b""
        out: list[bytes] = []
        for event in data.split(b"\n\n"):
            if not event.startswith(b"data: "):
                if event.startswith(b":"):
                    out.append(event + b"\n\n")  # a keep-alive comment: left as it is
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                self._finish(out)
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            self._chunk(chunk, out)
        return b"".join(out)

    def end(self) -> bytes:
        if not self.stream:
            return self.body(b"".join(self._json)) if self._json else b""
        out: list[bytes] = []
        if not self._done and self._stop is not None:
            self._finish(out)
        return b"".join(out)

    def error_body(self, status: int, message: str) -> bytes:
        """An error answer (nothing sent yet) in Anthropic's shape."""
        return error_doc(status, message)

    def error(self, status: int, message: str) -> bytes:
        """The error that ends a stream: Anthropic's `error` event, then nothing (never a fake end)."""
        self._done = True
        return error_event(status, message)

    def _start(self, out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            out.append(_event("message_start", {"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": self.input_estimate, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0, "output_tokens": 1}}}))

    def _open(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self._index += 1
        self._block = kind
        out.append(_event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                  "content_block": block}))

    def _close(self, out: list[bytes]) -> None:
        if self._block is None:
            return
        if self._block == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": self._signature}))
            self._signature = ""
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        self._block = None

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def _text_delta(self, kind: bytes, key: bytes, text: str) -> bytes:
        """A text or thinking delta, the most frequent event, written without building its object."""
        return b"".join((_DELTA_HEAD, str(self._index).encode(), b',"delta":{"type":"', kind, b'","', key, b'":',
                         orjson.dumps(text), b"}}\n\n"))

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if self._done:
            return
        if "error" in chunk:  # the gateway's or a translator's error chunk
            err = chunk.get("error") or {}
            code = err.get("code")
            self._start(out)
            out.append(self.error(code if isinstance(code, int) else 502, str(err.get("message") or "error")))
            return
        self._start(out)
        if isinstance(chunk.get("usage"), dict):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning") or delta.get("reasoning_content")  # OpenRouter's, or DeepSeek's
            for d in delta.get("reasoning_details") or []:
                if isinstance(d, dict) and d.get("signature"):
                    self._signature = d["signature"]
                if isinstance(d, dict) and not reasoning and d.get("type") == "reasoning.text" and d.get("text"):
                    reasoning = d["text"]
            if reasoning:
                if self._block != "thinking":
                    self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                out.append(self._text_delta(b"thinking_delta", b"thinking", reasoning))
            if delta.get("content"):
                if self._block != "text":
                    self._open("text", {"type": "text", "text": ""}, out)
                out.append(self._text_delta(b"text_delta", b"text", delta["content"]))
            for call in delta.get("tool_calls") or []:
                position = call.get("index", 0)
                fn = call.get("function") or {}
                if position not in self._tools:
                    self._open("tool_use", {"type": "tool_use", "id": call.get("id") or f"toolu_{self.id}_{position}",
                                            "name": fn.get("name") or "", "input": {}}, out)
                    self._tools[position] = self._index
                if fn.get("arguments") and self._tools[position] == self._index:
                    out.append(self._delta({"type": "input_json_delta", "partial_json": fn["arguments"]}))
            finish = choice.get("finish_reason")
            if finish:
                self._stop = "tool_use" if self._tools else STOP.get(finish, "end_turn")

    def _finish(self, out: list[bytes]) -> None:
        if self._done:
            return
        self._done = True
        self._start(out)
        self._close(out)
        usage = self._usage or {"input_tokens": self.input_estimate, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0, "output_tokens": 0}
        out.append(_event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": self._stop or "end_turn", "stop_sequence": None},
                                            "usage": usage}))
        out.append(_event("message_stop", {"type": "message_stop"}))



