"""Every row of the hosted gateway's error table that we keep (kilo-gateway.md Part 2 §6), through
the default pipeline: status, error.code, error_type and message, in the superset shape."""

from __future__ import annotations

import json

FREE = "minimax/minimax-m2.5:free"
PAID = "anthropic/claude-sonnet-4.6"


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def check(resp, status: int, error_type: str, code: str | None = None, message: str | None = None) -> dict:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error_type"] == error_type
    assert body["error"]["code"] == (code or error_type)
    assert body["error"]["message"] == body["message"]
    if message is not None:
        assert body["message"] == message
    return body


async def test_malformed_json(kilo):
    client = await kilo()
    resp = await client.post("/api/openrouter/chat/completions", data=b'{"model": ')
    body = await check(resp, 400, "invalid_request", code="invalid_json")
    assert body["message"].startswith("Request body is not valid JSON: ")


async def test_invalid_request(kilo):
    client = await kilo()
    resp = await client.post("/api/openrouter/chat/completions", json={"model": FREE, "messages": {"role": "user"}})
    await check(resp, 400, "invalid_request", message="Invalid request: `messages` must be a non-empty array.")


async def test_model_not_found(kilo):
    client = await kilo()
    resp = await client.post("/api/openrouter/chat/completions", json=chat("nobody/nothing"))
    await check(resp, 404, "model_not_found", message="The requested model could not be found: 'nobody/nothing'.")
    resp = await client.post("/api/openrouter/chat/completions", json=chat(""))
    await check(resp, 404, "model_not_found", message="The requested model could not be found.")


async def test_free_model_limit(kilo):
    client = await kilo(pipeline=[{"use": "ratelimit", "limit": "2/hour"}])
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=chat(FREE))).status == 200
    resp = await client.post("/v1/chat/completions", json=chat(FREE))
    await check(resp, 429, "rate_limit_exceeded",
                message="Free model usage limit reached. Please try again later or upgrade to a paid model.")
    assert "Retry-After" not in resp.headers  # the Kilo CLI would sleep for all of it
    assert resp.headers["X-RateLimit-Remaining"] == "0"


async def test_paid_model_without_auth(kilo):
    client = await kilo()
    for headers in ({}, {"Authorization": "Bearer anonymous"}, {"Authorization": "Bearer "}):
        resp = await client.post("/v1/chat/completions", json=chat(PAID), headers=headers)
        await check(resp, 401, "paid_model_auth_required", code="PAID_MODEL_AUTH_REQUIRED",
                    message="You need to sign in to use this model.")


async def test_promotion_cap(kilo):
    client = await kilo(pipeline=[{"use": "ratelimit", "limit": "100/hour", "daily_limit": "3/day"}])
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=chat(FREE))).status == 200
    resp = await client.post("/v1/chat/completions", json=chat(FREE))
    body = await check(resp, 401, "promotion_limit_reached", code="PROMOTION_MODEL_LIMIT_REACHED")
    assert body["message"].startswith("Sign up for free to continue")


async def test_no_balance(kilo, account):
    key = account("broke", balance="0")
    client = await kilo()
    resp = await client.post("/v1/chat/completions", json=chat(PAID), headers={"Authorization": f"Bearer {key}"})
    body = await check(resp, 402, "usage_limit_exceeded")
    assert body["error"]["title"] == "Paid Model - Credits Required"
    assert body["error"]["balance"] == 0
    # free models stay open to the same account
    resp = await client.post("/v1/chat/completions", json=chat(FREE), headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200


async def test_no_free_model_available(kilo, account):
    client = await kilo(pipeline=[
        {"use": "automodel", "tiers": {"kilo-auto/free": {"weights": {FREE: 0}}}},
    ])
    resp = await client.post("/v1/chat/completions", json=chat("kilo-auto/free"))
    await check(resp, 503, "no_free_models_available",
                message="No free models are currently available for kilo-auto/free. Please try again later, "
                        "or switch to kilo-auto/balanced for affordable paid inference.")


async def test_invalid_api_key(kilo, account):
    account()
    client = await kilo()
    for header in ("Bearer tsk_not-a-real-key", "Basic dXNlcjpwYXNz"):
        resp = await client.post("/v1/chat/completions", json=chat(FREE), headers={"Authorization": header})
        body = await check(resp, 401, "invalid_api_key", message="Invalid API key.")
        assert "not-a-real-key" not in json.dumps(body)
