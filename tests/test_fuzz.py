"""Property-based: malformed and hostile requests never get a 5xx, a traceback or an error outside
the error shape, and the gateway serves a normal request afterwards. Over 5,000 generated requests.

The gateway and a fake upstream run in a thread of their own; Hypothesis drives them with a plain
HTTP client, as an outside client would.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from typing import Any, Iterator

import pytest
import structlog
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import LogCapture

from proxy.app import create_app
from proxy.protocol import Runner
from tests.conftest import make_config
from tests.fakes import Upstream

FIELDS = ["model", "messages", "stream", "stream_options", "tools", "tool_choice", "max_tokens", "temperature",
          "reasoning", "models", "response_format", "stop", "user", "n", "usage", "provider"]
MODELS = ["openai/gpt-5.4", "minimax/minimax-m2.5:free", "kilo-auto/free", "kilo-auto/small", "kilo-auto/frontier",
          "anthropic/claude-sonnet-4.6", "google/gemini-2.5-flash", "nope/nothing", ""]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: Any) -> Iterator[tuple[int, LogCapture]]:
    capture = LogCapture()
    structlog.configure(processors=[capture])
    port, up_port = _port(), _port()
    db = str(tmp_path_factory.mktemp("fuzz") / "keys.db")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runners: list[web.AppRunner] = []

    async def start() -> None:
        fake = Upstream()
        env = {"OPENROUTER_API_KEY": "sk-or-fuzz", "OPENROUTER_BASE_URL": f"http://127.0.0.1:{up_port}",
               "ANTHROPIC_API_KEY": "sk-ant-fuzz", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{up_port}",
               "GEMINI_API_KEY": "gm-fuzz", "GEMINI_BASE_URL": f"http://127.0.0.1:{up_port}"}
        cfg = make_config(keys={"db": db}, server={"max_body_bytes": 256 * 1024},
                          pipeline=[{"use": "auth"}, {"use": "automodel"}, {"use": "freegate"},
                                    {"use": "ratelimit", "limit": "1000000/hour", "daily_limit": ""}])
        for app, p, make in ((fake.app(), up_port, web.AppRunner), (create_app(cfg, env), port, Runner)):
            runner = make(app, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", p).start()
            runners.append(runner)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield port, capture
    for runner in reversed(runners):
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()  # else the collector finds it later, unclosed, and says so in another test
    structlog.reset_defaults()


def send(port: int, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


def check(status: int, body: bytes, content_type: str) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, body[:300])
        doc = json.loads(body)
        assert isinstance(doc["error"]["message"], str) and doc["error_type"]


def healthy(port: int, capture: LogCapture) -> None:
    ok = json.dumps({"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert send(port, "POST", "/v1/chat/completions", ok, {"Content-Type": "application/json"})[0] == 200
    bad = [e for e in capture.entries if e.get("log_level") in ("error", "critical") or e["event"] == "unhandled_error"]
    assert not bad, bad[:3]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "x"])},
                                          optional={"content": json_values, "tool_calls": json_values,
                                                    "tool_call_id": json_values, "reasoning_details": json_values}),
                    max_size=4)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS) | json_values},
    optional={"messages": messages | json_values, **{f: json_values for f in FIELDS[2:]}},
)
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=bodies, stream=st.booleans(), auth=st.sampled_from(["", "Bearer anonymous", "Bearer tsk_nope", "Basic x", "Bearer "]))
def test_structured_garbage(served, body, stream, auth):
    port, capture = served
    if stream and isinstance(body, dict):
        body["stream"] = True
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    check(*send(port, "POST", "/api/gateway/chat/completions", json.dumps(body).encode(), headers))


blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
                              "mid_conv_system", "server_tool_use", "x"]) | json_values},
    optional={"text": json_values, "source": json_values, "id": json_values, "name": json_values, "input": json_values,
              "tool_use_id": json_values, "content": json_values, "is_error": json_values, "thinking": json_values,
              "signature": json_values, "data": json_values, "cache_control": json_values})
anthropic_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | json_values},
    optional={"content": st.text(max_size=30) | st.lists(blocks, max_size=4) | json_values}), max_size=4)
messages_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["claude-sonnet-4-6", "claude-sonnet-4-6-20250929", "kilo-auto/frontier",
                               "minimax/minimax-m2.5:free", "gpt-5.4", "claude-opus-9-9", ""]) | json_values},
    optional={"messages": anthropic_messages | json_values, "max_tokens": st.integers(-5, 100_000) | json_values,
              **{f: json_values for f in ("system", "tools", "tool_choice", "thinking", "output_config", "metadata",
                                          "stop_sequences", "temperature", "stream")}},
)


def check_anthropic(status: int, body: bytes, content_type: str) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, body[:300])
        doc = json.loads(body)
        assert doc["type"] == "error" and isinstance(doc["error"]["message"], str) and doc["error"]["type"]


@FUZZ
@given(body=messages_bodies, stream=st.booleans(),
       auth=st.sampled_from([{}, {"x-api-key": "anonymous"}, {"x-api-key": "tsk_nope"}, {"Authorization": "Bearer anonymous"}]))
def test_anthropic_messages_garbage(served, body, stream, auth):
    """The Messages route, as Anthropic's clients reach it: never a 5xx, errors in Anthropic's shape."""
    port, _ = served
    if stream and isinstance(body, dict):
        body["stream"] = True
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01", **auth}
    check_anthropic(*send(port, "POST", "/api/openrouter/v1/messages?beta=true", json.dumps(body).encode(), headers))
    if isinstance(body, dict):
        body.pop("stream", None)
        check_anthropic(*send(port, "POST", "/v1/messages/count_tokens", json.dumps(body).encode(), headers))


items = st.fixed_dictionaries(
    {},
    optional={"type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "item_reference",
                                       "web_search_call", "x"]) | json_values,
              "role": st.sampled_from(["user", "assistant", "system", "developer", "x"]) | json_values,
              "content": st.text(max_size=30) | st.lists(st.fixed_dictionaries(
                  {"type": st.sampled_from(["input_text", "output_text", "input_image", "input_file", "refusal", "x"])},
                  optional={"text": json_values, "image_url": json_values, "file_data": json_values, "detail": json_values}),
                  max_size=3) | json_values,
              "call_id": json_values, "name": json_values, "arguments": json_values, "output": json_values,
              "namespace": json_values, "summary": json_values,
              "encrypted_content": st.sampled_from(["turnstile:", "turnstile:e30=", "turnstile:W3t9XQ==", "gAAA"]) | json_values})
responses_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-5.4", "openai/gpt-5.4", "claude-sonnet-4-6", "kilo-auto/frontier", "kilo-auto/balanced",
                               "minimax/minimax-m2.5:free", "google/gemini-2.5-flash", "gpt-9", ""]) | json_values},
    optional={"input": st.text(max_size=30) | st.lists(items, max_size=4) | json_values,
              **{f: json_values for f in ("instructions", "tools", "tool_choice", "reasoning", "text", "max_output_tokens",
                                          "store", "previous_response_id", "temperature", "parallel_tool_calls",
                                          "include", "stream", "metadata", "background")}},
)


@FUZZ
@given(body=responses_bodies, stream=st.booleans(), auth=st.sampled_from(["", "Bearer anonymous", "Bearer tsk_nope"]),
       base=st.sampled_from(["/v1", "/api/gateway", "/api/openrouter"]))
def test_responses_garbage(served, body, stream, auth, base):
    """The Responses route, as the OpenAI SDKs and Codex reach it: never a 5xx, errors in the OpenAI shape."""
    port, _ = served
    if stream and isinstance(body, dict):
        body["stream"] = True
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    status, answer, content_type = send(port, "POST", base + "/responses", json.dumps(body).encode(), headers)
    assert status < 500, (status, answer[:300])
    if status >= 400:
        assert content_type.startswith("application/json"), (status, answer[:300])
        assert isinstance(json.loads(answer)["error"]["message"], str)


@FUZZ
@given(raw=st.binary(max_size=2000) | st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes(served, raw):
    port, _ = served
    check(*send(port, "POST", "/v1/chat/completions", raw, {"Content-Type": "application/json"}))


@FUZZ
@given(depth=st.integers(1, 3000), cut=st.integers(0, 60), big=st.integers(0, 400_000))
def test_deep_truncated_and_huge(served, depth, cut, big):
    port, _ = served
    nested = (b"[" * depth + b"]" * depth)
    body = b'{"model": "openai/gpt-5.4", "messages": ' + nested + b"}"
    check(*send(port, "POST", "/v1/chat/completions", body[: max(len(body) - cut, 0)], {}))
    for path, field in (("/v1/responses", b"input"), ("/v1/messages", b"messages")):
        deep = b'{"model": "gpt-5.4", "max_tokens": 5, "' + field + b'": [{"role": "user", "content": ' + nested + b"}]}"
        status, answer, _ = send(port, "POST", path, deep[: max(len(deep) - cut, 0)], {})
        assert status < 500 and b"error" in answer, (status, answer[:300])
    huge = json.dumps({"model": "minimax/minimax-m2.5:free", "messages": [{"role": "user", "content": "x" * big}]}).encode()
    check(*send(port, "POST", "/v1/chat/completions", huge, {}))


header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"]),
       path=st.sampled_from(["/v1/chat/completions", "/v1/models", "/api/gateway/key", "/v1/generation", "/healthz",
                             "/", "/v1", "/api/openrouter/chat/completions/../models"])
       | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(lambda p: "/" + p),
       headers=st.dictionaries(st.sampled_from(["Authorization", "X-Forwarded-For", "x-kilocode-mode", "x-kilocode-taskid",
                                                "Content-Type", "X-Whatever"]), header_values, max_size=4))
def test_odd_methods_paths_and_headers(served, method, path, headers):
    port, _ = served
    body = json.dumps({"model": "kilo-auto/free", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, raw, ctype = send(port, method, path, body if method not in ("GET", "HEAD") else b"", headers)
    assert status < 500
    if method == "BREW":
        assert status == 400  # refused by the HTTP parser itself, still in the error shape
    if status >= 400 and method != "HEAD":
        check(status, raw, ctype)


@FUZZ
@given(raw=st.binary(min_size=1, max_size=300))
def test_bytes_that_are_not_http(served, raw):
    """Whatever arrives on the socket: an answer in the error shape, or a closed connection."""
    port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw + b"\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    if not reply:
        return
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:200]
    check(status, body, "application/json" if b"application/json" in head else "")


def test_still_serving_and_no_traceback(served):
    port, capture = served
    healthy(port, capture)
