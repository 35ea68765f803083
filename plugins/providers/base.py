"""What a provider adapter is: it builds the upstream request and, if it translates, the answer.

Adapters do no I/O: `proxy.forward` owns the connection, timeouts and streaming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

import orjson

from proxy.sse import DONE, Events, data

if TYPE_CHECKING:
    from proxy.context import Context


@dataclass(slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes


class Provider(Protocol):
    """Built once at start-up from a `[[providers]]` row: `Adapter(name=, base_url=, api_key=, headers=)`."""

    name: str
    passthrough: bool  # True: the upstream speaks OpenAI chat completions; bytes are copied through

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest: ...

    def translate_body(self, ctx: Context, body: bytes) -> bytes: ...

    def translate_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]: ...

    def translate_error(self, status: int, body: bytes) -> tuple[int, bytes]: ...


def wants_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for the usage chunk (OpenAI's stream_options or OpenRouter's usage.include)?"""
    options, usage = body.get("stream_options"), body.get("usage")
    return (isinstance(options, dict) and options.get("include_usage") is True) or (
        isinstance(usage, dict) and usage.get("include") is True
    )


def reasoning_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The client's reasoning wish in OpenRouter's terms (B.2), or None for the model's default."""
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


EFFORT_RATIO = {"max": 0.95, "xhigh": 0.95, "high": 0.8, "medium": 0.5, "low": 0.2, "minimal": 0.1}


class Chunks:
    """Builds the OpenAI chunks a translator sends, all with one id, time and model. What every delta
    chunk shares (`data: ` and `base`) is encoded once per id, not once per event."""

    def __init__(self, ctx: Context, upstream_id: str = "") -> None:
        self.base = {"id": upstream_id or f"chatcmpl-{ctx.request_id}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": ctx.model.id}
        self._head_id: str | None = None
        self._head = b""

    @property
    def id(self) -> str:
        return self.base["id"]

    @id.setter
    def id(self, value: str) -> None:
        self.base["id"] = value

    def delta(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        """`data({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})`."""
        if self._head_id is not self.base["id"]:
            self._head_id = self.base["id"]
            self._head = b"data: " + orjson.dumps(self.base)[:-1] + b',"choices":[{"index":0,"delta":'
        end = b',"finish_reason":null}]}\n\n' if finish is None else b',"finish_reason":' + orjson.dumps(finish) + b"}]}\n\n"
        return b"".join((self._head, orjson.dumps(delta), end))

    def usage(self, usage: dict[str, Any]) -> bytes:
        return data({**self.base, "choices": [], "usage": usage})

    def error(self, message: str, code: int = 502) -> bytes:
        chunk = {
            **self.base,
            "error": {"message": message, "code": code, "type": "upstream_error"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }
        return data(chunk) + DONE


class StreamTranslation:
    """One streamed answer's translation, fed the upstream's events a read at a time: what a read
    holds is translated in one loop and sent as one piece. A translator writes `translate`, which
    appends OpenAI chunks to `parts` (and `finish` if the upstream's end is not an error)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.out = Chunks(ctx)
        self.exclude = bool((reasoning_of(ctx.body) or {}).get("exclude"))
        self.parts: list[bytes] = []  # made from the current read, not sent yet
        self.over = False  # the answer ended, or broke: nothing after it is read

    def translate(self, events: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError

    def finish(self) -> bytes:
        """What follows when the upstream closes the stream before the answer is over."""
        return self.out.error("The provider closed the stream before it was complete.")

    async def run(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        reader = Events()
        try:
            async for chunk in chunks:
                self.translate(reader.feed(chunk))
                if self.parts:
                    yield self._take()
                if self.over:
                    return
            self.translate(reader.end())
            if not self.over:
                self.parts.append(self.finish())
            if self.parts:
                yield self._take()
        except Exception:
            if self.parts:  # what the read gave before an event that could not be translated goes first
                yield self._take()
            raise

    def _take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def error_body(status: int, message: str, error_type: str = "upstream_error", code: str | None = None) -> tuple[int, bytes]:
    from proxy.errors import GatewayError

    err = GatewayError(status, error_type, message, code=code)
    return status, orjson.dumps(err.body())


def error_of(body: bytes) -> tuple[dict[str, Any], str]:
    """The `error` object of a provider's JSON error body and its message ({} and "" when none)."""
    try:
        err = orjson.loads(body).get("error") or {}
        return err, str(err.get("message") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return {}, ""


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
