"""What the answers in every inbound dialect share: the chat answer comes in as the meter releases
it (whole server-sent events, or a JSON body held to its end) and goes out in the caller's dialect."""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import orjson

# The chat chunk most of a stream is made of: a delta of text only, choices the chunk's last field.
_CONTENT = b'"delta":{"content":'
_ENDS = (b'},"finish_reason":null}]}', b'},"logprobs":null,"finish_reason":null}]}')


def _plain_text(chunk: dict[str, Any]) -> bool:
    """A chunk that carries text and nothing else that matters."""
    choices = chunk.get("choices")
    if chunk.get("usage") or "error" in chunk or not isinstance(choices, list) or len(choices) != 1:
        return False
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict) or choice.get("finish_reason") or not isinstance(delta.get("content"), str):
        return False
    return not any(delta.get(k) for k in ("tool_calls", "reasoning", "reasoning_content", "reasoning_details",
                                           "function_call", "refusal")) and bool(delta["content"])


def text_only(payload: bytes) -> tuple[bytes, str, bytes] | None:
    """(the JSON string as sent, its text, what follows it) of a chunk that is a text delta and
    nothing else; None for any other chunk. A few byte searches, where parsing the chunk builds
    five objects."""
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
    return (literal, text, end) if type(text) is str else None


