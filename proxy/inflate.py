"""Compressed request bodies (`Content-Encoding: gzip` or `deflate`), inflated by the gateway itself.

aiohttp's server would inflate them as they arrive, in the event loop and past any size limit (a
1 MB gzip of 1 GiB of spaces held every other request up for seconds). Here the output is bounded
as it is made: inflating stops one byte past the body limit, in steps that let other requests run
between them.
"""

from __future__ import annotations

import asyncio
import zlib

from proxy.errors import GatewayError, too_large

STEP = 256 * 1024  # bytes of output between two turns of the event loop: about a millisecond
# zlib's window bits: gzip framing; zlib framing; raw deflate (what some clients send as "deflate").
_GZIP, _ZLIB, _RAW = 31, 15, -15


def _unsupported(encoding: str) -> GatewayError:
    return GatewayError(415, "unsupported_content_encoding",
                        f"Content-Encoding {encoding[:40]!r} is not supported; send the body as it is, or gzip or "
                        "deflate it.", code="unsupported_content_encoding")


def _invalid(encoding: str) -> GatewayError:
    return GatewayError(400, "invalid_request", f"Request body is not valid {encoding} data.", code="invalid_encoding")


async def inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` decoded as `encoding` says, at most `limit` bytes (else 413); 415 for an encoding the
    gateway does not know, 400 for data that is not what it says."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return raw
    if coding in ("gzip", "x-gzip"):
        wbits = _GZIP
    elif coding == "deflate":
        wbits = _ZLIB if raw[:1] and raw[0] & 0x0F == 8 else _RAW
    else:  # br, zstd, or several codings in a row
        raise _unsupported(encoding)
    decoder = zlib.decompressobj(wbits)
    out: list[bytes] = []
    size = 0
    data = raw
    try:
        while True:
            piece = decoder.decompress(data, STEP)
            size += len(piece)
            if size > limit:
                raise too_large(limit)
            out.append(piece)
            data = decoder.unconsumed_tail
            # A full step may leave output behind even when all the input was read: go on until
            # the stream's end, or a step that came out short.
            if decoder.eof or (not data and len(piece) < STEP):
                break
            await asyncio.sleep(0)
        if not decoder.eof or decoder.unused_data:
            raise _invalid(coding)
    except zlib.error:
        raise _invalid(coding) from None
    return b"".join(out)
