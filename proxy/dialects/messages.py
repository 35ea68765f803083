"""Anthropic Messages served inbound: a Messages request becomes the gateway's chat request, so that
every stage and every provider serve it unchanged (`messages_answer.py` turns the answer back).
Also Anthropic's error shape, and the `count_tokens` estimate.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import orjson
from aiohttp import web

from proxy.dialects.responses import carried
from proxy.errors import GatewayError, invalid_request

FORMAT = "anthropic-claude-v1"  # reasoning_details format of Anthropic thinking, as OpenRouter names it
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


def sse_event(kind: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def error_event(status: int, message: str) -> bytes:
    return sse_event("error", {"type": "error", "error": {"type": error_type(status), "message": message}})


def chat_usage(u: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's usage (input tokens without the cache reads and writes) as OpenAI's."""
    read = u.get("cache_read_input_tokens") or 0
    write = u.get("cache_creation_input_tokens") or 0
    prompt = (u.get("input_tokens") or 0) + read + write
    completion = u.get("output_tokens") or 0
    out: dict[str, Any] = {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    }
    thinking = (u.get("output_tokens_details") or {}).get("thinking_tokens")
    if thinking:
        out["completion_tokens_details"] = {"reasoning_tokens": thinking}
    return out


# -- request: Messages -> chat ----------------------------------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text")
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


def _part(block: dict[str, Any]) -> dict[str, Any]:
    """A user block as a chat part; a 400 naming what has none (an unknown block, a source that
    cannot be sent on), rather than a turn that silently loses it."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": str(block.get("text") or "")}
    if kind == "image":
        url = _media(block.get("source"))
        if not url:
            raise invalid_request("Invalid request: an image needs a `base64` or `url` source.", param="messages")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "document":
        source = block.get("source") or {}
        if isinstance(source, dict) and source.get("type") == "text":
            return {"type": "text", "text": str(source.get("data") or "")}
        url = _media(source)
        if url and url.startswith("data:"):
            return {"type": "file", "file": {"filename": block.get("title") or "document.pdf", "file_data": url}}
        raise invalid_request("Invalid request: a document needs a `base64` or `text` source here (not a URL or a "
                              "file id).", param="messages")
    raise invalid_request(f"Invalid request: content blocks of type {str(kind)[:40]!r} are not supported here.",
                          param="messages")


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
            parts.append(_part(block))
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
            text.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            if not isinstance(block.get("input", {}), dict):
                raise invalid_request("Invalid request: a tool_use block's `input` must be an object.", param="messages")
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": {
                "name": block.get("name", ""), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind == "thinking":  # carried as it came, signature and all, for the next turn
            details.append({"type": "reasoning.text", "text": block.get("thinking", ""),
                            "signature": block.get("signature"), "format": FORMAT, "index": i})
        elif kind == "redacted_thinking":
            carried_details = carried(block.get("data"))
            if carried_details:  # another provider's, carried by the gateway: given back as it was
                details.extend(carried_details)
            else:
                details.append({"type": "reasoning.encrypted", "data": block.get("data"), "format": FORMAT, "index": i})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if details:
        message["reasoning_details"] = details
    out.append(message)


SERVER_TOOLS = ("Invalid request: this model's provider is reached through chat completions, which has no server "
                "tools (web search, code execution…): only custom tools (with an `input_schema`) can be used here.")


def untranslatable(body: dict[str, Any]) -> GatewayError | None:
    """Why the request cannot be translated (it can still be passed through), or None."""
    tools = body.get("tools")
    if isinstance(tools, list) and any(isinstance(t, dict) and "input_schema" not in t for t in tools):
        return invalid_request(SERVER_TOOLS, param="tools")
    return None


def _tool(tool: Any) -> dict[str, Any]:
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
    if not any(m["role"] != "system" for m in messages):
        raise invalid_request("messages: no turn has any content this gateway can send on.", param="messages")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages,
                            "max_completion_tokens": body["max_tokens"]}
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if _OPTIONAL & body.keys():  # any of the fields below (a bare request has none: nothing to look up)
        _options(body, chat)
    return chat


def _options(body: dict[str, Any], chat: dict[str, Any]) -> None:
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    for key in ("temperature", "top_p"):
        if isinstance(body.get(key), (int, float)) and not isinstance(body.get(key), bool):
            chat[key] = body[key]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:  # server tools: for a provider that runs them (`untranslatable`)
        chat["tools"] = [_tool(t) for t in tools if isinstance(t, dict) and "input_schema" in t] or None
        if chat["tools"] is None:
            del chat["tools"]
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


_TYPES = {"system": (str, list), "tools": list, "stop_sequences": list, "tool_choice": dict, "thinking": dict,
          "metadata": dict, "output_config": dict}
_ROLES = frozenset(("user", "assistant", "system"))
_OPTIONAL = frozenset(("stop_sequences", "temperature", "top_p", "tools", "tool_choice", "thinking", "output_config",
                       "metadata"))


def check(body: Any, counting: bool = False) -> dict[str, Any]:
    """The Messages body, or a 400 saying what is wrong with it."""
    if type(body) is not dict:
        raise invalid_request("Request body must be a JSON object.")
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        raise invalid_request("messages: must be a non-empty array of objects.", param="messages")
    for i, m in enumerate(messages):
        if type(m) is not dict:
            raise invalid_request("messages: must be a non-empty array of objects.", param="messages")
        content = m.get("content")
        if type(content) is not str and (type(content) is not list or not all(type(b) is dict for b in content)):
            raise invalid_request(f"messages.{i}.content: must be a string or an array of content blocks.",
                                  param="messages")
        role = m.get("role")
        if type(role) is not str or role not in _ROLES:
            raise invalid_request(f"messages.{i}.role: must be \"user\" or \"assistant\".", param="messages")
    for field in _TYPES.keys() & body.keys():  # the optional fields present, only
        value = body[field]
        if value is not None and not isinstance(value, _TYPES[field]):
            raise invalid_request(f"{field}: has the wrong type.", param=field)
        if field == "tools" and value and not all(isinstance(t, dict) for t in value):
            raise invalid_request("tools: every tool must be an object.", param="tools")
        if field == "stop_sequences" and value and not all(isinstance(x, str) for x in value):
            raise invalid_request("stop_sequences: must be an array of strings.", param="stop_sequences")
    if not counting:
        limit = body.get("max_tokens")
        if type(limit) is not int or limit < 0:
            raise invalid_request("max_tokens: Field required, a whole number of 0 or more.", param="max_tokens")
        stream = body.get("stream")
        if stream is not None and type(stream) is not bool:
            raise invalid_request("stream: must be a boolean.", param="stream")
    return body


def count_tokens(body: dict[str, Any]) -> int:
    """An estimate of a request's input tokens: a token per four characters of what the model would
    read (system, messages, tools), never 0 for a request with any content."""
    size = len(orjson.dumps([body.get("system"), body.get("messages"), body.get("tools")]))
    return max(1, math.ceil(size / 4))
