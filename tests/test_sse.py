"""The SSE reader translators use: the same events as a plain line-by-line reader of the spec, however
the bytes are split into reads."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import Events


async def _lines_reference(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    """Line by line, as the spec reads it (the reader before its fast paths)."""
    out: list[tuple[str, bytes]] = []
    buffer = b""
    name, data = "", []
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                if data:
                    out.append((name or "message", b"\n".join(data)))
                name, data = "", []
            elif line.startswith(b":"):
                out.append(("", b""))
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
    if data:
        out.append((name or "message", b"\n".join(data)))
    return out


async def _read(chunks: list[bytes]) -> list[tuple[str, bytes]]:
    """What the translators' reader makes of these reads, fed one at a time."""
    reader = Events()
    return [event for chunk in chunks for event in reader.feed(chunk)] + reader.end()


LINES = st.sampled_from([
    b"event: message_start", b"event: content_block_delta", b"event:ping", b"event: ", b"data: {\"a\": 1}",
    b"data:{\"b\":2}", b"data: ", b"data:  two spaces", b": keep-alive", b":", b"id: 7", b"retry: 10", b"",
    b"data: [DONE]", b"data: x\ry",
])


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(LINES, max_size=30), crlf=st.booleans(), cuts=st.lists(st.integers(0, 400), max_size=8),
       ending=st.sampled_from([b"", b"\n", b"\n\n"]))
def test_same_events_as_the_line_reader(lines, crlf, cuts, ending):
    text = b"\n".join(lines) + ending
    if crlf:
        text = text.replace(b"\n", b"\r\n")
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    got = asyncio.run(_read(chunks))
    assert got == asyncio.run(_lines_reference(chunks))
