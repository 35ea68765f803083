"""The provider contract: what an adapter is, and the toolkit translating adapters share.

An adapter is built once at start-up from a `[[providers]]` row (`Adapter(name=, base_url=, api_key=,
headers=, **options)`) and does no I/O: the core sends its request, reads the answer, meters, bills
and relays. Per request it does two things:

- `request(ctx, upstream_model)`: the upstream request for the caller's OpenAI chat request;
- `translation(ctx, content_type)`: the object that turns the upstream's answer, as it is read, into
  the gateway's (OpenAI chat completions: JSON, or chunks as server-sent events). `feed` returns what
  can be sent now; `end` returns the rest, and the usage when the answer itself does not carry it.

Relaying an OpenAI-compatible upstream untouched is just the translation that returns what it is fed
(`Passthrough`). Errors from upstreams go through `error`, which may reword them.

An adapter whose upstream also speaks an inbound dialect (Anthropic Messages, OpenAI Responses) names
it in `speaks`; a request that came in that dialect is then sent as it came, by `native_request`,
and its answer relayed untouched (`proxy.dialects.passthrough`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from proxy.errors import GatewayError
from proxy.sse import DONE, Events, data

if TYPE_CHECKING:
    from proxy.context import Context

Usage = dict[str, Any]  # OpenAI's usage object: prompt_tokens, completion_tokens, their details


def under(base_url: str, path: str) -> str:
    """`path` under a provider's base URL, the base's query kept after it (Azure OpenAI's
    `?api-version=…`): `under("https://h/v1?x=1", "/chat/completions")` is
    `https://h/v1/chat/completions?x=1`."""
    head, mark, query = base_url.partition("?")
    return head.rstrip("/") + path + mark + query


@dataclass(slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes


class UnreadableAnswer(ValueError):
    """What a translation raises for an answer it cannot read; `made` is what it translated of the
    same read before that, which the client gets before the error chunk."""

    def __init__(self, message: str, made: bytes = b"") -> None:
        super().__init__(message)
        self.made = made


class Translation(Protocol):
    """One answer on its way back. `stream`: whether the gateway's answer is server-sent events;
    `over`: the answer has ended (an upstream that goes on sending after it is not read further).
    Optional `compact = True`: all it makes is compact JSON (orjson's, as `Chunks` writes it), so
    the meter need not also look for the spaced form of `"usage": {` in every read."""

    stream: bool
    over: bool

    def feed(self, chunk: bytes) -> bytes:
        """What one upstream read makes, to send now (b"" to wait for more). Raises UnreadableAnswer
        (or ValueError, KeyError, TypeError) for what cannot be translated."""
        ...

    def end(self) -> tuple[bytes, Usage | None]:
        """The rest of the answer once the upstream's has ended, and the usage if the client was not
        sent it. Raises ValueError (or KeyError, TypeError) for an answer that cannot be read."""
        ...


class Provider(Protocol):
    name: str

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest: ...

    def translation(self, ctx: Context, content_type: str) -> Translation: ...

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        """Our status and body for an upstream's error answer."""
        ...


class Native(Protocol):
    """What an adapter adds to serve inbound dialects natively (optional)."""

    speaks: frozenset[str]  # of "messages", "responses"

    def native_request(self, ctx: Context, upstream_model: str) -> UpstreamRequest: ...

    # Optional: `takes(native) -> bool`, for an adapter that takes only some requests in a dialect it
    # speaks (the others are translated); without it, every request in a dialect it `speaks`.


class Passthrough:
    """An OpenAI-compatible answer, relayed as it comes."""

    __slots__ = ("stream",)
    over = False

    def __init__(self, content_type: str) -> None:
        self.stream = content_type.startswith("text/event-stream")

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def end(self) -> tuple[bytes, Usage | None]:
        return b"", None


class WholeTranslation:
    """A JSON answer, translated whole once it has all arrived: subclasses write `translate`."""

    stream = False
    over = False

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._parts: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        self._parts.append(chunk)
        return b""

    def end(self) -> tuple[bytes, Usage | None]:
        return self.translate(b"".join(self._parts)), None

    def translate(self, body: bytes) -> bytes:
        raise NotImplementedError


class EventTranslation:
    """A streamed answer, translated event by event: the upstream's server-sent events in, OpenAI
    chunks out. Subclasses write `translate`, which appends chunks to `parts` for the events of one
    read, and set `over` once the answer has ended; `usage`, when set and not sent, is reported."""

    stream = True

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.out = Chunks(ctx)
        self.send_usage = wants_usage(ctx.body)
        self.parts: list[bytes] = []  # made from the current read
        self.over = False  # the answer ended, or broke: nothing after it is read
        self.usage: Usage | None = None  # the answer's usage, once known
        self._events = Events()

    def translate(self, events: list[tuple[str, bytes]]) -> None:
        raise NotImplementedError

    def read(self, chunk: bytes) -> None:
        """One upstream read: its events, translated (a subclass may take some of them another way)."""
        self.translate(self._events.feed(chunk))

    def closing(self) -> bytes:
        """What follows when the upstream closes the stream before the answer is over."""
        return self.out.error("The provider closed the stream before it was complete.")

    def totals(self, usage: Usage) -> bytes:
        """The end of an answer: its usage chunk, if the client asked for it, then [DONE]."""
        self.usage = usage
        return (self.out.usage(usage) if self.send_usage else b"") + DONE

    def feed(self, chunk: bytes) -> bytes:
        if self.over:
            return b""
        try:
            self.read(chunk)
        except Exception as exc:
            self.over = True
            raise UnreadableAnswer(f"{type(exc).__name__}: {exc}", self._take()) from None
        return self._take()

    def end(self) -> tuple[bytes, Usage | None]:
        if not self.over:
            self.translate(self._events.end())
        if not self.over:
            self.parts.append(self.closing())
        return self._take(), None if self.send_usage else self.usage

    def _take(self) -> bytes:
        if not self.parts:
            return b""
        made = b"".join(self.parts)
        self.parts.clear()
        return made


_CONTENT_END = b'},"finish_reason":null}]}\n\n'


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
        end = b',"finish_reason":null}]}\n\n' if finish is None else b',"finish_reason":' + orjson.dumps(finish) + b"}]}\n\n"
        return b"".join((self._start(), orjson.dumps(delta), end))

    def contents(self, texts: list[bytes]) -> bytes:
        """`content` for each of `texts` (JSON strings), in one join."""
        start = self._start() + b'{"content":'
        return b"".join((start, (_CONTENT_END + start).join(texts), _CONTENT_END))

    def _start(self) -> bytes:
        if self._head_id is not self.base["id"]:
            self._head_id = self.base["id"]
            self._head = b"data: " + orjson.dumps(self.base)[:-1] + b',"choices":[{"index":0,"delta":'
        return self._head

    def usage(self, usage: Usage) -> bytes:
        return data({**self.base, "choices": [], "usage": usage})

    def error(self, message: str, code: int = 502) -> bytes:
        return error_chunk(message, code, self.base)


def error_chunk(message: str, code: int = 502, base: dict[str, Any] | None = None) -> bytes:
    """The mid-stream error event clients know: an error plus a terminating choice, then [DONE]."""
    chunk = {
        **(base or {}),
        "error": {"message": message, "code": code, "type": "upstream_error"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    return data(chunk) + DONE


def wants_usage(body: dict[str, Any]) -> bool:
    """Did the client ask for the usage chunk (OpenAI's stream_options or OpenRouter's usage.include)?"""
    options, usage = body.get("stream_options"), body.get("usage")
    return (isinstance(options, dict) and options.get("include_usage") is True) or (
        isinstance(usage, dict) and usage.get("include") is True
    )


def error_body(status: int, message: str, error_type: str = "upstream_error", code: str | None = None) -> tuple[int, bytes]:
    """An error answer in the gateway's shape, for `Provider.error`."""
    return status, orjson.dumps(GatewayError(status, error_type, message, code=code).body())


def error_of(body: bytes) -> tuple[dict[str, Any], str]:
    """The `error` object of a provider's JSON error body and its message ({} and "" when none)."""
    try:
        err = orjson.loads(body).get("error") or {}
        return err, str(err.get("message") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return {}, ""
