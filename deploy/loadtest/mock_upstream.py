"""A mock provider fast enough not to be the bottleneck: OpenAI chat, Anthropic Messages and Gemini
generateContent, each as JSON and as SSE, all precomputed. `python mock_upstream.py --port 9100 --chunks 50 --delay 0`."""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

def _json(obj: object) -> str:
    """Compact, as OpenAI, OpenRouter, Anthropic and Gemini send it (no spaces after `:` and `,`)."""
    return json.dumps(obj, separators=(",", ":"))


def openai_bodies(chunks: int) -> tuple[bytes, list[bytes]]:
    usage = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}  # a token per chunk
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1770000000, "model": "mock"}
    full = {**base, "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
            "content": "word " * chunks}, "finish_reason": "stop"}], "usage": usage}
    events = [b"data: " + _json({**base, "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}]}).encode() + b"\n\n"
              for _ in range(chunks)]
    events.append(b"data: " + _json({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n")
    events.append(b"data: " + _json({**base, "choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
    return _json(full).encode(), events


def anthropic_events(chunks: int) -> list[bytes]:
    def ev(obj: dict) -> bytes:
        return b"event: " + obj["type"].encode() + b"\ndata: " + _json(obj).encode() + b"\n\n"
    # message_start whole, as Anthropic sends it (the SDK's stream helper builds the message from it).
    out = [ev({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": "mock",
                                                    "content": [], "stop_reason": None, "stop_sequence": None,
                                                    "usage": {"input_tokens": 12, "output_tokens": 1}}}),
           ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})]
    out += [ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "word "}})] * chunks
    out += [ev({"type": "content_block_stop", "index": 0}),
            ev({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks}}),
            ev({"type": "message_stop"})]
    return out


def gemini_events(chunks: int) -> list[bytes]:
    part = {"candidates": [{"content": {"role": "model", "parts": [{"text": "word "}]}}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": chunks}}
    last = {"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": chunks, "totalTokenCount": 12 + chunks}}
    return [b"data: " + _json(part).encode() + b"\n\n"] * chunks + [b"data: " + _json(last).encode() + b"\n\n"]


def make_app(chunks: int, delay: float) -> web.Application:
    body, events = openai_bodies(chunks)
    anthropic, gemini = anthropic_events(chunks), gemini_events(chunks)
    anthropic_body = _json({"id": "msg_mock", "type": "message", "role": "assistant", "model": "mock",
                                 "content": [{"type": "text", "text": "word " * chunks}], "stop_reason": "end_turn",
                                 "usage": {"input_tokens": 12, "output_tokens": chunks}}).encode()
    gemini_body = _json({"candidates": [{"content": {"role": "model", "parts": [{"text": "word " * chunks}]},
                                              "finishReason": "STOP"}],
                              "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": chunks,
                                                "totalTokenCount": 12 + chunks}}).encode()
    sse = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

    async def stream(request: web.Request, parts: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers=sse)
        await resp.prepare(request)
        if delay:
            for part in parts:
                await resp.write(part)
                await asyncio.sleep(delay)
        else:
            await resp.write(b"".join(parts))
        await resp.write_eof()
        return resp

    async def chat(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if b'"stream":true' in raw or b'"stream": true' in raw:
            if b'"mock_delay"' in raw:  # a per-request pace: {"mock_delay": 0.02} in the body
                return await paced(request, events, float(json.loads(raw)["mock_delay"]))
            return await stream(request, events)
        return web.Response(body=body, content_type="application/json")

    async def paced(request: web.Request, parts: list[bytes], pace: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers=sse)
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            await asyncio.sleep(pace)
        await resp.write_eof()
        return resp

    async def messages(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if b'"stream":true' in raw or b'"stream": true' in raw:
            return await stream(request, anthropic)
        return web.Response(body=anthropic_body, content_type="application/json")

    async def generate(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.match_info["action"].endswith(":streamGenerateContent"):
            return await stream(request, gemini)
        return web.Response(body=gemini_body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1beta/models/{action}", generate)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9100, help="port on 127.0.0.1")
    p.add_argument("--chunks", type=int, default=50, help="stream events (and completion tokens) per answer")
    p.add_argument("--delay", type=float, default=0.0, help="seconds between stream events")
    args = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.chunks, args.delay), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
