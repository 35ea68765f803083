"""Usage and cost from the relayed bytes, without parsing every chunk.

Streams are cut at event boundaries; only an event that carries a `"usage":{` object is parsed, priced
and re-encoded with `usage.cost`. A JSON body is relayed as it arrives except its last 16 KiB, where
the usage object sits; that tail is patched the same way. Costs are exact integer micro-dollars.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson

_MARKERS = (b'"usage":{', b'"usage": {')
_FINISH = re.compile(rb'"finish_reason"\s*:\s*"([a-z_]+)"')
HOLD = 16 * 1024
_MICRO = Decimal("0.000001")


@dataclass(slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    reasoning: int = 0
    cached: int = 0
    cache_write: int = 0
    estimated: bool = False

    @classmethod
    def parse(cls, u: dict[str, Any]) -> Usage:
        def n(v: Any) -> int:
            return v if isinstance(v, int) and v > 0 else 0

        pd = u.get("prompt_tokens_details") or {}
        cd = u.get("completion_tokens_details") or {}
        return cls(
            prompt=n(u.get("prompt_tokens")),
            completion=n(u.get("completion_tokens")),
            reasoning=n(cd.get("reasoning_tokens")) if isinstance(cd, dict) else 0,
            cached=n(pd.get("cached_tokens")) if isinstance(pd, dict) else 0,
            cache_write=n(pd.get("cache_write_tokens")) if isinstance(pd, dict) else 0,
        )


@dataclass(slots=True, frozen=True)
class Prices:
    """USD per token (per request for `request`), exact."""

    prompt: Decimal = Decimal(0)
    completion: Decimal = Decimal(0)
    cache_read: Decimal = Decimal(0)
    cache_write: Decimal = Decimal(0)
    request: Decimal = Decimal(0)

    @classmethod
    def from_pricing(cls, pricing: Any, free: bool) -> Prices:
        if free or not isinstance(pricing, dict):
            return cls()

        def d(key: str) -> Decimal:
            try:
                value = Decimal(str(pricing.get(key, "0")))
            except ArithmeticError:
                return Decimal(0)
            return value if value.is_finite() and value > 0 else Decimal(0)

        return cls(d("prompt"), d("completion"), d("input_cache_read"), d("input_cache_write"), d("request"))

    def cost_micros(self, u: Usage) -> int:
        """Cached reads and writes are part of `prompt_tokens` (OpenAI, OpenRouter): they are billed
        at their own price, the rest of the prompt at the prompt price. Reasoning is part of
        `completion_tokens`. Rounded half up to the micro-dollar."""
        uncached = max(u.prompt - u.cached - u.cache_write, 0)
        usd = (
            uncached * self.prompt
            + u.completion * self.completion
            + u.cached * (self.cache_read or self.prompt)
            + u.cache_write * (self.cache_write or self.prompt)
            + self.request
        )
        return int((usd / _MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _object_end(buf: bytes, start: int) -> int:
    """Index just past the JSON object that opens at `buf[start]`, or -1 if it is cut off."""
    depth, i, n, in_str = 0, start, len(buf), False
    while i < n:
        c = buf[i]
        if in_str:
            if c == 0x5C:  # backslash
                i += 1
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _usage_span(buf: bytes) -> tuple[int, int] | None:
    at = max(buf.rfind(m) for m in _MARKERS)
    if at < 0:
        return None
    start = buf.index(b"{", at)
    end = _object_end(buf, start)
    return (start, end) if end > 0 else None


def _sse_boundary(data: bytes) -> int:
    """Index just past the last complete event (0: none is complete)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class Meter:
    """Watches one response on its way out; `usage` and `cost_micros` are set once seen."""

    __slots__ = ("prices", "stream", "usage", "cost_micros", "finish_reason", "events", "_pending")

    def __init__(self, prices: Prices, stream: bool) -> None:
        self.prices = prices
        self.stream = stream
        self.usage: Usage | None = None
        self.cost_micros = 0
        self.finish_reason: str | None = None
        self.events = 0
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The part of what has arrived that can be written now."""
        data = self._pending + chunk if self._pending else chunk
        if self.stream:
            cut = _sse_boundary(data)
            self._pending = data[cut:]
            data = data[:cut]
            if data:
                self.events += data.count(b"data: ")
                if b'"finish_reason":"' in data or b'"finish_reason": "' in data:
                    self._note_finish(data)
                if _MARKERS[0] in data or _MARKERS[1] in data:
                    data = self._patch(data)
            return data
        if len(data) <= HOLD:
            self._pending = data
            return b""
        self._pending = data[-HOLD:]
        return data[:-HOLD]

    def finish(self) -> bytes:
        """What was held back, patched with the cost if it carries usage."""
        data, self._pending = self._pending, b""
        if data and not self.stream:
            self._note_finish(data)
            data = self._patch(data)
        return data

    def _note_finish(self, data: bytes) -> None:
        found = _FINISH.findall(data)
        if found:
            self.finish_reason = found[-1].decode()

    def _patch(self, data: bytes) -> bytes:
        span = _usage_span(data)
        if span is None:
            return data
        start, end = span
        try:
            raw = orjson.loads(data[start:end])
        except orjson.JSONDecodeError:
            return data
        if not isinstance(raw, dict):
            return data
        self.usage = Usage.parse(raw)
        self.cost_micros = self.prices.cost_micros(self.usage)
        raw["cost"] = self.cost_micros / 1_000_000
        return data[:start] + orjson.dumps(raw) + data[end:]

    def observe(self, usage: dict[str, Any]) -> None:
        """Usage a translator saw but the client did not ask to be sent."""
        self.usage = Usage.parse(usage)
        self.cost_micros = self.prices.cost_micros(self.usage)

    def estimate(self, request_bytes: int, bytes_out: int) -> None:
        """No usage arrived (the client left, or the upstream broke): bill an estimate, marked so."""
        completion = max(self.events - 2, 0) if self.stream else bytes_out // 4
        self.usage = Usage(prompt=request_bytes // 4, completion=completion, estimated=True)
        self.cost_micros = self.prices.cost_micros(self.usage)
