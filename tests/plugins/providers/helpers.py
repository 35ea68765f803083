"""Reading what a client receives from a translated stream."""

from __future__ import annotations

import json
from typing import Any


def chat_body(model: str, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A one-message chat request; streams ask for the usage chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return body


def chunks_of(body: bytes) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(JSON chunks, other events such as comments and [DONE]) in order."""
    docs, others = [], []
    for event in body.split(b"\n\n"):
        if event.startswith(b"data: {"):
            docs.append(json.loads(event[6:]))
        elif event:
            others.append(event)
    return docs, others


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client rebuilds from the deltas: text, reasoning, tool calls, finish reason, usage."""
    text, reasoning, calls, details = "", "", {}, []
    finish, usage = None, None
    for c in chunks:
        usage = c.get("usage") or usage
        for choice in c.get("choices", []):
            d = choice.get("delta", {})
            text += d.get("content") or ""
            reasoning += d.get("reasoning") or ""
            details += d.get("reasoning_details") or []
            for tc in d.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                call["id"] = tc.get("id") or call["id"]
                call["name"] = (tc.get("function") or {}).get("name") or call["name"]
                call["arguments"] += (tc.get("function") or {}).get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return {"text": text, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)], "details": details,
            "finish": finish, "usage": usage}
