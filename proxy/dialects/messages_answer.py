"""The chat answer turned back into an Anthropic Messages answer, with the event sequence Anthropic's
SDKs and Claude Code expect: thinking, then text, then tool_use blocks, each opened, filled and closed
in turn; usage in Anthropic's convention (input tokens without cache reads and writes); a failure
after the stream began as an `error` event."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from proxy.dialects.answer import ChatAnswer
from proxy.dialects.responses import CARRIED
from proxy.dialects.messages import FORMAT, error_doc, error_event, sse_event

STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
        "content_filter": "refusal"}
_MESSAGE_DELTA = (b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"%s","stop_sequence":null},'
                  b'"usage":{"input_tokens":%d,"cache_creation_input_tokens":%d,"cache_read_input_tokens":%d,'
                  b'"output_tokens":%d}}\n\n')
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'


def _usage(chat: Any) -> dict[str, int]:
    """Anthropic's usage from OpenAI's: input tokens do not include cache reads and writes."""
    u = chat if isinstance(chat, dict) else {}
    details = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    read = int(details.get("cached_tokens") or 0)
    write = int(details.get("cache_write_tokens") or 0)
    prompt = int(u.get("prompt_tokens") or 0)
    return {"input_tokens": max(prompt - read - write, 0), "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read, "output_tokens": int(u.get("completion_tokens") or 0)}


def _redacted(detail: dict[str, Any]) -> str:
    """A redacted_thinking block's data: Anthropic's own as it came; another provider's (Gemini's
    thought signature) carried whole, for the gateway to give back to it next turn."""
    if detail.get("format") == FORMAT:
        return str(detail.get("data") or "")
    return CARRIED + base64.b64encode(orjson.dumps([detail])).decode()


def _arguments(raw: Any) -> Any:
    try:
        value = orjson.loads(raw or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


class MessagesAnswer(ChatAnswer):
    """The chat answer on its way out, turned into Messages."""

    TERMINAL = (b"event: message_stop\n", b"event: error\n", b'data: {"type":"message_stop"')

    def __init__(self, request_id: str, model: str, stream: bool, input_estimate: int) -> None:
        super().__init__(stream)
        self.id = "msg_" + request_id
        self.model = model  # the name the client asked for
        self.input_estimate = input_estimate
        self._block: str | None = None  # the open block's kind: thinking, text, tool_use
        self._index = -1  # the open block's index
        self._signature = ""
        self._stop: str | None = None
        self._usage: dict[str, int] | None = None

    @property
    def finished(self) -> bool:
        return self._stop is not None

    # JSON
    def body(self, chat: bytes) -> bytes:
        doc, choice, message = self._chat_message(chat)
        if message is None:
            return error_doc(502, str((doc.get("error") or {}).get("message") or "The provider sent an error."))
        content: list[dict[str, Any]] = []
        for d in message.get("reasoning_details") or []:
            if isinstance(d, dict) and d.get("type") == "reasoning.text":
                content.append({"type": "thinking", "thinking": d.get("text") or "", "signature": d.get("signature") or ""})
            elif isinstance(d, dict) and d.get("type") == "reasoning.encrypted" and d.get("data"):
                content.append({"type": "redacted_thinking", "data": _redacted(d)})
        reasoning = message.get("reasoning") or message.get("reasoning_content")
        if not content and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{self.id}", "name": fn.get("name", ""),
                            "input": _arguments(fn.get("arguments"))})
        stop = "tool_use" if message.get("tool_calls") else STOP.get(choice.get("finish_reason"), "end_turn")
        return orjson.dumps({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                             "content": content, "stop_reason": stop, "stop_sequence": None,
                             "usage": _usage(doc.get("usage"))})

    def error_body(self, status: int, message: str, upstream: dict[str, Any] | None = None) -> bytes:
        """An error answer (nothing sent yet) in Anthropic's shape."""
        return error_doc(status, message)

    def error(self, status: int, message: str) -> bytes:
        """The error that ends a stream: Anthropic's `error` event, then nothing (never a fake end)."""
        if self._done:
            return b""
        self._done = True
        return error_event(status, message)

    def _start(self, out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            out.append(b"".join((
                b'event: message_start\ndata: {"type":"message_start","message":{"id":', orjson.dumps(self.id),
                b',"type":"message","role":"assistant","model":', orjson.dumps(self.model),
                b',"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":',
                str(self.input_estimate).encode(),
                b',"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n')))

    def _open(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self._index += 1
        self._block = kind
        if kind == "text":  # the usual block, written without building its object
            out.append(b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,'
                       b'"content_block":{"type":"text","text":""}}\n\n' % self._index)
        else:
            out.append(sse_event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                      "content_block": block}))

    def _close(self, out: list[bytes]) -> None:
        if self._block is None:
            return
        if self._block == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": self._signature}))
            self._signature = ""
        out.append(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n' % self._index)
        self._block = None

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta})

    def _text_delta(self, kind: bytes, key: bytes, text: str, literal: bytes = b"") -> bytes:
        """A text or thinking delta, the most frequent event, written without building its object."""
        return b"".join((_DELTA_HEAD, str(self._index).encode(), b',"delta":{"type":"', kind, b'","', key, b'":',
                         literal or orjson.dumps(text), b"}}\n\n"))

    def _runs(self) -> bool:
        return self._block == "text" and not self._done

    def _run_events(self, strings: list[bytes], texts: list[str]) -> bytes:
        head = _DELTA_HEAD + str(self._index).encode() + b',"delta":{"type":"text_delta","text":'
        return head + (b"}}\n\n" + head).join(strings) + b"}}\n\n"

    def _text(self, literal: bytes, text: str, out: list[bytes]) -> None:
        self._start(out)
        if self._block != "text":
            self._open("text", {"type": "text", "text": ""}, out)
        out.append(self._text_delta(b"text_delta", b"text", text, literal))

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if self._done:
            return
        if "error" in chunk:  # the gateway's or a translator's error chunk
            err = chunk.get("error") or {}
            code = err.get("code")
            self._start(out)
            out.append(self.error(code if isinstance(code, int) else 502, str(err.get("message") or "error")))
            return
        self._start(out)
        if isinstance(chunk.get("usage"), dict):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning") or delta.get("reasoning_content")  # OpenRouter's, or DeepSeek's
            for d in delta.get("reasoning_details") or []:
                if isinstance(d, dict) and d.get("signature"):
                    self._signature = d["signature"]
                if isinstance(d, dict) and d.get("type") == "reasoning.encrypted" and d.get("data"):
                    self._open("redacted_thinking", {"type": "redacted_thinking", "data": _redacted(d)}, out)
                    self._close(out)
                if isinstance(d, dict) and not reasoning and d.get("type") == "reasoning.text" and d.get("text"):
                    reasoning = d["text"]
            if reasoning:
                if self._block != "thinking":
                    self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                out.append(self._text_delta(b"thinking_delta", b"thinking", reasoning))
            if delta.get("content"):
                if self._block != "text":
                    self._open("text", {"type": "text", "text": ""}, out)
                out.append(self._text_delta(b"text_delta", b"text", delta["content"]))
            for call in delta.get("tool_calls") or []:
                if isinstance(call, dict):
                    self._call(call, out)
            finish = choice.get("finish_reason")
            if finish:
                self._stop = "tool_use" if self._calls else STOP.get(finish, "end_turn")

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        """A tool call's piece: its block opens once its name is known."""
        position, state = self._call_state(call)
        if state["at"] is None:
            if state["name"]:
                self._open_call(position, state, out)
        elif state["at"] == self._index and self._block == "tool_use":
            self._send_args(state, out)

    def _send_args(self, state: dict[str, Any], out: list[bytes]) -> None:
        pending = state["args"][state["sent"]:]
        if pending:
            state["sent"] = len(state["args"])
            out.append(self._delta({"type": "input_json_delta", "partial_json": "".join(pending)}))

    def _open_call(self, position: int, state: dict[str, Any], out: list[bytes]) -> None:
        self._open("tool_use", {"type": "tool_use", "id": state["id"] or f"toolu_{self.id}_{position}",
                                "name": state["name"], "input": {}}, out)
        state["at"] = self._index
        self._send_args(state, out)

    def _end_stream(self, out: list[bytes]) -> None:
        if self._done:
            return
        self._done = True
        self._start(out)
        for position in self._order:  # a call whose name never came still gets its block
            if self._calls[position]["at"] is None:
                self._open_call(position, self._calls[position], out)
        self._close(out)
        usage = self._usage or {"input_tokens": self.input_estimate, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0, "output_tokens": 0}
        out.append(_MESSAGE_DELTA % ((self._stop or "end_turn").encode(), usage["input_tokens"], usage["cache_creation_input_tokens"],
                                     usage["cache_read_input_tokens"], usage["output_tokens"]) + _MESSAGE_STOP)



