"""Free gating: free models for everyone, without the extras a provider bills per request."""

from __future__ import annotations


async def test_free_requests_lose_billed_extras(kilo, upstream):
    client = await kilo()
    body = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}],
            "plugins": [{"id": "web"}], "web_search_options": {"search_context_size": "high"}, "temperature": 0.5}
    assert (await client.post("/v1/chat/completions", json=body)).status == 200
    sent = upstream.seen[0].body
    assert "plugins" not in sent and "web_search_options" not in sent and sent["temperature"] == 0.5


async def test_paid_requests_keep_them(kilo, upstream, account):
    key = account("rich", "5")
    client = await kilo()
    body = {"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "hi"}], "plugins": [{"id": "web"}]}
    resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200 and upstream.seen[0].body["plugins"] == [{"id": "web"}]


async def test_402_names_balance_and_title(kilo, account):
    key = account("broke", "0")
    client = await kilo(pipeline=[{"use": "auth"}, {"use": "freegate", "buy_credits_url": "https://example.org/credits"}])
    resp = await client.post("/v1/chat/completions", json={"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": "x"}]},
                             headers={"Authorization": f"Bearer {key}"})
    body = await resp.json()
    assert resp.status == 402
    assert body["error"] | {} == body["error"] and body["error"]["buyCreditsUrl"] == "https://example.org/credits"
    assert body["error"]["balance"] == 0 and body["error"]["title"] == "Paid Model - Credits Required"
