"""Usage and cost from the relayed bytes, without parsing every chunk.

Streams are cut at event boundaries; only an event that carries a `"usage":{` object is parsed, priced
and re-encoded with `usage.cost`. A JSON body is relayed as it arrives except its last 16 KiB, where
the usage object sits; that tail is patched the same way. Costs are exact integer micro-dollars.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Callable

import orjson

# Each searched for in its compact form (as OpenAI, OpenRouter and most providers send it) and spaced.
_MARKERS = (b'"usage":{', b'"usage": {')
_NATIVE_COUNTS = (b"message_start", b"message_delta", b"response.completed", b"response.incomplete", b"response.failed")
_FINISHES = (b'"finish_reason":"', b'"finish_reason": "')
_USAGE_COMPACT, _USAGE_SPACED = _MARKERS
_FINISH_COMPACT, _FINISH_SPACED = _FINISHES
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]+)"')
HOLD = 16 * 1024  # also longer than any provider key
REDACTED = b"[redacted]"
_DECODER = json.JSONDecoder()


@dataclass(slots=True, frozen=True)
class Bounds:
    """The most tokens one answer of a model can count: its context for the prompt, its output limit
    (else its context) for the completion, each with room for tokenizers that count differently.
    Unknown limits fall back to `UNKNOWN`."""

    prompt: int = 0
    completion: int = 0

    @classmethod
    def of(cls, entry: dict[str, Any]) -> Bounds:
        top = entry.get("top_provider")
        top = top if isinstance(top, dict) else {}
        context = _positive(entry.get("context_length")) or _positive(top.get("context_length")) or UNKNOWN
        output = _positive(top.get("max_completion_tokens")) or context
        return cls(context + context // 4, output + output // 4)


UNKNOWN = 10_000_000  # tokens, for a model whose catalog entry gives no limit


def _positive(v: Any) -> int:
    return v if type(v) is int and v > 0 else 0


@dataclass(slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    reasoning: int = 0
    cached: int = 0
    cache_write: int = 0
    estimated: bool = False

    @classmethod
    def parse(cls, u: dict[str, Any], bounds: Bounds) -> Usage | None:
        """The usage an upstream sent, or None when it cannot be believed: a count that is not a
        whole number from 0 to what the model can count, or parts larger than their whole."""
        prompt, completion = u.get("prompt_tokens"), u.get("completion_tokens")
        if type(prompt) is not int or type(completion) is not int:
            return None
        pd = u.get("prompt_tokens_details")
        cd = u.get("completion_tokens_details")
        pd = pd if type(pd) is dict else {}
        cd = cd if type(cd) is dict else {}
        usage = cls(prompt, completion, _part(cd.get("reasoning_tokens")), _part(pd.get("cached_tokens")),
                    _part(pd.get("cache_write_tokens")))
        if (0 <= prompt <= bounds.prompt and 0 <= completion <= bounds.completion and 0 <= usage.reasoning <= completion
                and 0 <= usage.cached and 0 <= usage.cache_write and usage.cached + usage.cache_write <= prompt):
            return usage
        return None


def _part(v: Any) -> int:
    """An optional count (absent or null: 0); -1, which no bound admits, for anything but a whole number."""
    if v is None:
        return 0
    return v if type(v) is int else -1


# Prices are kept as whole numbers of 10^-24 USD: every catalog price is exact at that scale, and
# integer arithmetic is exact and fast.
SCALE = 10**24
_TO_MICROS = 10**18


@dataclass(slots=True, frozen=True)
class Prices:
    """Per token (per request for `request`), in units of 10^-24 USD."""

    prompt: int = 0
    completion: int = 0
    cache_read: int = 0
    cache_write: int = 0
    request: int = 0

    @classmethod
    def from_pricing(cls, pricing: Any, free: bool) -> Prices:
        if free or not isinstance(pricing, dict):
            return cls()

        def d(key: str) -> int:
            try:
                value = Decimal(str(pricing.get(key, "0")))
            except ArithmeticError:
                return 0
            if not value.is_finite() or value <= 0:
                return 0
            return int((value * SCALE).to_integral_value(rounding=ROUND_HALF_UP))

        return cls(d("prompt"), d("completion"), d("input_cache_read"), d("input_cache_write"), d("request"))

    def most_micros(self, request_bytes: int, max_output: int) -> int:
        """What a request may cost at most, to reserve before it is sent: a prompt of a token per
        three bytes of the request (tokenizers average three to four), and every output token it
        allows."""
        return self.cost_micros(Usage(prompt=request_bytes // 3, completion=max_output))

    def cost_micros(self, u: Usage) -> int:
        """Cached reads and writes are part of `prompt_tokens` (OpenAI, OpenRouter): they are billed
        at their own price, the rest of the prompt at the prompt price. Reasoning is part of
        `completion_tokens`. Rounded half up to the micro-dollar."""
        uncached = max(u.prompt - u.cached - u.cache_write, 0)
        units = (
            uncached * self.prompt
            + u.completion * self.completion
            + u.cached * (self.cache_read or self.prompt)
            + u.cache_write * (self.cache_write or self.prompt)
            + self.request
        )
        return (units + _TO_MICROS // 2) // _TO_MICROS


def _last(data: bytes, forms: tuple[bytes, bytes]) -> int:
    """Where the last of either form (compact, spaced) starts in `data`, or -1. Searched from the end,
    the spaced form only after the last compact one: no scan of the whole of `data` when it is found.
    (`Meter.feed` does the same inline.)"""
    at = data.rfind(forms[0])
    return max(at, data.rfind(forms[1], at + 1))


def _usage(buf: bytes, at: int) -> tuple[int, int, Any, bool] | None:
    """(start, end, parsed object, whether orjson parsed it) of the `"usage":{…}` whose key starts at `at`. Its end is the first closing brace that balances the
    opening ones and gives JSON that orjson reads whole (a usage object holds numbers and objects);
    where a string holds a brace, the stdlib's scanner finds it."""
    start = buf.index(b"{", at)
    end = buf.find(b"}", start)
    while end >= 0:
        end += 1
        if buf.count(b"{", start, end) == buf.count(b"}", start, end):
            try:
                obj = orjson.loads(buf[start:end])
            except orjson.JSONDecodeError:
                break
            return start, end, obj, True
        end = buf.find(b"}", end)
    text = buf[start:].decode("utf-8", "replace")
    try:
        obj, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):  # not JSON, or nested past what Python's decoder follows
        return None
    return start, start + len(text[:end].encode()), obj, False