class ChatAnswer:
    """Subclasses write `body` (a whole chat completion), `_chunk` (one chat chunk of a stream),
    `_end_stream` (the stream's closing events), `error` and `error_body`."""

    # What only the last event of a stream in the dialect holds: an event line (a JSON string cannot
    # hold a line break), or a data line that starts with its type.
    TERMINAL: tuple[bytes, ...] = ()

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self._json: list[bytes] = []
        self._started = False
        self._done = False
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> what is known of the call
        self._order: list[int] = []  # the calls' indexes, in the order they came

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
        if data.find(b"\r") >= 0:
            data = data.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            if self._prefix and data.startswith(self._prefix, pos):
                end = self._run(data, pos, out)
                if end > pos:
                    pos = end
                    continue
            cut = data.find(b"\n\n", pos)
            if cut < 0:
                cut = size
            self._chat_event(data[pos:cut], out)
            pos = cut + 2
        return b"".join(out)

    def _chat_event(self, event: bytes, out: list[bytes]) -> None:
        if event.startswith(b"data: ") and event.find(b"\n") < 0:
            payload = event[6:]
        elif event.startswith(b":"):
            out.append(event + b"\n\n")  # a keep-alive comment: left as it is
            return
        else:  # other fields (`id:`, `event:`), `data:` without its space, data over several lines
            lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                return
            payload = b"\n".join(lines)
        if payload == b"[DONE]":
            self._end_stream(out)
            return
        fast = text_only(payload)
        if fast is not None:
            if fast[1] and not self._done:
                self._text(fast[0], fast[1], out)
                if self._prefix is None:  # its prefix and suffix are where text_only found them
                    self._prefix = b"data: " + payload[:len(payload) - len(fast[0]) - len(fast[2])]
                    self._suffix = fast[2] + b"\n\n"
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(chunk, dict):
            if self._prefix is None and _plain_text(chunk):
                self._chunk(chunk, out)
                self._learn(payload)
            else:
                self._chunk(chunk, out)

    # -- runs of text chunks --------------------------------------------------------------------
    # Upstreams send most of a stream as chunks that differ only in their text: the same bytes before
    # it (id, model, `"delta":{"content":`) and after it. Learnt from the first such chunk, a run of
    # them is turned in a few byte operations, whatever its length (see `_run`).

    _prefix: bytes | None = None  # `data: ` and the chunk's bytes before its text's JSON string
    _suffix = b""  # the bytes after it, with the event's end

    def _learn(self, payload: bytes) -> None:
        """The prefix and suffix of a text chunk, if its text's JSON string can be found for sure."""
        at = payload.find(b'"content":"')
        if at < 0 or payload.find(b'"content":', at + 1) >= 0:
            self._prefix = b""  # not to be tried again
            return
        start = at + 10
        end = payload.find(b'"', start + 1)
        while end > 0 and payload[end - 1] == 92:  # an escaped quote (or an escaped backslash: then give up)
            if payload[end - 2] == 92:
                self._prefix = b""
                return
            end = payload.find(b'"', end + 1)
        if end < 0:
            self._prefix = b""
            return
        self._prefix = b"data: " + payload[:start]
        self._suffix = payload[end + 1:] + b"\n\n"

    def _run(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """Where the run of text chunks at `pos` ends, its events made; `pos` when there is none
        (the chunk at `pos` then goes the usual way). Each step is one C-level pass over the run:
        per chunk, Python would cost more than the rest of the request.

        The run is `P s S P s S … P s S` (P, S: the learnt prefix and suffix; s: each text as a JSON
        string). Split where each prefix ends (`"content":`, short enough to search fast), each
        piece is `s S P`; cut that tail off and the strings are left. They are checked by parsing
        them as one array: a piece that was not `s S P` (another kind of chunk, a different
        prefix or suffix) leaves bytes that are not one JSON string (a cut string, a `,"key"`, a
        line break), and the run is not made."""
        if not self._runs():
            return pos
        suffix, prefix = self._suffix, self._prefix
        end = data.rfind(b'"' + suffix, pos)
        if end < 0:
            return pos
        end += 1 + len(suffix)
        pieces = data[pos + len(prefix):end].split(prefix[-11:])
        strings = list(map(itemgetter(slice(None, 11 - len(prefix) - len(suffix))), pieces[:-1]))
        strings.append(pieces[-1][:-len(suffix)])
        joined = b",".join(strings)
        if not joined.startswith(b'"') or joined.count(b',"') != len(strings) - 1:
            return pos
        try:
            texts = orjson.loads(b"[" + joined + b"]")
        except orjson.JSONDecodeError:
            return pos
        if len(texts) != len(strings):
            return pos
        if strings.count(b'""'):  # an empty text makes no event
            strings = [x for x in strings if x != b'""']
            texts = [t for t in texts if t]
            if not strings:
                return end
        out.append(self._run_events(strings, texts))
        return end

    def _runs(self) -> bool:
        """Whether the next text chunks may be turned as a run now (a text block or item is open)."""
        return False

    def _run_events(self, strings: list[bytes], texts: list[str]) -> bytes:
        """The events of a run of text chunks: `strings` are the texts as their JSON strings."""
        raise NotImplementedError

    def end(self) -> bytes:
        """What is left once the chat answer has ended: the whole JSON answer, or the closing events
        of a stream whose last chunk said why it finished but that came without [DONE]."""
        if not self.stream:
            return self.body(b"".join(self._json)) if self._json else b""
        out: list[bytes] = []
        if not self._done:
            if self.finished:
                self._end_stream(out)
            else:  # neither a finish reason nor [DONE]: a cut answer must not look whole
                out.append(self.error(502, "The provider closed the stream before it was complete."))
        return b"".join(out)

    @property
    def finished(self) -> bool:
        """A finish reason has arrived."""
        raise NotImplementedError

    def body(self, chat: bytes) -> bytes:
        raise NotImplementedError

    @staticmethod
    def _chat_message(chat: bytes) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """(the completion, its first choice, that choice's message) of a whole chat answer; the
        message is None when the answer is an error."""
        doc = orjson.loads(chat)
        if "error" in doc and "choices" not in doc:
            return doc, {}, None
        choice = (doc.get("choices") or [{}])[0]
        return doc, choice, choice.get("message") or {}

    def _call_state(self, call: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The call a tool-call piece belongs to, updated with it: (its position, what is known of
        it: id, name, arguments not yet sent). A new id at a known index, or no index, is a call of
        its own; its name may come after its first arguments."""
        calls = self._calls
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        given_id, position = call.get("id"), call.get("index")
        last = self._order[-1] if self._order else None
        if not isinstance(position, int):
            position = last if last is not None and (not given_id or calls[last]["id"] in (None, given_id)) else len(calls)
        elif position in calls and given_id and calls[position]["id"] not in (None, given_id):
            position = max(calls) + 1 + len(calls)
        state = calls.get(position)
        if state is None:
            state = calls[position] = {"id": None, "name": "", "args": [], "at": None, "sent": 0}
            self._order.append(position)
        if given_id and not state["id"]:
            state["id"] = given_id
        if fn.get("name") and not state["name"]:
            state["name"] = str(fn["name"])
        if isinstance(fn.get("arguments"), str) and fn["arguments"]:
            state["args"].append(fn["arguments"])
        return position, state

    def _text(self, literal: bytes, text: str, out: list[bytes]) -> None:
        """A text delta: `literal` is `text` as a JSON string, ready to be written."""
        raise NotImplementedError

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        raise NotImplementedError

    def _end_stream(self, out: list[bytes]) -> None:
        raise NotImplementedError

    def error(self, status: int, message: str) -> bytes:
        raise NotImplementedError

    def error_body(self, status: int, message: str, upstream: dict[str, Any] | None = None) -> bytes:
        """An error answer (nothing sent yet) in the dialect's shape; `upstream`: the provider's own
        `error` object, whose `code` and `param` a client may act on."""
        raise NotImplementedError
