"""The chat answer turned back into an OpenAI Responses answer, with the event lifecycle the OpenAI
SDKs, the AI SDK and Codex expect: `response.created` and `response.in_progress`, then per output
item (reasoning, message, function call) its `added`, deltas, `done` events, one item closed before
the next opens, then exactly one terminal event (`response.completed`, `.incomplete` or `.failed`)
carrying every item and the usage. Every event has a `sequence_number` counting from 0."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from proxy.dialects.answer import ChatAnswer
from proxy.dialects.responses import CARRIED
from proxy.errors import GatewayError

_CODES = {429: "rate_limit_exceeded", 402: "insufficient_quota", 401: "invalid_api_key", 403: "permission_denied",
          404: "model_not_found"}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def usage(chat: Any) -> dict[str, Any]:
    """Responses usage from chat usage: input tokens include the cached ones in both."""
    u = chat if isinstance(chat, dict) else {}
    pd = u.get("prompt_tokens_details") if isinstance(u.get("prompt_tokens_details"), dict) else {}
    cd = u.get("completion_tokens_details") if isinstance(u.get("completion_tokens_details"), dict) else {}
    prompt, completion = int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)
    out: dict[str, Any] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": int(pd.get("cached_tokens") or 0)},
                           "output_tokens": completion,
                           "output_tokens_details": {"reasoning_tokens": int(cd.get("reasoning_tokens") or 0)},
                           "total_tokens": prompt + completion}
    if isinstance(u.get("cost"), (int, float)):
        out["cost"] = u["cost"]
    return out


def error_doc(status: int, message: str, code: str | None = None) -> bytes:
    """An error answer in the OpenAI shape (what the OpenAI SDKs and Codex read)."""
    return orjson.dumps({"error": GatewayError(status, code or "upstream_error", message).body()["error"]})


class ResponsesAnswer(ChatAnswer):
    TERMINAL = (b"event: response.completed\n", b"event: response.incomplete\n", b"event: response.failed\n",
                b'data: {"type":"response.completed"', b'data: {"type":"response.incomplete"',
                b'data: {"type":"response.failed"')

    def __init__(self, request_id: str, body: dict[str, Any], stream: bool,
                 namespaced: dict[str, tuple[str, str]] | None = None) -> None:
        super().__init__(stream)
        self.rid = request_id
        self.id = "resp_" + request_id
        self.namespaced = namespaced or {}  # a namespace function's chat name -> (namespace, name)
        self.created_at = int(time.time())
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
        # What every copy of the response object repeats of the request.
        self.envelope: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions") if isinstance(body.get("instructions"), str) else None,
            "max_output_tokens": body.get("max_output_tokens"), "model": body.get("model"), "output": [],
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False, "previous_response_id": None,
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "safety_identifier": body.get("safety_identifier"), "service_tier": "default", "store": False,
            "temperature": body.get("temperature", 1), "text": {"format": text.get("format") or {"type": "text"},
                                                               "verbosity": text.get("verbosity", "medium")},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1), "truncation": "disabled", "usage": None, "user": body.get("user"),
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        }
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # finished output items
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._texts: list[str] = []  # its text (message), summary (reasoning) or arguments (function call)
        self._details: list[dict[str, Any]] = []  # the upstream's reasoning details, carried for the next turn
        self._text_head = b""  # an output_text.delta's fields from item_id to `delta`, for the open message
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self._finish is not None

    # -- shared ---------------------------------------------------------------------------------

    def _response(self, status: str, **extra: Any) -> dict[str, Any]:
        return {**self.envelope, "status": status, **extra}

    def _event(self, kind: str, doc: dict[str, Any]) -> bytes:
        doc = {"type": kind, "sequence_number": self._seq, **doc}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"

    def _reasoning_item(self, rid: str, summary: str, details: list[dict[str, Any]]) -> dict[str, Any]:
        item: dict[str, Any] = {"id": rid, "type": "reasoning",
                                "summary": [{"type": "summary_text", "text": summary}] if summary else []}
        if any(d.get("signature") or d.get("data") for d in details):
            item["encrypted_content"] = CARRIED + base64.b64encode(orjson.dumps(details)).decode()
        return item

    def _call_item(self, fid: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        item: dict[str, Any] = {"id": fid, "type": "function_call", "status": status, "arguments": arguments,
                                "call_id": call_id, "name": name}
        if name in self.namespaced:
            item["namespace"], item["name"] = self.namespaced[name]
        return item

    def _terminal(self) -> tuple[str, dict[str, Any]]:
        """The response's final status and what goes with it."""
        reason = _INCOMPLETE.get(self._finish or "")
        if reason:
            return "incomplete", {"incomplete_details": {"reason": reason}}
        return "completed", {}

    # -- JSON -----------------------------------------------------------------------------------

    def body(self, chat: bytes) -> bytes:
        doc, choice, message = self._chat_message(chat)
        if message is None:
            return error_doc(502, str((doc.get("error") or {}).get("message") or "The provider sent an error."))
        output: list[dict[str, Any]] = []
        details = [d for d in message.get("reasoning_details") or [] if isinstance(d, dict)]
        summary = message.get("reasoning") or message.get("reasoning_content") or "".join(
            str(d.get("text") or "") for d in details if d.get("type") == "reasoning.text")
        if summary or details:
            output.append(self._reasoning_item(f"rs_{self.rid}_0", summary or "", details))
        if message.get("content"):
            output.append({"id": f"msg_{self.rid}_{len(output)}", "type": "message", "status": "completed",
                           "role": "assistant", "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                                                              "text": message["content"]}]})
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            output.append(self._call_item(f"fc_{self.rid}_{len(output)}", call.get("id") or f"call_{self.rid}_{len(output)}",
                                          fn.get("name") or "", fn.get("arguments") or "{}", "completed"))
        self._finish = choice.get("finish_reason")
        status, extra = self._terminal()
        return orjson.dumps(self._response(status, output=output, usage=usage(doc.get("usage")), **extra))

    # -- stream ---------------------------------------------------------------------------------

    def _start(self, out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            out.append(self._event("response.created", {"response": self.envelope}))
            out.append(self._event("response.in_progress", {"response": self.envelope}))

    def _open_item(self, item: dict[str, Any], out: list[bytes]) -> int:
        self._close(out)
        index = len(self._items)
        self._open = item
        self._texts = []
        out.append(self._event("response.output_item.added", {"output_index": index, "item": item}))
        return index

    def _text(self, literal: bytes, text: str, out: list[bytes]) -> None:
        self._start(out)
        if self._open is None or self._open["type"] != "message":
            self._open_message(out)
        self._texts.append(text)
        out.append(b"".join((b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
                             b'"sequence_number":', str(self._seq).encode(), self._text_head, literal,
                             b',"logprobs":[]}\n\n')))
        self._seq += 1

    def _runs(self) -> bool:
        return self._open is not None and self._open["type"] == "message" and not self._done

    def _run_events(self, strings: list[bytes], texts: list[str]) -> bytes:
        self._texts.extend(texts)
        template = (b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":%d'
                    + self._text_head.replace(b"%", b"%%") + b'%s,"logprobs":[]}\n\n')
        seq = self._seq
        self._seq += len(strings)
        return b"".join([template % pair for pair in zip(range(seq, seq + len(strings)), strings)])

    def _open_message(self, out: list[bytes]) -> None:
        index = self._open_item({"id": f"msg_{self.rid}_{len(self._items) + (self._open is not None)}",
                                 "type": "message", "status": "in_progress", "content": [], "role": "assistant"}, out)
        item_id = self._open["id"]  # type: ignore[index]
        out.append(self._event("response.content_part.added", {
            "item_id": item_id, "output_index": index, "content_index": 0,
            "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}}))
        self._text_head = b',"item_id":' + orjson.dumps(item_id) + b',"output_index":' + str(index).encode() + \
            b',"content_index":0,"delta":'

    def _delta(self, kind: str, text: str, out: list[bytes], **where: Any) -> None:
        self._texts.append(text)
        out.append(self._event(kind, {"item_id": self._open["id"], "output_index": len(self._items), **where,  # type: ignore[index]
                                      "delta": text}))

    def _close(self, out: list[bytes]) -> None:
        item = self._open
        if item is None:
            return
        index = len(self._items)
        text = "".join(self._texts)
        where = {"item_id": item["id"], "output_index": index}
        kind = item["type"]
        if kind == "message":
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
            out.append(self._event("response.output_text.done", {**where, "content_index": 0, "text": text, "logprobs": []}))
            out.append(self._event("response.content_part.done", {**where, "content_index": 0, "part": part}))
            item = {**item, "status": "incomplete" if self._finish == "length" else "completed", "content": [part]}
        elif kind == "reasoning":
            if self._texts:
                part = {"type": "summary_text", "text": text}
                out.append(self._event("response.reasoning_summary_text.done", {**where, "summary_index": 0, "text": text}))
                out.append(self._event("response.reasoning_summary_part.done", {**where, "summary_index": 0, "part": part}))
            item = self._reasoning_item(item["id"], text, self._details)
            self._details = []
        else:
            arguments = text or "{}"
            out.append(self._event("response.function_call_arguments.done", {**where, "arguments": arguments}))
            item = {**item, "status": "completed", "arguments": arguments}
        out.append(self._event("response.output_item.done", {"output_index": index, "item": item}))
        self._items.append(item)
        self._open = None

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if self._done:
            return
        self._start(out)
        if "error" in chunk:  # the gateway's or a translator's error chunk
            err = chunk.get("error") or {}
            code = err.get("code")
            out.append(self.error(code if isinstance(code, int) else 502, str(err.get("message") or "error")))
            return
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning") or delta.get("reasoning_content")
            details = delta.get("reasoning_details")
            if details:
                for d in details:
                    if isinstance(d, dict):
                        if not reasoning and d.get("type") == "reasoning.text" and d.get("text"):
                            reasoning = d["text"]
                        self._merge(d)
            if reasoning:
                if self._open is None or self._open["type"] != "reasoning":
                    self._open_item({"id": f"rs_{self.rid}_{len(self._items) + (self._open is not None)}",
                                     "type": "reasoning", "summary": []}, out)
                    out.append(self._event("response.reasoning_summary_part.added", {
                        "item_id": self._open["id"], "output_index": len(self._items), "summary_index": 0,  # type: ignore[index]
                        "part": {"type": "summary_text", "text": ""}}))
                self._delta("response.reasoning_summary_text.delta", reasoning, out, summary_index=0)
            content = delta.get("content")
            if content:
                self._text(orjson.dumps(content), content, out)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    self._call(call, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        """A tool call's piece: its item opens once its name is known; arguments for a call already
        closed (an upstream that interleaves calls) still reach its item in the final output."""
        _, state = self._call_state(call)
        if state["at"] is None:
            if state["name"]:
                self._open_call(state, out)
        elif state["at"] == len(self._items) and self._open is not None:  # the open item
            self._flush_args(state, out)
        else:
            self._items[state["at"]]["arguments"] = "".join(state["args"]) or "{}"

    def _open_call(self, state: dict[str, Any], out: list[bytes]) -> None:
        index = len(self._items) + (self._open is not None)
        call_id = state["id"] or f"call_{self.rid}_{index}"
        self._open_item(self._call_item(f"fc_{self.rid}_{index}", call_id, state["name"], "", "in_progress"), out)
        state["at"] = len(self._items)
        self._flush_args(state, out)

    def _flush_args(self, state: dict[str, Any], out: list[bytes]) -> None:
        pending = state["args"][state["sent"]:]
        if pending:
            state["sent"] = len(state["args"])
            self._delta("response.function_call_arguments.delta", "".join(pending), out)

    def _merge(self, detail: dict[str, Any]) -> None:
        """Reasoning details arrive in pieces (text, then the signature): one detail per index."""
        index = detail.get("index", 0)
        for known in self._details:
            if known.get("index", 0) == index and known.get("type") == detail.get("type"):
                if detail.get("text"):
                    known["text"] = (known.get("text") or "") + detail["text"]
                for key in ("signature", "data", "format", "id"):
                    if detail.get(key):
                        known[key] = detail[key]
                return
        self._details.append(dict(detail))

    def _settle(self, out: list[bytes]) -> None:
        """Before the terminal event: calls whose name never came get their items, the open item
        closes, and reasoning details no reasoning item carried (Gemini's signature, which comes
        with its function call) get one of their own, for the next turn."""
        self._start(out)
        for position in self._order:
            state = self._calls[position]
            if state["at"] is None:
                self._open_call(state, out)
        self._close(out)
        if self._details:
            self._open_item({"id": f"rs_{self.rid}_{len(self._items)}", "type": "reasoning", "summary": []}, out)
            self._close(out)

    def _end_stream(self, out: list[bytes]) -> None:
        if self._done:
            return
        self._done = True
        self._settle(out)
        status, extra = self._terminal()
        out.append(self._event(f"response.{status}", {"response": self._response(
            status, output=self._items, usage=usage(self._usage), **extra)}))

    def error_body(self, status: int, message: str, upstream: dict[str, Any] | None = None) -> bytes:
        """The provider's `code` and `param` kept (Codex acts on `context_length_exceeded`,
        `invalid_encrypted_content`…)."""
        error = GatewayError(status, "upstream_error", message).body()["error"]
        for key in ("code", "param"):  # the provider's, null included, when it gave one
            if upstream and key in upstream and (upstream[key] is None or isinstance(upstream[key], str)):
                error[key] = upstream[key]
        return orjson.dumps({"error": error})

    def error(self, status: int, message: str) -> bytes:
        """The end of a stream that failed: what was streamed of the open item closes it, then an
        `error` event and `response.failed` (what Codex reads)."""
        if self._done:
            return b""
        self._done = True
        out: list[bytes] = []
        self._settle(out)
        code = _CODES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        if status == 400 and "context" in message.lower() and ("length" in message.lower() or "window" in message.lower()):
            code = "context_length_exceeded"
        out.append(self._event("error", {"error": {"type": code, "code": code, "message": message, "param": None}}))
        out.append(self._event("response.failed", {"response": self._response(
            "failed", output=self._items, error={"code": code, "message": message}, usage=usage(self._usage))}))
        return b"".join(out)
