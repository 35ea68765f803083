"""An example Turnstile provider: Ollama's native chat API (`POST /api/chat`, NDJSON streaming).

Install it next to Turnstile (`pip install ./deploy/examples/turnstile-ollama`) and name it in a
provider row: `use = "ollama-chat"`. An adapter does no I/O: it builds the upstream request and
translates the answer; Turnstile sends, streams, meters and bills. Its contract is `proxy.provider`.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxy.provider import Chunks, Translation, UpstreamRequest, WholeTranslation, error_body, wants_usage
from proxy.context import Context
from proxy.sse import DONE


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _usage(done: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = done.get("prompt_eval_count", 0), done.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OllamaChat:
    def __init__(self, *, name: str, base_url: str, api_key: str = "", headers: dict[str, str] | None = None,
                 keep_alive: str = "5m") -> None:
        self.name = name
        self.url = base_url.rstrip("/") + "/api/chat"
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.keep_alive = keep_alive  # an option: `options = { keep_alive = "1h" }` in the provider row

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest:
        body = ctx.body
        options = {k: body[k] for k in ("temperature", "top_p", "seed") if k in body}
        if isinstance(body.get("max_tokens"), int):
            options["num_predict"] = body["max_tokens"]
        payload = {
            "model": upstream_model,
            "messages": [{"role": m.get("role"), "content": _text(m.get("content"))} for m in body["messages"]],
            "stream": ctx.stream,
            "keep_alive": self.keep_alive,
            "options": options,
        }
        return UpstreamRequest(self.url, self.headers, orjson.dumps(payload))

    def translation(self, ctx: Context, content_type: str) -> Translation:
        return _Stream(ctx) if ctx.stream else _Reply(ctx)

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        try:
            message = str(orjson.loads(body).get("error") or "")
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return error_body(status if status < 500 else 502, f"Ollama: {message or f'HTTP {status}'}")


class _Reply(WholeTranslation):
    """One JSON answer, translated once it has all arrived."""

    def translate(self, body: bytes) -> bytes:
        doc = orjson.loads(body)
        return orjson.dumps({
            "id": f"chatcmpl-{self.ctx.request_id}", "object": "chat.completion", "created": 0, "model": self.ctx.model.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": doc["message"]["content"]},
                         "finish_reason": "length" if doc.get("done_reason") == "length" else "stop"}],
            "usage": _usage(doc),
        })


class _Stream:
    """Ollama's NDJSON lines in, OpenAI chunks out, a read at a time."""

    stream = True

    def __init__(self, ctx: Context) -> None:
        self.out = Chunks(ctx)
        self.send_usage = wants_usage(ctx.body)
        self.usage: dict[str, Any] | None = None
        self.over = False
        self.buffer = b""
        self.started = False

    def feed(self, chunk: bytes) -> bytes:
        made = []
        if not self.started:
            self.started = True
            made.append(self.out.delta({"role": "assistant", "content": ""}))
        *lines, self.buffer = (self.buffer + chunk).split(b"\n")
        for line in filter(None, lines):
            if self.over:
                break
            doc = orjson.loads(line)
            if doc.get("message", {}).get("content"):
                made.append(self.out.delta({"content": doc["message"]["content"]}))
            if doc.get("done"):
                made.append(self.out.delta({}, "length" if doc.get("done_reason") == "length" else "stop"))
                self.usage = _usage(doc)
                if self.send_usage:
                    made.append(self.out.usage(self.usage))
                made.append(DONE)
                self.over = True
        return b"".join(made)

    def end(self) -> tuple[bytes, dict[str, Any] | None]:
        if not self.over:
            return self.out.error("Ollama closed the stream before it was done."), None
        return b"", None if self.send_usage else self.usage
