"""Google Gemini: OpenAI chat requests in, `generateContent` / `streamGenerateContent?alt=sse` out,
and the answer back as OpenAI chat completions.

Thought signatures of function calls travel to the client in `reasoning_details` (keyed by the tool
call id) and are put back on the call when the client sends the history again.
Reads ctx.body, ctx.stream, ctx.model; returns the usage with the answer when the client did not ask
for it in the stream.
"""

from __future__ import annotations

import mimetypes
import uuid
from typing import Any

import orjson

from plugins.providers.common import (
    EFFORT_RATIO, Turns, completion, data_url, each_message, excluded, file_data, image_url, parts_of, reasoning_of, unknown_role,
    upstream_status,
)
from proxy.context import Context
from proxy.errors import invalid_request
from proxy.provider import (
    EventTranslation, Translation, UpstreamRequest, WholeTranslation, error_body, error_of,
)

FORMAT = "google-gemini-v1"
FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"}
FAILED = {"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"}
LEVELS = {"minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH", "xhigh": "HIGH", "max": "HIGH"}


def finish_reason(reason: str | None, called: bool) -> str | None:
    if reason is None:
        return None
    if reason == "MAX_TOKENS":
        return "length"
    if reason in FILTERED:
        return "content_filter"
    if reason in FAILED:
        return "error"
    return "tool_calls" if called else "stop"


def usage(meta: dict[str, Any]) -> dict[str, Any]:
    prompt = (meta.get("promptTokenCount") or 0) + (meta.get("toolUsePromptTokenCount") or 0)
    thoughts = meta.get("thoughtsTokenCount") or 0
    completion = (meta.get("candidatesTokenCount") or 0) + thoughts
    return {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": meta.get("totalTokenCount") or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": meta.get("cachedContentTokenCount") or 0},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def _part(part: Any) -> dict[str, Any] | None:
    if isinstance(part, str):
        return {"text": part}
    if not isinstance(part, dict):
        return None
    if part.get("type") == "text":
        return {"text": part.get("text", "")}
    if part.get("type") == "image_url":
        url = image_url(part)
        inline = data_url(url)
        if inline:
            return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
        return {"fileData": {"mimeType": mimetypes.guess_type(url)[0] or "image/jpeg", "fileUri": url}}
    if part.get("type") == "file":
        inline = file_data(part)
        if inline:
            return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    return None


def _parts(content: Any) -> list[dict[str, Any]]:
    return parts_of(content, _part, lambda text: {"text": text})


def _signatures(message: dict[str, Any]) -> dict[str, str]:
    return {d["id"]: d["data"] for d in message.get("reasoning_details") or []
            if isinstance(d, dict) and d.get("type") == "reasoning.encrypted" and d.get("format") == FORMAT
            and isinstance(d.get("id"), str) and isinstance(d.get("data"), str)}


def contents(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system parts, contents) in Gemini's shape."""
    system: list[dict[str, Any]] = []
    turns = Turns("parts")
    add = turns.add
    names: dict[str, str] = {}  # tool call id -> function name, for the responses
    for m in each_message(body):
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(p for p in _parts(m.get("content")) if "text" in p)
        elif role == "user":
            add("user", _parts(m.get("content")))
        elif role == "assistant":
            parts = _parts(m.get("content"))
            signatures = _signatures(m)
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                try:
                    args = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    raise invalid_request("Invalid request: tool call `arguments` must be JSON.", param="messages") from None
                call_id = call.get("id") or ""
                names[call_id] = fn.get("name", "")
                part: dict[str, Any] = {"functionCall": {"name": fn.get("name", ""), "args": args if isinstance(args, dict) else {"value": args}}}
                if call_id in signatures:
                    part["thoughtSignature"] = signatures[call_id]
                parts.append(part)
            add("model", parts)
        elif role == "tool":
            content = m.get("content")
            text = content if isinstance(content, str) else "".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict))
            try:
                response = orjson.loads(text)
            except orjson.JSONDecodeError:
                response = None
            if not isinstance(response, dict):
                response = {"result": text}
            call_id = m.get("tool_call_id", "")
            add("user", [{"functionResponse": {"name": names.get(call_id, call_id), "response": response}}])
        else:
            raise unknown_role(role)
    return system, turns.turns


def _generation(body: dict[str, Any], model: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0:
        config["maxOutputTokens"] = limit
    for ours, theirs in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK"), ("seed", "seed"),
                         ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                         ("n", "candidateCount")):
        if isinstance(body.get(ours), (int, float)) and not isinstance(body.get(ours), bool):
            config[theirs] = body[ours]
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    wish = reasoning_of(body)
    if wish is not None:
        thinking: dict[str, Any] = {"includeThoughts": not wish.get("exclude") and not wish.get("off")}
        if isinstance(wish.get("max_tokens"), int):
            thinking["thinkingBudget"] = wish["max_tokens"]
        elif model.startswith("gemini-3"):
            thinking["thinkingLevel"] = "LOW" if wish.get("off") else LEVELS.get(wish.get("effort") or "", "HIGH")
        elif wish.get("off"):
            thinking["thinkingBudget"] = 0
        elif wish.get("effort"):
            thinking["thinkingBudget"] = int((limit or 8192) * EFFORT_RATIO.get(wish["effort"], 0.5))
        else:
            thinking["thinkingBudget"] = -1
        config["thinkingConfig"] = thinking
    return config


