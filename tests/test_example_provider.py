"""The example provider package in deploy/examples/turnstile-ollama, registered through the
`turnstile.providers` entry-point group like any installed package, serving a fake Ollama."""

from __future__ import annotations

import json
from pathlib import Path

from aiohttp import web

from tests.plugins.providers.helpers import assemble, chunks_of

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "turnstile-ollama"


def install(tmp_path, monkeypatch) -> None:
    """What `pip install` leaves behind: the module importable and its entry point registered."""
    dist = tmp_path / "turnstile_ollama-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: turnstile-ollama\nVersion: 0.1.0\n")
    ep = (EXAMPLE / "pyproject.toml").read_text().split('[project.entry-points."turnstile.providers"]')[1].strip().replace('"', "")
    (dist / "entry_points.txt").write_text(f"[turnstile.providers]\n{ep}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))


async def test_example_provider(gateway, aiohttp_server, tmp_path, monkeypatch):
    install(tmp_path, monkeypatch)
    seen = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        words = ["Hel", "lo", "!"]
        if not body["stream"]:
            return web.json_response({"message": {"role": "assistant", "content": "Hello!"}, "done": True,
                                      "done_reason": "stop", "prompt_eval_count": 7, "eval_count": 3})
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for w in words:
            await resp.write(json.dumps({"message": {"role": "assistant", "content": w}, "done": False}).encode() + b"\n")
        await resp.write(json.dumps({"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                                     "prompt_eval_count": 7, "eval_count": 3}).encode() + b"\n")
        return resp

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    ollama = await aiohttp_server(app)
    client = await gateway(
        providers=[{"name": "ollama", "use": "ollama-chat", "base_url": str(ollama.make_url("")), "options": {"keep_alive": "1h"}}],
        models=[{"id": "ollama/llama3.2", "name": "Llama 3.2 (local)", "context_length": 131072, "free": True,
                 "pricing": {"prompt": "0", "completion": "0"}, "routes": {"ollama": "llama3.2"}}],
    )
    body = {"model": "ollama/llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    got = assemble(chunks_of(await (await client.post("/v1/chat/completions", json=body)).read())[0])
    assert got["text"] == "Hello!" and got["finish"] == "stop"
    assert got["usage"]["total_tokens"] == 10 and got["usage"]["cost"] == 0
    assert seen[0]["model"] == "llama3.2" and seen[0]["keep_alive"] == "1h"
    reply = await (await client.post("/v1/chat/completions", json={**body, "stream": False})).json()
    assert reply["choices"][0]["message"]["content"] == "Hello!"
