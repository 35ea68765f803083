"""kilo-auto/* tiers: the model that reaches the upstream, the injected reasoning and verbosity,
the sticky weighted split, and the balance rule of kilo-auto/small."""

from __future__ import annotations

import pytest

from proxy.app import create_app
from proxy.config import ConfigError
from tests.conftest import make_config

OPUS, SONNET = "anthropic/claude-opus-4.7", "anthropic/claude-sonnet-4.6"
OPUS_MODES = ["claw", "plan", "general", "architect", "orchestrator", "ask", "debug"]
SONNET_MODES = ["build", "explore", "code"]
CLIENT_REASONING = {"effort": "xhigh"}


def chat(model: str, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "reasoning": CLIENT_REASONING,
            "verbosity": "low", **extra}


async def send(client, upstream, model: str, headers: dict[str, str] | None = None):
    resp = await client.post("/v1/chat/completions", json=chat(model), headers=headers or {})
    await resp.read()
    return resp, (upstream.seen[-1].body if upstream.seen else None)


@pytest.mark.parametrize("mode, expected", [
    *[(m, OPUS) for m in OPUS_MODES],
    *[(m, SONNET) for m in SONNET_MODES],
    ("  PLAN ", OPUS),  # trimmed, lower-cased
    ("unknown-mode", SONNET),
    (None, SONNET),
])
async def test_frontier_by_mode(kilo, upstream, account, mode, expected):
    key = account()
    client = await kilo()
    headers = {"Authorization": f"Bearer {key}"}
    if mode is not None:
        headers["x-kilocode-mode"] = mode
    resp, body = await send(client, upstream, "kilo-auto/frontier", headers)
    assert resp.status == 200
    assert body["model"] == expected
    assert body["reasoning"] == {"enabled": True, "effort": "medium"}  # replaces the client's
    assert body["verbosity"] == "medium"


async def test_claw_feature_sets_claw_mode(kilo, upstream, account):
    key = account()
    client = await kilo()
    _, body = await send(client, upstream, "kilo-auto/frontier",
                         {"Authorization": f"Bearer {key}", "x-kilocode-feature": "kiloclaw", "x-kilocode-mode": "code"})
    assert body["model"] == OPUS


@pytest.mark.parametrize("mode", [*OPUS_MODES, *SONNET_MODES, "unknown", None])
async def test_balanced_every_mode(kilo, upstream, account, mode):
    key = account()
    client = await kilo()
    headers = {"Authorization": f"Bearer {key}"}
    if mode:
        headers["x-kilocode-mode"] = mode
    resp, body = await send(client, upstream, "kilo-auto/balanced", headers)
    assert resp.status == 200
    assert body["model"] == "openai/gpt-5.3-codex"
    assert body["reasoning"] == {"enabled": True, "effort": "low"}
    assert body["verbosity"] == "low"  # balanced injects no verbosity: the client's stays


@pytest.mark.parametrize("mode", ["code", "plan", "unknown", None])
async def test_free_and_small_ignore_mode_and_inject_nothing(kilo, upstream, mode):
    client = await kilo()
    headers = {"x-kilocode-mode": mode} if mode else {}
    for tier, allowed in (("kilo-auto/free", {"minimax/minimax-m2.5:free", "stepfun/step-3.5-flash"}),
                          ("kilo-auto/small", {"google/gemma-4-26b-a4b-it:free"})):
        resp, body = await send(client, upstream, tier, headers)
        assert resp.status == 200
        assert body["model"] in allowed
        assert body["reasoning"] == CLIENT_REASONING and body["verbosity"] == "low"


async def test_free_split_is_weighted_and_sticky(kilo, upstream, account):
    key = account()
    client = await kilo()
    auth = {"Authorization": f"Bearer {key}"}
    picks = []
    for i in range(1000):
        _, body = await send(client, upstream, "kilo-auto/free", {**auth, "x-kilocode-taskid": f"ses_{i:05d}"})
        picks.append(body["model"])
    minimax = picks.count("minimax/minimax-m2.5:free") / 1000
    stepfun = picks.count("stepfun/step-3.5-flash") / 1000  # the upstream name of stepfun/step-3.5-flash:free
    assert 0.75 <= minimax <= 0.85 and 0.15 <= stepfun <= 0.25 and minimax + stepfun == 1
    again = set()
    for _ in range(20):
        _, body = await send(client, upstream, "kilo-auto/free", {**auth, "x-kilocode-taskid": "ses_00042"})
        again.add(body["model"])
    assert again == {picks[42]}


async def test_free_counts_against_the_anonymous_limit(kilo, upstream):
    client = await kilo()
    resp, _ = await send(client, upstream, "kilo-auto/free")
    assert resp.status == 200 and resp.headers["X-RateLimit-Remaining"] == "199"


async def test_small_follows_the_balance(kilo, upstream, account):
    rich, broke = account("rich", "5"), account("broke", "0")
    client = await kilo()
    _, body = await send(client, upstream, "kilo-auto/small", {"Authorization": f"Bearer {rich}"})
    assert body["model"] == "google/gemma-4-31b-it"
    _, body = await send(client, upstream, "kilo-auto/small", {"Authorization": f"Bearer {broke}"})
    assert body["model"] == "google/gemma-4-26b-a4b-it:free"
    resp, body = await send(client, upstream, "kilo-auto/small")
    assert resp.status == 200 and body["model"] == "google/gemma-4-26b-a4b-it:free"


async def test_anonymous_frontier_is_401_and_broke_frontier_is_402(kilo, upstream, account):
    broke = account("broke", "0")
    client = await kilo()
    resp, _ = await send(client, upstream, "kilo-auto/frontier")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "PAID_MODEL_AUTH_REQUIRED"
    resp, _ = await send(client, upstream, "kilo-auto/frontier", {"Authorization": f"Bearer {broke}"})
    assert resp.status == 402
    assert upstream.seen == []


async def test_operator_adds_a_tier_in_config(kilo, upstream):
    client = await kilo(pipeline=[{"use": "automodel", "tiers": {
        "acme/auto-cheap": {"name": "Acme Cheap", "weights": {"openrouter/free": 1}},
    }}])
    models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert models["acme/auto-cheap"]["name"] == "Acme Cheap"
    resp, body = await send(client, upstream, "acme/auto-cheap")
    assert resp.status == 200 and body["model"] == "openrouter/free"


@pytest.mark.parametrize("tiers, message", [
    ({"kilo-auto/free": {"weights": {"no/such-model": 1}}}, "not in the catalog"),
    ({"x/y": {"default": "openai/gpt-5.4", "weights": {"openai/gpt-5.4": 1}}}, "exactly one"),
    ({"x/y": {"defualt": "openai/gpt-5.4"}}, "unknown key 'defualt'"),
])
def test_bad_tiers_fail_at_start_up(tiers, message):
    cfg = make_config(pipeline=[{"use": "automodel", "tiers": tiers}])
    with pytest.raises(ConfigError, match=message):
        create_app(cfg, {})
