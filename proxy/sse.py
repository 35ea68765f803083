"""Server-sent events, parsed only where a translator needs them (passthrough never comes here)."""

from __future__ import annotations

import orjson

DONE = b"data: [DONE]\n\n"


class Events:
    """An SSE reader fed upstream reads: `feed` returns the events completed so far as (event name,
    data) pairs, comments as ("", b"") keep-alives; `end` the last one, left without its blank line.
    A whole read is taken in one call: a translator handles its events in one loop, not one await each."""

    __slots__ = ("_buffer", "_names")

    def __init__(self) -> None:
        self._buffer = b""
        self._names: dict[bytes, str] = {}  # `event: x` line -> name, decoded once per stream

    @property
    def pending(self) -> bool:
        """Part of an event is waiting for the rest."""
        return bool(self._buffer)

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        buffer = self._buffer + chunk if self._buffer else chunk
        plain = buffer.find(b"\r") < 0  # (`in` tries the needle as an int first: slower)
        if not plain:
            buffer = _crlf(buffer)
        *blocks, self._buffer = buffer.split(b"\n\n")
        out: list[tuple[str, bytes]] = []
        for block in blocks:
            if plain:  # the usual shapes, read without a pass over every line
                if block.startswith(b"event: "):  # Anthropic's `event: x\ndata: {...}`
                    head, found, data = block.partition(b"\ndata: ")
                    if found and data.find(b"\n") < 0 and head.find(b"\n") < 0:
                        name = self._names.get(head)
                        if name is None:
                            name = head[6:].strip().decode("utf-8", "replace") or "message"
                            if len(self._names) < 64:
                                self._names[head] = name
                        out.append((name, data))
                        continue
                elif block.startswith(b"data: ") and block.find(b"\n") < 0:  # Gemini's `data: {...}`
                    out.append(("message", block[6:]))
                    continue
            out += _block(block)
        return out

    def end(self) -> list[tuple[str, bytes]]:
        """The complete lines of a last event that came without its blank line."""
        buffer, self._buffer = self._buffer, b""
        return _block(buffer[: buffer.rfind(b"\n") + 1]) if buffer else []


def _crlf(buffer: bytes) -> bytes:
    """CRLF line ends as LF; a CR that may be the first half of a pair split across reads is kept."""
    if buffer.endswith(b"\r"):
        return buffer[:-1].replace(b"\r\n", b"\n") + b"\r"
    return buffer.replace(b"\r\n", b"\n")


def _block(block: bytes) -> list[tuple[str, bytes]]:
    """Any event block, line by line (the spec's way)."""
    out: list[tuple[str, bytes]] = []
    name, data = "", []
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b":"):
            out.append(("", b""))
        elif line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
    if data:
        out.append((name or "message", b"\n".join(data)))
    return out


def data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
