"""Fake upstreams: real aiohttp servers speaking OpenAI/OpenRouter on loopback, replaying recorded payloads."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

# Copies of shared/fixtures (recorded real payloads; each .src.txt names its origin).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads(fixture_bytes(name))


def fixture_lines(name: str) -> list[Any]:
    return [json.loads(line) for line in fixture_bytes(name).splitlines() if line.strip()]


STREAM_BODY = fixture_bytes("openrouter-chat-stream-reasoning-usage.derived.sse")
JSON_BODY = fixture_bytes("openrouter-chat-response-nonstream-whitespace-prefix.json")


def without_cost(body: bytes) -> list[object]:
    """A response body as parsed events (SSE) or one JSON document, minus `usage.cost`, the one
    field the gateway writes itself. Keep-alive comments and whitespace are kept as they are."""
    parts: list[object] = []
    if body.lstrip().startswith(b"{"):
        parts.append(body[: len(body) - len(body.lstrip())])
        events = [body.lstrip()]
    else:
        events = body.split(b"\n\n")
    for event in events:
        text = event[6:] if event.startswith(b"data: ") else event
        try:
            doc = json.loads(text)
        except ValueError:
            parts.append(event)
            continue
        if isinstance(doc, dict) and isinstance(doc.get("usage"), dict):
            doc["usage"].pop("cost", None)
        parts.append(doc)
    return parts


def completion(model: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1770000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}],
        "usage": usage,
    }


def stream_events(model: str, usage: dict[str, Any] | None, words: int = 3) -> list[bytes]:
    """An OpenAI stream: role, content deltas, finish, then the usage chunk and [DONE]."""
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1770000000, "model": model}

    def event(choices: list[Any], u: Any = None) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, "usage": u}).encode() + b"\n\n"

    events = [event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    events += [event([{"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None}]) for i in range(words)]
    events.append(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if usage is not None:
        events.append(event([], usage))
    events.append(b"data: [DONE]\n\n")
    return events


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw: bytes = b""


@dataclass
class Upstream:
    """State and knobs of one fake upstream."""

    seen: list[Seen] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    # Behaviour of /chat/completions streams: "fixture", "huge", "slow".
    mode: str = "fixture"
    bytes_sent: int = 0
    closed_at: float = 0.0
    status: int = 200
    error_body: bytes = b""
    sndbuf: int = 0  # >0: a fixed send buffer, so the kernel holds little of what we "sent"
    usage: dict[str, Any] | None = None  # mode "usage": answer with this usage object
    delay: float = 0.0  # mode "usage": seconds between stream events
    # Native providers: recorded events (JSON objects) replayed as Anthropic or Gemini SSE, or a
    # recorded body for non-stream requests. `cut` stops the stream after that many events.
    replay: list[Any] = field(default_factory=list)
    replay_body: Any = None
    cut: int = 0
    raw: bytes = b""  # mode "raw": this stream body as is
    # Faults, taken in order per request: "reset" (drop the connection before answering), "hang"
    # (answer nothing for `hang` seconds), a status code as int (answer it), None (behave).
    faults: list[Any] = field(default_factory=list)
    hang: float = 30.0
    retry_after: str | None = None
    started: int = 0
    ended: int = 0
    tags: set[str] = field(default_factory=set)  # the `tag` body fields seen
    raw_json: bytes = b""  # mode "raw": this JSON body as is
    cookie: str = ""  # a Set-Cookie header on every non-stream answer
    one_write: bool = False  # native streams: every event in one write
    done: bool = False  # native streams: `data: [DONE]` after the events (OpenRouter's Responses)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/models", self.list_models)
        app.router.add_post("/v1/messages", self.native)
        app.router.add_post("/messages", self.native)  # OpenRouter's Messages
        app.router.add_post("/responses", self.native)  # OpenRouter's and OpenAI's Responses
        app.router.add_post("/models/{action}", self.native)
        return app

    async def native(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.seen.append(Seen(request.path_qs, dict(request.headers), body, raw))
        if self.status != 200:
            return web.Response(status=self.status, body=self.error_body, content_type="application/json")
        gemini = request.path.startswith("/models/")
        streaming = request.path.endswith(":streamGenerateContent") if gemini else body.get("stream")
        if not streaming:
            return web.json_response(self.replay_body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = self.replay[: self.cut] if self.cut else self.replay
        frames = []
        for event in events:
            data = json.dumps(event).encode()
            frames.append(b"data: " + data + b"\n\n" if gemini else b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n")
        if self.done and not self.cut:
            frames.append(b"data: [DONE]\n\n")
        for frame in [b"".join(frames)] if self.one_write else frames:
            await resp.write(frame)
        if self.cut:
            # a broken upstream: the connection drops in the middle of a response
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write_eof()
        return resp

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": self.models})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.started += 1
        try:
            return await self._chat(request)
        finally:
            self.ended += 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        self.tags.add(body.pop("tag", ""))
        fault = body.pop("fault", None) or (self.faults.pop(0) if self.faults else None)
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if fault == "hang":
            try:
                await asyncio.sleep(self.hang)
            except asyncio.CancelledError:
                self.closed_at = time.monotonic()
                raise
        if fault in ("echo", "echo-split", "echo-big", "echo-stall"):  # a careless upstream that quotes the key it was given
            key = request.headers.get("Authorization", "") + request.headers.get("x-api-key", "")
            text = f"Incorrect API key provided: {key}" + ("." * 70_000 if fault == "echo-big" else "")
            error = json.dumps({"error": {"message": text, "code": 400}}).encode()
            if fault == "echo":
                return web.Response(body=error, status=400, content_type="application/json")
            # in two writes, cut four characters before the key's end: two reads for the gateway
            resp = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            cut = error.index(key.encode()) + len(key) - 4
            await resp.write(error[:cut])
            await asyncio.sleep(self.hang if fault == "echo-stall" else 0.05)
            await resp.write(error[cut:])
            await resp.write_eof()
            return resp
        if fault == "echo-200":  # the key quoted in an answer, cut in two writes four characters before its end
            key = (request.headers.get("Authorization", "").removeprefix("Bearer ") + request.headers.get("x-api-key", ""))
            text = f"Your key is {key}." + "." * int(body.get("padding", 0))
            if body.get("stream"):
                answer = b"".join(stream_events(body["model"], None, words=0)).replace(
                    b'"content": ""', json.dumps({"content": text})[1:-1].encode())
            else:
                answer = json.dumps(completion(body["model"], None)).replace("Hello there.", text).encode()
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream" if body.get("stream") else "application/json"})
            await resp.prepare(request)
            cut = answer.index(key.encode()) + len(key) - 4
            await resp.write(answer[:cut])
            await asyncio.sleep(0.05)
            await resp.write(answer[cut:])
            await resp.write_eof()
            return resp
        if isinstance(fault, int):
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=fault, body=b'{"error": {"message": "busy", "code": %d}}' % fault,
                                content_type="application/json", headers=headers)
        if self.status != 200:
            return web.Response(status=self.status, body=self.error_body, content_type="application/json")
        if self.mode == "raw" and not body.get("stream"):
            return web.Response(body=self.raw_json, content_type="application/json")
        if self.mode == "usage" and not body.get("stream"):
            return web.json_response(completion(body["model"], self.usage))
        if not body.get("stream"):
            return web.Response(body=JSON_BODY, content_type="application/json",
                                headers={"Set-Cookie": self.cookie} if self.cookie else None)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if self.sndbuf and request.transport is not None:
            request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        await resp.prepare(request)
        try:
            if self.mode == "fixture":
                await resp.write(STREAM_BODY)
            elif self.mode == "raw":
                await resp.write(self.raw)
                if self.cut:  # a broken upstream: the connection drops in the middle
                    assert request.transport is not None
                    await asyncio.sleep(0.05)  # let what was written leave first
                    request.transport.abort()
                    return resp
            elif self.mode == "usage":
                for event in stream_events(body["model"], self.usage):
                    await resp.write(event)
                    if self.delay:
                        await asyncio.sleep(self.delay)
            elif self.mode == "huge":
                chunk = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
                while self.bytes_sent < 50 * 1024 * 1024:
                    await resp.write(chunk)
                    self.bytes_sent += len(chunk)
            elif self.mode == "slow":
                for i in range(600):
                    await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
                    self.bytes_sent += 1
                    await asyncio.sleep(0.05)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.closed_at = time.monotonic()
            raise
        return resp


def translate_reads(provider: Any, ctx: Any, reads: list[bytes], content_type: str = "text/event-stream") -> bytes:
    """What a provider's translation makes of an upstream answer that arrives in `reads`."""
    translation = provider.translation(ctx, content_type)
    out = [translation.feed(read) for read in reads]
    return b"".join(out) + translation.end()[0]
