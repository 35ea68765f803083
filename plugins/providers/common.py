"""What the Anthropic and Gemini translators share: the caller's reasoning wish, data URLs, turns
whose roles must alternate, and what an upstream's error status means to the caller."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Callable

import orjson

from proxy.errors import invalid_request

if TYPE_CHECKING:
    from proxy.context import Context

EFFORT_RATIO = {"max": 0.95, "xhigh": 0.95, "high": 0.8, "medium": 0.5, "low": 0.2, "minimal": 0.1}
_DATA_URL = re.compile(r"^data:([\w/+.-]+);base64,(.*)$", re.S)


def reasoning_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The client's reasoning wish in OpenRouter's terms, or None for the model's default."""
    r = body.get("reasoning")
    wish: dict[str, Any] = dict(r) if isinstance(r, dict) else {}
    if isinstance(body.get("reasoning_effort"), str):
        wish.setdefault("effort", body["reasoning_effort"])
    if body.get("include_reasoning") is False:
        wish.setdefault("exclude", True)
    if not wish:
        return None
    if wish.get("enabled") is False or wish.get("effort") == "none":
        wish["off"] = True
    return wish


def excluded(body: dict[str, Any]) -> bool:
    """Did the client ask for the reasoning to be left out of the answer?"""
    return bool((reasoning_of(body) or {}).get("exclude"))


def data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:` URL, or None for any other URL."""
    m = _DATA_URL.match(url)
    return (m.group(1), m.group(2)) if m else None


def image_url(part: dict[str, Any]) -> str:
    """The URL of an OpenAI `image_url` part, in either of its shapes."""
    image = part.get("image_url")
    return image.get("url", "") if isinstance(image, dict) else str(image or "")


def file_data(part: dict[str, Any]) -> tuple[str, str] | None:
    """(media type, base64 data) of an OpenAI `file` part sent inline, else None."""
    return data_url((part.get("file") or {}).get("file_data", "") or "")


def parts_of(content: Any, convert: Callable[[Any], dict[str, Any] | None], text: Callable[[str], dict[str, Any]]
             ) -> list[dict[str, Any]]:
    """A message's content as the upstream's parts: a string is one text part, a list is converted
    part by part (what has no counterpart is left out)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [text(content)] if content else []
    if isinstance(content, list):
        return [p for p in map(convert, content) if p is not None]
    raise invalid_request("Invalid request: message `content` must be a string or an array of parts.", param="messages")


class Turns:
    """Messages for an upstream whose roles must alternate: parts for the same role as the last turn
    join it. `key` is where a turn keeps its parts ("content" for Anthropic, "parts" for Gemini)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.turns: list[dict[str, Any]] = []

    def add(self, role: str, parts: list[dict[str, Any]]) -> None:
        if not parts:
            return
        if self.turns and self.turns[-1]["role"] == role:
            self.turns[-1][self.key].extend(parts)
        else:
            self.turns.append({"role": role, self.key: parts})


def each_message(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's messages, each checked to be an object."""
    messages = body["messages"]
    for m in messages:
        if not isinstance(m, dict):
            raise invalid_request("Invalid request: every message must be an object.", param="messages")
    return messages


def unknown_role(role: Any) -> Exception:
    return invalid_request(f"Invalid request: unknown message role {str(role)[:40]!r}.", param="messages")


def completion(ctx: Context, upstream_id: Any, text: list[str], calls: list[dict[str, Any]], reasoning: list[str],
               details: list[dict[str, Any]], finish: str, native_finish: Any, usage: dict[str, Any]) -> bytes:
    """An OpenAI chat completion, from what a translator gathered of the upstream's answer."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if reasoning or details:
        message["reasoning"] = "".join(reasoning) or None
        message["reasoning_details"] = details
    return orjson.dumps({
        "id": upstream_id or f"chatcmpl-{ctx.request_id}", "object": "chat.completion", "created": int(time.time()),
        "model": ctx.model.id,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "native_finish_reason": native_finish,
                     "logprobs": None}],
        "usage": usage,
    })


def upstream_status(status: int, message: str) -> tuple[int, str | None]:
    """Our status (and a code) for a provider's error status and message."""
    lowered = message.lower()
    if status in (400, 413) and any(s in lowered for s in ("too long", "context window", "context length", "exceeds the maximum", "token count")):
        return 400, "context_length_exceeded"
    if status in (529, 503) or "overloaded" in lowered:
        return 503, "upstream_overloaded"
    if status >= 500:
        return 502, None
    return status, None