class Gemini:
    def __init__(self, *, name: str, base_url: str, api_key: str = "", headers: dict[str, str] | None = None) -> None:
        self.name = name
        self.base = base_url.rstrip("/") + "/models/"
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self.headers["x-goog-api-key"] = api_key

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest:
        body = ctx.body
        system, turns = contents(body)
        payload: dict[str, Any] = {"contents": turns}
        if system:
            payload["systemInstruction"] = {"parts": system}
        tools = [t.get("function") or {} for t in body.get("tools") or [] if isinstance(t, dict)]
        if tools:
            payload["tools"] = [{"functionDeclarations": [
                {"name": f.get("name", ""), "description": f.get("description", ""),
                 **({"parametersJsonSchema": f["parameters"]} if f.get("parameters") else {})} for f in tools]}]
            choice = body.get("tool_choice")
            mode: dict[str, Any] | None = {"auto": {"mode": "AUTO"}, "none": {"mode": "NONE"},
                                           "required": {"mode": "ANY"}}.get(choice) if isinstance(choice, str) else None
            if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
                mode = {"mode": "ANY", "allowedFunctionNames": [choice["function"].get("name", "")]}
            if mode:
                payload["toolConfig"] = {"functionCallingConfig": mode}
        config = _generation(body, upstream_model)
        if config:
            payload["generationConfig"] = config
        action = ":streamGenerateContent?alt=sse" if ctx.stream else ":generateContent"
        return UpstreamRequest(self.base + upstream_model + action, self.headers, orjson.dumps(payload))

    def translation(self, ctx: Context, content_type: str) -> Translation:
        return _Stream(ctx) if ctx.stream else _Response(ctx)

    def error(self, status: int, body: bytes) -> tuple[int, bytes]:
        err, message = error_of(body)
        details = err.get("details")
        reasons = {d.get("reason") for d in details if isinstance(d, dict) and isinstance(d.get("reason"), str)} \
            if isinstance(details, list) else set()
        if "API_KEY_INVALID" in reasons:  # our key, not the caller's: the forwarder's rule for 401s
            return error_body(503, "The service is temporarily unavailable. Please try again later.",
                              error_type="temporarily_unavailable")
        ours, code = upstream_status(status, message)
        return error_body(ours, f"Gemini: {message or f'HTTP {status}'}", code=code)


def _candidate(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    candidates = doc.get("candidates") or []
    if not candidates:
        blocked = (doc.get("promptFeedback") or {}).get("blockReason")
        return [], "SAFETY" if blocked else None
    first = candidates[0]
    return (first.get("content") or {}).get("parts") or [], first.get("finishReason")


class _Response(WholeTranslation):
    """A Gemini response in, an OpenAI chat completion out."""

    compact = True  # every chunk made by `Chunks` or orjson

    def translate(self, body: bytes) -> bytes:
        ctx = self.ctx
        doc = orjson.loads(body)
        parts, reason = _candidate(doc)
        exclude = excluded(ctx.body)
        text, thoughts, calls, details = [], [], [], []
        for i, part in enumerate(parts):
            if "functionCall" in part:
                call = part["functionCall"]
                call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
                calls.append({"id": call_id, "type": "function", "function": {
                    "name": call.get("name"), "arguments": orjson.dumps(call.get("args") or {}).decode()}})
                if part.get("thoughtSignature"):
                    details.append({"type": "reasoning.encrypted", "data": part["thoughtSignature"], "id": call_id,
                                    "format": FORMAT, "index": i})
            elif part.get("thought"):
                if not exclude:
                    thoughts.append(part.get("text", ""))
            elif "text" in part:
                text.append(part["text"])
        return completion(ctx, doc.get("responseId"), text, calls, thoughts, details,
                          finish_reason(reason, bool(calls)) or "stop", reason, usage(doc.get("usageMetadata") or {}))


class _Stream(EventTranslation):
    """Gemini responses in, OpenAI chunks out."""

    compact = True  # every chunk made by `Chunks` or orjson

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.exclude = excluded(ctx.body)
        self.started = False
        self.called = 0
        self.reason: str | None = None
        self.meta: dict[str, Any] = {}

    def translate(self, events: list[tuple[str, bytes]]) -> None:
        out, parts = self.out, self.parts
        for name, raw in events:
            if not name or self.over:
                continue
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parts.append(out.error("The provider sent an invalid event."))
                self.over = True
                continue
            if "error" in doc:
                err = doc.get("error") or {}
                parts.append(out.error(f"Gemini: {err.get('message') or 'error'}", int(err.get("code") or 502)))
                self.over = True
                continue
            if not self.started:
                self.started = True
                if doc.get("responseId"):
                    out.id = doc["responseId"]
                parts.append(out.delta({"role": "assistant", "content": ""}))
            self.meta = doc.get("usageMetadata") or self.meta
            pieces, finish = _candidate(doc)
            self.reason = finish or self.reason
            for i, part in enumerate(pieces):
                if "functionCall" in part:
                    call = part["functionCall"]
                    call_id = call.get("id") or f"call_{uuid.uuid4().hex[:24]}"
                    delta: dict[str, Any] = {"tool_calls": [{"index": self.called, "id": call_id, "type": "function", "function": {
                        "name": call.get("name"), "arguments": orjson.dumps(call.get("args") or {}).decode()}}]}
                    if part.get("thoughtSignature"):
                        delta["reasoning_details"] = [{"type": "reasoning.encrypted", "data": part["thoughtSignature"],
                                                       "id": call_id, "format": FORMAT, "index": i}]
                    self.called += 1
                    parts.append(out.delta(delta))
                elif part.get("thought"):
                    if not self.exclude and part.get("text"):
                        parts.append(out.delta({"reasoning": part["text"]}))
                elif part.get("text"):
                    parts.append(out.delta({"content": part["text"]}))

    def closing(self) -> bytes:
        """The end of the upstream stream: Gemini has no closing event, its last finish reason is it."""
        if self.reason is None:
            return super().closing()
        return self.out.delta({}, finish_reason(self.reason, self.called > 0)) + self.totals(usage(self.meta))
