"""What the answers in every inbound dialect share: the chat answer comes in as the meter releases
it (whole server-sent events, or a JSON body held to its end) and goes out in the caller's dialect."""

from __future__ import annotations

from typing import Any

import orjson

# The chat chunk most of a stream is made of: a delta of text only, choices the chunk's last field.
_CONTENT = b'"delta":{"content":'
_ENDS = (b'},"finish_reason":null}]}', b'},"logprobs":null,"finish_reason":null}]}')


def text_only(payload: bytes) -> tuple[bytes, str] | None:
    """(the JSON string as sent, its text) of a chunk that is a text delta and nothing else; None
    for any other chunk. A few byte searches, where parsing the chunk builds five objects."""
    for end in _ENDS:
        if payload.endswith(end):
            break
    else:
        return None
    at = payload.find(_CONTENT)
    if at < 0 or payload.find(b'"usage"') >= 0 or payload.find(b'"error"') >= 0:
        return None
    literal = payload[at + len(_CONTENT):len(payload) - len(end)]
    try:
        text = orjson.loads(literal)
    except orjson.JSONDecodeError:  # more than the text in the delta
        return None
    return (literal, text) if type(text) is str else None


class ChatAnswer:
    """Subclasses write `body` (a whole chat completion), `_chunk` (one chat chunk of a stream),
    `_end_stream` (the stream's closing events), `error` and `error_body`."""

    TERMINAL: tuple[bytes, ...] = ()  # what only the last event of a stream in the dialect holds

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self._json: list[bytes] = []
        self._started = False
        self._done = False

    @property
    def over(self) -> bool:
        """The stream has ended (its closing events, or an error event): only the connection's end is left."""
        return self._done

    def ended(self, data: bytes) -> bool:
        """Whether `data`, relayed as the upstream sent it (passthrough), holds the stream's last event."""
        return any(data.find(t) >= 0 for t in self.TERMINAL)

    def feed(self, data: bytes) -> bytes:
        if not self.stream:
            self._json.append(data)
            return b""
        out: list[bytes] = []
        for event in data.split(b"\n\n"):
            if not event.startswith(b"data: "):
                if event.startswith(b":"):
                    out.append(event + b"\n\n")  # a keep-alive comment: left as it is
                continue
            payload = event[6:]
            if payload == b"[DONE]":
                self._end_stream(out)
                continue
            fast = text_only(payload)
            if fast is not None:
                if fast[1] and not self._done:
                    self._text(fast[0], fast[1], out)
                continue
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                self._chunk(chunk, out)
        return b"".join(out)

    def end(self) -> bytes:
        """What is left once the chat answer has ended: the whole JSON answer, or the closing events
        of a stream whose last chunk said why it finished but that came without [DONE]."""
        if not self.stream:
            return self.body(b"".join(self._json)) if self._json else b""
        out: list[bytes] = []
        if not self._done and self.finished:
            self._end_stream(out)
        return b"".join(out)

    @property
    def finished(self) -> bool:
        """A finish reason has arrived."""
        raise NotImplementedError

    def body(self, chat: bytes) -> bytes:
        raise NotImplementedError

    def _text(self, literal: bytes, text: str, out: list[bytes]) -> None:
        """A text delta: `literal` is `text` as a JSON string, ready to be written."""
        raise NotImplementedError

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        raise NotImplementedError

    def _end_stream(self, out: list[bytes]) -> None:
        raise NotImplementedError

    def error(self, status: int, message: str) -> bytes:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> bytes:
        raise NotImplementedError
