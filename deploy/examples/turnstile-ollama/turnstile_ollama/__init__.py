"""An example Turnstile provider: Ollama's native chat API (`POST /api/chat`, NDJSON streaming).

Install it next to Turnstile (`pip install ./deploy/examples/turnstile-ollama`) and name it in a
provider row: `use = "ollama-chat"`. An adapter does no I/O: it builds the upstream request and
translates the answer; Turnstile's forwarder sends, streams, meters and bills.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import orjson

from plugins.providers.base import Chunks, UpstreamRequest, error_body, wants_usage
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
    passthrough = False  # a translator: Turnstile calls the translate_* methods

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

    def translate_body(self, ctx: Context, body: bytes) -> bytes:
        doc = orjson.loads(body)
        return orjson.dumps({
            "id": f"chatcmpl-{ctx.request_id}", "object": "chat.completion", "created": 0, "model": ctx.model.id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": doc["message"]["content"]},
                         "finish_reason": "length" if doc.get("done_reason") == "length" else "stop"}],
            "usage": _usage(doc),
        })

    async def translate_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        out = Chunks(ctx)
        yield out.delta({"role": "assistant", "content": ""})
        buffer = b""
        async for chunk in chunks:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in filter(None, lines):
                doc = orjson.loads(line)
                if doc.get("message", {}).get("content"):
                    yield out.delta({"content": doc["message"]["content"]})
                if doc.get("done"):
                    yield out.delta({}, "length" if doc.get("done_reason") == "length" else "stop")
                    if wants_usage(ctx.body):
                        yield out.usage(_usage(doc))
                    elif ctx.meter is not None:
                        ctx.meter.observe(_usage(doc))
                    yield DONE
                    return
        yield out.error("Ollama closed the stream before it was done.")

    def translate_error(self, status: int, body: bytes) -> tuple[int, bytes]:
        try:
            message = str(orjson.loads(body).get("error") or "")
        except (orjson.JSONDecodeError, AttributeError):
            message = ""
        return error_body(status if status < 500 else 502, f"Ollama: {message or f'HTTP {status}'}")
