"""Server-sent events, parsed only where a translator needs them (passthrough never comes here)."""

from __future__ import annotations

from typing import AsyncIterator

import orjson

DONE = b"data: [DONE]\n\n"


async def events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    """(event name, data) per event; comments come out as ("", b"") keep-alives."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        plain = b"\r" not in buffer
        if not plain:
            buffer = _crlf(buffer)
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            usual = _usual(block) if plain else None
            if usual is not None:
                yield usual
                continue
            for event in _block(block):
                yield event
    if buffer:  # a last event without its blank line: its complete lines
        for event in _block(buffer[: buffer.rfind(b"\n") + 1]):
            yield event


def _usual(block: bytes) -> tuple[str, bytes] | None:
    """The usual shapes, `event: x\ndata: {...}` (Anthropic) and `data: {...}` (Gemini), read
    without a pass over every line; None for anything else."""
    if block.startswith(b"data: "):
        return ("message", block[6:]) if b"\n" not in block else None
    if block.startswith(b"event: "):
        nl = block.find(b"\n")
        if nl > 0 and block.startswith(b"data: ", nl + 1) and block.find(b"\n", nl + 1) < 0:
            return block[6:nl].strip().decode("utf-8", "replace") or "message", block[nl + 7:]
    return None


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