def _sse_boundary(data: bytes) -> int:
    """Index just past the last complete event (0: none is complete)."""
    if data.endswith(b"\n\n"):  # the usual chunk: whole events, nothing to search
        return len(data)
    lf = data.rfind(b"\n\n")
    cut = lf + 2 if lf >= 0 else 0
    if data.find(b"\r") >= 0:  # one byte is found fast; a CRLF pair search that finds nothing is not
        crlf = data.rfind(b"\r\n\r\n")
        cut = max(cut, crlf + 4 if crlf >= 0 else 0)
    return cut


class Meter:
    """Watches one response on its way out; `usage` and `cost_micros` are set once seen."""

    __slots__ = ("prices", "bounds", "stream", "secret", "usage", "doubted", "cost_micros", "finish_reason", "events",
                 "native", "partial", "compact", "_parts", "_pending")

    def __init__(self, prices: Prices, stream: bool, bounds: Bounds = Bounds(UNKNOWN, UNKNOWN),
                 secret: bytes = b"", native: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.prices = prices
        self.bounds = bounds
        self.stream = stream
        # The key the upstream was sent: if it repeats it in its answer, the caller must not get it.
        # What `feed` releases is whole events, or (JSON) all but a held tail longer than any key: a
        # key split across two reads is whole by the time any of it would be written.
        self.secret = secret
        self.usage: Usage | None = None
        self.doubted: Any = None  # usage the upstream sent that could not be believed
        self.cost_micros = 0
        self.finish_reason: str | None = None
        self.events = 0
        # A passthrough answer in another dialect: its usage objects are read with `native` (into
        # chat usage) and left as they are; `partial` is what a stream said before its final count.
        self.native = native
        self.partial: dict[str, Any] | None = None
        self.compact = False  # the answer is the gateway's own JSON (a translation's): no spaced form to look for
        self._parts: list[bytes] = []  # a passed-through JSON answer, but for its held tail
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The part of what has arrived that can be written now."""
        data = self._pending + chunk if self._pending else chunk
        if self.secret and data.find(self.secret) >= 0:
            data = data.replace(self.secret, REDACTED)
        if self.stream:
            if data.endswith(b"\n\n"):  # the usual read: whole events
                self._pending = b""
            else:
                cut = _sse_boundary(data)
                self._pending = data[cut:]
                data = data[:cut]
                if not data:
                    return data
            if self.native is not None:
                self.events += data.count(b"data: ")
                return self._read_native(data)
            # This runs for every read of every stream, and most reads hold neither a finish reason
            # nor usage: `_last`'s two searches each, inline, with no Python call until one is found.
            rfind = data.rfind
            at = rfind(_FINISH_COMPACT)
            spaced = -1 if self.compact else rfind(_FINISH_SPACED, at + 1)
            if at >= 0 or spaced >= 0:
                self._finish_at(data, max(at, spaced))
            at = rfind(_USAGE_COMPACT)
            spaced = -1 if self.compact else rfind(_USAGE_SPACED, at + 1)
            if at >= 0 or spaced >= 0:
                data = self._patch(data, max(at, spaced))
            if self.usage is None:  # events are counted for an estimate, needed only while no usage is known
                self.events += data.count(b"data: ")
            return data
        if len(data) <= HOLD:
            self._pending = data
            return b""
        self._pending = data[-HOLD:]
        if self.native is not None:  # the whole body is read at its end, for its usage
            self._parts.append(data[:-HOLD])
        return data[:-HOLD]

    def finish(self) -> bytes:
        """What was held back, patched with the cost if it carries usage."""
        data, self._pending = self._pending, b""
        if data and not self.stream:
            return self.whole(data)
        return data

    def whole(self, body: bytes) -> bytes:
        """A whole JSON answer, patched with the cost if it carries usage."""
        self.stream = False
        if self.secret and self.secret in body:
            body = body.replace(self.secret, REDACTED)
        if self.native is not None:
            return self._native_whole(body)
        at = _last(body, _FINISHES)
        if at >= 0:
            self._finish_at(body, at)
        at = _last(body, _MARKERS)
        return body if at < 0 else self._patch(body, at)

    def _finish_at(self, data: bytes, at: int) -> None:
        """The finish reason whose key starts at `at` (the last one in `data`)."""
        found = _FINISH.match(data, at)
        if found:
            self.finish_reason = found.group(1).decode()

    def _patch(self, data: bytes, at: int) -> bytes:
        """`data` with the usage object whose key starts at `at` priced, and its cost written in."""
        found = _usage(data, at)
        if found is None:
            return data
        start, end, raw, fast = found
        if not isinstance(raw, dict):
            return data
        if not self._believe(raw):
            if fast:  # for the log, as sent: orjson reads integers past 64 bits as floats
                self.doubted = json.loads(data[start:end])
            return data
        raw["cost"] = self.cost_micros / 1_000_000
        if fast and data.find(b'"cost"', start, end) < 0:  # appended: every byte the upstream sent kept
            view = memoryview(data)  # (the join copies the read once; slices of bytes would copy it twice more)
            return b"".join((view[:end - 1], b',"cost":', orjson.dumps(raw["cost"]), view[end - 1:]))
        try:
            encoded = orjson.dumps(raw)
        except TypeError:  # what orjson will not write: an integer beyond 64 bits, a lone surrogate
            try:
                encoded = json.dumps(raw, separators=(",", ":"), allow_nan=False).encode()
            except ValueError:  # NaN or infinity as well: left as sent, without the cost (billed all the same)
                return data
        return b"".join((data[:start], encoded, data[end:]))

    def _read_native(self, data: bytes) -> bytes:
        """The usage of a passed-through stream, read from the events that carry it in its dialect
        (Anthropic's `message_start`, then the final count in `message_delta`; the Responses
        terminal event), each parsed whole: a `usage` key elsewhere (in a tool's schema) is not
        mistaken for it. `data` itself goes out as it came."""
        at = data.find(b'"usage":')
        while at >= 0:
            start = data.rfind(b"\n\n", 0, at)
            start = 0 if start < 0 else start + 2
            end = data.find(b"\n\n", at)
            end = len(data) if end < 0 else end
            self._native_event(data[start:end])
            at = data.find(b'"usage":', end)
        return data

    def _native_event(self, event: bytes) -> None:
        line = event.find(b"data:")
        if line < 0 or not any(event.find(kind, 0, line + 40) >= 0 for kind in _NATIVE_COUNTS):
            return  # not an event that counts (a response.created with `"usage":null`, say): not parsed
        try:
            doc = orjson.loads(event[line + 5:].split(b"\n", 1)[0])
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        kind = doc.get("type")
        if kind == "message_start":
            usage = (doc.get("message") or {}).get("usage") if isinstance(doc.get("message"), dict) else None
            if isinstance(usage, dict):
                self.partial = self.native(usage)  # type: ignore[misc]
        elif kind == "message_delta":
            self._native_usage(doc.get("usage"))
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = doc.get("response")
            self._native_usage(response.get("usage") if isinstance(response, dict) else None)

    def _native_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._believe(self.native(usage))  # type: ignore[misc]

    def _native_whole(self, body: bytes) -> bytes:
        """A passed-through JSON answer: its top-level usage (Anthropic's message, the Responses object)."""
        try:
            doc = orjson.loads(b"".join(self._parts) + body if self._parts else body)
        except orjson.JSONDecodeError:
            return body
        if isinstance(doc, dict):
            self._native_usage(doc.get("usage"))
        return body

    def observe(self, usage: dict[str, Any]) -> None:
        """Usage a translator saw but the client did not ask to be sent."""
        self._believe(usage)

    def _believe(self, raw: dict[str, Any]) -> bool:
        """Prices `raw` if it can be believed; else the request will be billed by estimate."""
        usage = Usage.parse(raw, self.bounds)
        if usage is None:
            self.doubted, self.usage, self.cost_micros = raw, None, 0
            return False
        self.usage, self.doubted = usage, None
        self.cost_micros = self.prices.cost_micros(usage)
        return True

    def estimate(self, request_bytes: int, bytes_out: int) -> None:
        """No usage arrived (the client left, or the upstream broke): bill an estimate, marked so."""
        completion = max(self.events - 2, 0) if self.stream else bytes_out // 4
        told = self.partial.get("prompt_tokens") if self.partial else None
        prompt = told if type(told) is int and 0 <= told <= self.bounds.prompt else request_bytes // 4
        self.usage = Usage(prompt=prompt, completion=completion, estimated=True)
        self.cost_micros = self.prices.cost_micros(self.usage)
