"""`/metrics` after traffic: counters and histograms move, with bounded labels; optional bearer token."""

from __future__ import annotations

import re

FREE = {"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}]}


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_after_traffic(kilo, upstream, account):
    upstream.mode, upstream.usage = "usage", {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    key = account("m", "5")
    client = await kilo(pipeline=[{"use": "auth"}, {"use": "automodel"}, {"use": "freegate"},
                                  {"use": "ratelimit", "limit": "2/hour"}], upstream={"retries": 1, "backoff": 0.01})
    for _ in range(3):
        await (await client.post("/v1/chat/completions", json=FREE, headers={"X-Forwarded-For": "198.51.100.4"})).read()
    await (await client.post("/v1/chat/completions", json={**FREE, "stream": True})).read()
    upstream.faults = [503]  # then a retry that succeeds
    await (await client.post("/v1/chat/completions", json={**FREE, "model": "openai/gpt-5.4"},
                             headers={"Authorization": f"Bearer {key}"})).read()
    await client.get("/nope/at/all")
    text = await (await client.get("/metrics")).text()
    model = "minimax/minimax-m2.5:free"
    assert value(text, "turnstile_requests_total", route="chat", model=model, provider="openrouter", status="200") == 3
    assert value(text, "turnstile_rejections_total", error_type="rate_limit_exceeded") == 1
    assert value(text, "turnstile_requests_total", route="chat", status="429") == 1
    assert value(text, "turnstile_requests_total", route="unknown", status="404") == 1
    assert value(text, "turnstile_tokens_total", model=model, direction="in") == 21
    assert value(text, "turnstile_tokens_total", model=model, direction="out") == 9
    assert value(text, "turnstile_requests_total", route="chat", model="openai/gpt-5.4", status="200") == 1
    assert value(text, "turnstile_upstream_retries_total", provider="openrouter") == 1
    assert value(text, "turnstile_time_to_first_byte_seconds_count", route="chat") == 4
    assert value(text, "turnstile_request_duration_seconds_count", route="chat") >= 5
    assert value(text, "turnstile_streams_in_flight") == 0
    assert "198.51.100.4" not in text and "nope" not in text


async def test_retries_and_upstream_errors_are_counted(gateway, upstream):
    upstream.faults = [503, 503]
    client = await gateway(upstream={"retries": 1, "backoff": 0.01})
    await (await client.post("/v1/chat/completions", json=FREE)).read()
    text = await (await client.get("/metrics")).text()
    assert value(text, "turnstile_upstream_retries_total", provider="openrouter") == 1
    assert value(text, "turnstile_upstream_errors_total", provider="openrouter", status="503") == 1


async def test_metrics_token(gateway):
    client = await gateway(env={"METRICS_TOKEN": "scrape-me-please"}, metrics={"token_env": "METRICS_TOKEN"})
    assert (await client.get("/metrics")).status == 401
    resp = await client.get("/metrics", headers={"Authorization": "Bearer scrape-me-please"})
    assert resp.status == 200 and "turnstile_requests_total" in await resp.text()


def test_histograms_and_counters_match_prometheus_semantics():
    from prometheus_client import generate_latest

    from proxy.metrics import Metrics

    from proxy.outcome import Outcome

    metrics = Metrics()
    for seconds in (0.005, 0.3, 400.0):
        metrics.observe(Outcome("chat", "r", 0.0, status=200), seconds, None)
    metrics.streams_in_flight = 2
    metrics.sync()
    metrics.observe(Outcome("chat", "r", 0.0, status=200), 0.001, None)  # counted at the next sync, not lost
    text = generate_latest(metrics.registry).decode()
    duration = "turnstile_request_duration_seconds_bucket"
    assert value(text, duration, route="chat", le="0.005") == 1  # le: a bound is inclusive
    assert value(text, duration, route="chat", le="0.25") == 1
    assert value(text, duration, route="chat", le="0.5") == 2
    assert value(text, duration, route="chat", le="300.0") == 2
    assert value(text, duration, route="chat", le="+Inf") == 3
    assert value(text, "turnstile_request_duration_seconds_sum", route="chat") == 400.305
    assert value(text, "turnstile_requests_total", route="chat", status="200") == 3
    assert value(text, "turnstile_streams_in_flight") == 2
    metrics.sync()
    text = generate_latest(metrics.registry).decode()
    assert value(text, "turnstile_requests_total", route="chat", status="200") == 4
    assert value(text, duration, route="chat", le="0.005") == 2
