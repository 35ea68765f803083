"""Server-sent events, parsed only where a translator needs them (passthrough never comes here)."""

from __future__ import annotations

from typing import AsyncIterator

import orjson

DONE = b"data: [DONE]\n\n"


async def events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    """(event name, data) per event; comments come out as ("", b"") keep-alives."""
    buffer = b""
    name, data = "", []
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                if data:
                    yield name or "message", b"\n".join(data)
                name, data = "", []
            elif line.startswith(b":"):
                yield "", b""
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
    if data:  # a last event without its blank line
        yield name or "message", b"\n".join(data)


def data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
