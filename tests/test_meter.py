"""Metering on plain bytes: usage found without parsing every event, priced exactly, patched in."""

from __future__ import annotations

import json
from decimal import Decimal

import orjson
import pytest

from proxy.meter import HOLD, Bounds, Meter, Prices, Usage
from tests.fakes import completion, fixture_bytes, stream_events

SONNET = Prices.from_pricing({"prompt": "0.000003", "completion": "0.000015", "input_cache_read": "0.0000003",
                              "input_cache_write": "0.00000375"}, free=False)


def micros(usd: Decimal) -> int:
    return int((usd * 1_000_000).quantize(Decimal(1), rounding="ROUND_HALF_UP"))


def test_cost_by_hand():
    u = Usage(prompt=1000, completion=200, cached=300, cache_write=100)
    # 600 uncached prompt + 200 completion + 300 cache reads + 100 cache writes
    by_hand = (600 * Decimal("0.000003") + 200 * Decimal("0.000015") + 300 * Decimal("0.0000003")
               + 100 * Decimal("0.00000375"))
    assert SONNET.cost_micros(u) == micros(by_hand) == 5265


def test_free_models_cost_nothing():
    prices = Prices.from_pricing({"prompt": "0.000003", "completion": "0.000015"}, free=True)
    assert prices.cost_micros(Usage(prompt=10**6, completion=10**6)) == 0


def test_tiny_prices_stay_exact():
    prices = Prices.from_pricing({"prompt": "0.00000008333333333333334", "completion": "0"}, free=False)
    assert prices.cost_micros(Usage(prompt=12_000_000)) == 1_000_000


def feed_all(meter: Meter, chunks: list[bytes]) -> bytes:
    return b"".join(meter.feed(c) for c in chunks) + meter.finish()


