"""The catalog and `/models`: every seed model with known prices, the auto tiers, the Kilo CLI's schema."""

from __future__ import annotations

import re

from proxy.catalog import Catalog, seed_rows

SEED_IDS = [
    "anthropic/claude-opus-4.7", "anthropic/claude-sonnet-4.6", "anthropic/claude-haiku-4.5",
    "openai/gpt-5.4", "openai/gpt-5.4-mini", "openai/gpt-5.3-codex",
    "google/gemini-3.1-pro-preview", "google/gemini-2.5-flash", "google/gemma-4-31b-it",
    "google/gemma-4-26b-a4b-it:free", "x-ai/grok-4", "x-ai/grok-code-fast-1", "deepseek/deepseek-v3.2",
    "moonshotai/kimi-k2.5", "minimax/minimax-m2.7", "minimax/minimax-m2.5:free",
    "stepfun/step-3.5-flash:free", "bytedance-seed/dola-seed-2.0-pro:free",
    "x-ai/grok-code-fast-1:optimized:free", "nvidia/nemotron-3-super-120b-a12b:free",
    "arcee-ai/trinity-large-thinking:free", "openrouter/free",
]
AUTO = ["kilo-auto/frontier", "kilo-auto/balanced", "kilo-auto/free", "kilo-auto/small"]
PRICE = re.compile(r"^\d+(\.\d+)?$")


async def test_models_lists_every_seed_model_and_the_auto_tiers(gateway):
    client = await gateway()
    resp = await client.get("/api/openrouter/models")
    assert resp.status == 200
    data = (await resp.json())["data"]
    ids = [e["id"] for e in data]
    assert set(SEED_IDS + AUTO) <= set(ids)
    for e in data:
        assert isinstance(e["id"], str) and isinstance(e["name"], str)
        assert isinstance(e["context_length"], int)
        assert PRICE.match(e["pricing"]["prompt"]) and PRICE.match(e["pricing"]["completion"])
        assert all(isinstance(v, str) for v in e["pricing"].values())
        assert isinstance(e["isFree"], bool)
        assert "routes" not in e
    assert ids[:4] == AUTO  # preferredIndex order


async def test_models_entries_carry_the_seed_figures(gateway):
    client = await gateway()
    data = {e["id"]: e for e in (await (await client.get("/v1/models")).json())["data"]}
    sonnet = data["anthropic/claude-sonnet-4.6"]
    assert sonnet["pricing"]["prompt"] == "0.000003"
    assert sonnet["pricing"]["completion"] == "0.000015"
    assert sonnet["pricing"]["input_cache_read"] == "0.0000003"
    assert sonnet["context_length"] == 1000000
    assert sonnet["top_provider"]["max_completion_tokens"] == 128000
    assert "tools" in sonnet["supported_parameters"]
    assert data["kilo-auto/frontier"]["pricing"]["prompt"] == "0.000005"
    assert data["kilo-auto/free"]["isFree"] is True
    assert data["minimax/minimax-m2.5:free"]["isFree"] is True
    assert data["openrouter/free"]["isFree"] is True
    assert data["openai/gpt-5.4"]["isFree"] is False


async def test_config_adds_and_overrides_models(gateway, upstream):
    client = await gateway(models=[
        {"id": "local/llama", "name": "Local Llama", "context_length": 8192,
         "pricing": {"prompt": "0", "completion": "0"}, "routes": {"openrouter": "meta/llama"}},
        {"id": "openai/gpt-5.4", "name": "GPT-5.4 (ours)"},
    ])
    data = {e["id"]: e for e in (await (await client.get("/v1/models")).json())["data"]}
    assert data["local/llama"]["name"] == "Local Llama"
    assert data["openai/gpt-5.4"]["name"] == "GPT-5.4 (ours)"
    assert data["openai/gpt-5.4"]["pricing"]["prompt"] == "0.0000025"  # untouched fields kept
    resp = await client.post("/v1/chat/completions", json={"model": "local/llama", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 200
    await resp.read()
    assert upstream.seen[0].body["model"] == "meta/llama"


async def test_sync_merges_the_upstream_list(gateway, upstream):
    upstream.models = [
        {"id": "mistralai/mistral-small", "name": "Mistral Small", "context_length": 32768,
         "pricing": {"prompt": "0.0000001", "completion": "0.0000003"}},
        {"id": "openai/gpt-5.4", "name": "Upstream's own name", "context_length": 1},
        {"id": "broken/entry", "name": "no context length"},
    ]
    client = await gateway(catalog={"sync": True})
    data = {e["id"]: e for e in (await (await client.get("/v1/models")).json())["data"]}
    assert data["mistralai/mistral-small"]["name"] == "Mistral Small"
    assert data["openai/gpt-5.4"]["name"] == "OpenAI: GPT-5.4"  # curated entries win
    assert "broken/entry" not in data
    resp = await client.post("/v1/chat/completions", json={"model": "mistralai/mistral-small", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 200
    await resp.read()
    assert upstream.seen[0].body["model"] == "mistralai/mistral-small"


def test_body_is_serialised_once_per_change():
    catalog = Catalog(seed_rows())
    body = catalog.body
    assert catalog.body is body
    catalog.update([{"id": "x/y", "name": "X", "context_length": 1}])
    assert catalog.body is not body and b'"x/y"' in catalog.body


async def test_models_advertise_only_dialects_the_gateway_serves(gateway):
    """The Kilo CLI speaks to a model in the dialect `opencode.ai_sdk_provider` names: Messages for
    Claude, Responses for OpenAI's models (both served for every model), never one it lacks."""
    client = await gateway(models=[{"id": "google/gemini-2.5-flash", "opencode": {"ai_sdk_provider": "google", "family": "gemini"}}])
    entries = {e["id"]: e for e in (await (await client.get("/api/openrouter/models")).json())["data"]}
    assert entries["kilo-auto/frontier"]["opencode"]["ai_sdk_provider"] == "anthropic"
    assert entries["anthropic/claude-sonnet-4.6"]["opencode"]["ai_sdk_provider"] == "anthropic"
    assert entries["openai/gpt-5.4"]["opencode"]["ai_sdk_provider"] == "openai"
    assert entries["google/gemini-2.5-flash"]["opencode"] == {"family": "gemini"}
    served = {"anthropic": "/api/openrouter/messages", "openai": "/api/openrouter/responses"}
    for entry in entries.values():
        dialect = entry.get("opencode", {}).get("ai_sdk_provider")
        assert dialect is None or dialect in served
    for path in served.values():  # each route exists (a bad body, not a 404)
        assert (await client.post(path, data=b"{}")).status == 400