def test_stream_usage_event_is_patched_even_when_split_across_chunks():
    usage = {"prompt_tokens": 62, "completion_tokens": 112, "total_tokens": 174,
             "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 35}}
    body = b"".join(stream_events("anthropic/claude-sonnet-4.6", usage))
    for size in (1, 7, 64, len(body)):
        meter = Meter(SONNET, stream=True)
        out = feed_all(meter, [body[i:i + size] for i in range(0, len(body), size)])
        assert meter.usage == Usage(prompt=62, completion=112, reasoning=35)
        assert meter.cost_micros == micros(62 * Decimal("0.000003") + 112 * Decimal("0.000015"))
        assert meter.finish_reason == "stop"
        events = [json.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
        assert events[-1]["usage"]["cost"] == meter.cost_micros / 1e6
        assert out.endswith(b"data: [DONE]\n\n")


def test_openrouter_recording_and_deepseek_fixture():
    meter = Meter(SONNET, stream=True)
    feed_all(meter, [fixture_bytes("openrouter-chat-stream-reasoning-usage.derived.sse")])
    assert meter.usage == Usage(prompt=62, completion=112, reasoning=35)
    lines = fixture_bytes("deepseek-chat-stream-reasoning-tool-call.jsonl").splitlines()
    meter = Meter(SONNET, stream=True)
    feed_all(meter, [b"data: " + line + b"\n\n" for line in lines])
    assert meter.usage == Usage(prompt=339, completion=83, reasoning=39, cached=320)
    assert meter.finish_reason == "tool_calls"


def test_json_body_is_relayed_except_its_tail():
    doc = completion("openai/gpt-5.4", {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    doc["choices"][0]["message"]["content"] = "x" * (3 * HOLD)
    body = json.dumps(doc).encode()
    meter = Meter(SONNET, stream=False)
    early = meter.feed(body[: 2 * HOLD])
    assert len(early) == HOLD  # written at once, the last 16 KiB held back
    out = early + meter.feed(body[2 * HOLD:]) + meter.finish()
    patched = json.loads(out)
    assert patched["usage"]["cost"] == meter.cost_micros / 1e6 == micros(10 * Decimal("0.000003") + 5 * Decimal("0.000015")) / 1e6
    assert patched["choices"] == doc["choices"]


def test_whitespace_prefixed_openrouter_body():
    meter = Meter(SONNET, stream=False)
    out = feed_all(meter, [fixture_bytes("openrouter-chat-response-nonstream-whitespace-prefix.json")])
    assert json.loads(out)["usage"]["cost"] == meter.cost_micros / 1e6
    assert meter.usage == Usage(prompt=555, completion=431)


def test_no_usage_means_estimate():
    meter = Meter(SONNET, stream=True)
    feed_all(meter, stream_events("m", None, words=10)[:8])
    assert meter.usage is None
    meter.estimate(request_bytes=400, bytes_out=2000)
    assert meter.usage.estimated and meter.usage.prompt == 100 and meter.usage.completion > 0
    assert meter.cost_micros > 0


def test_spaced_and_compact_json_both_found_the_last_one_wins():
    """Upstreams that put a space after the colon are metered too; in one read, the last usage object and
    the last finish reason count, whichever form each is in."""
    compact = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    spaced = (b'data: {"choices": [{"delta": {}, "finish_reason": "length"}], '
              b'"usage": {"prompt_tokens": 10, "completion_tokens": 20}}\n\n')
    for body, usage, reason in ((compact + spaced, Usage(prompt=10, completion=20), "length"),
                                (spaced + compact, Usage(prompt=1, completion=1), "stop"),
                                (spaced, Usage(prompt=10, completion=20), "length")):
        meter = Meter(SONNET, stream=True)
        out = feed_all(meter, [body])
        assert (meter.usage, meter.finish_reason) == (usage, reason)
        last = json.loads(out.split(b"\n\n")[-2][6:])
        assert last["usage"]["cost"] == meter.cost_micros / 1e6


def test_usage_found_wherever_it_sits_in_its_object():
    """Last in its object (OpenAI, OpenRouter), first, in the middle, with a nested object after it,
    or holding what orjson refuses: each body is patched in place, every other byte left as it was."""
    usage = '"usage":{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}'
    bodies = [
        '{"id":"a","choices":[{"finish_reason":"stop"}],' + usage + '}',
        '{' + usage + ',"id":"a","choices":[{"finish_reason":"stop"}]}',
        '{"id":"a",' + usage + ',"choices":[{"finish_reason":"stop"}],"x":{"y":{}}}',
        '{"id":"a",' + usage + ',"extra":{"big":123456789012345678901234567890}}',
        '{"id":"a","usage":{"prompt_tokens":10,"completion_tokens":5,"big":123456789012345678901234567890}}\n',
        '{"id":"a","usage":{"prompt_tokens":10,"completion_tokens":5,"note":"\\ud800","big":123456789012345678901234567890}}',
    ]
    for body in bodies:
        meter = Meter(SONNET, stream=False)
        out = meter.whole(body.encode())
        assert meter.usage == Usage(prompt=10, completion=5)
        patched = json.loads(out)
        assert patched["usage"]["cost"] == meter.cost_micros / 1e6 > 0
        del patched["usage"]["cost"]
        assert patched == json.loads(body)
        assert out.replace(b',"cost":' + orjson.dumps(meter.cost_micros / 1e6), b"") == body.encode()
    # What no encoder writes back as JSON is left as it came: the cost is not written in, but billed.
    body = b'{"usage":{"prompt_tokens":10,"completion_tokens":5,"x":NaN,"big":123456789012345678901234567890}}'
    meter = Meter(SONNET, stream=False)
    assert meter.whole(body) == body and meter.usage == Usage(prompt=10, completion=5) and meter.cost_micros > 0


SMALL = Bounds.of({"context_length": 200_000, "top_provider": {"max_completion_tokens": 64_000}})


@pytest.mark.parametrize("count", [-5, 1.5, "12", None, 2**63, 10**30, 10**12, 250_001 + 200_000 // 4, True])
def test_a_count_that_cannot_be_believed_is_not_priced(count):
    """Before: each of these gave a cost of 0, silently, and 10^12 was believed ($17.5M for a
    Sonnet answer). Now the usage is doubted; the forwarder bills the request by estimate."""
    for usage in ({"prompt_tokens": count, "completion_tokens": 5}, {"prompt_tokens": 5, "completion_tokens": count}):
        meter = Meter(SONNET, stream=False, bounds=SMALL)
        body = json.dumps({"id": "a", "usage": usage}).encode()
        assert meter.whole(body) == body  # relayed as sent, without a cost
        assert meter.usage is None and meter.cost_micros == 0 and meter.doubted == usage


def test_parts_larger_than_their_whole_are_not_believed():
    for usage in ({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 11}},
                  {"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 6}},
                  {"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": -1}},
                  {"prompt_tokens": 10, "completion_tokens": 70_000 + 64_000 // 4 + 1}):
        assert Usage.parse(usage, SMALL) is None, usage
    # Within the model's limits (with a quarter more for tokenizers), null details count as 0.
    assert Usage.parse({"prompt_tokens": 250_000, "completion_tokens": 80_000, "prompt_tokens_details": None,
                        "completion_tokens_details": {"reasoning_tokens": None}}, SMALL) == Usage(250_000, 80_000)
    # A model whose entry gives no limits still has one.
    assert Bounds.of({}) == Bounds(12_500_000, 12_500_000)
