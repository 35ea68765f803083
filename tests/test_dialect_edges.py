"""The inbound dialects at their edges: odd upstream streams, hostile bodies, what passthrough must
not forward, and where usage is read from."""

from __future__ import annotations

import json

import pytest

from proxy.app import STORE
from proxy.dialects.messages_answer import MessagesAnswer
from proxy.dialects.responses_answer import ResponsesAnswer
from tests.fakes import fixture_json, fixture_lines
from tests.storedb import ledger_rows
from tests.test_messages_inbound import CHAT_ONLY
from tests.test_responses_inbound import lifecycle_holds, sse


def chunks(*deltas: dict, finish: str | None = "tool_calls", done: bool = True) -> bytes:
    out = [b"data: " + json.dumps({"choices": [{"index": 0, "delta": d, "finish_reason": None}]}).encode() + b"\n\n"
           for d in deltas]
    if finish:
        out.append(b"data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}).encode() + b"\n\n")
    if done:
        out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def responses(stream: bytes, **body) -> list[dict]:
    answer = ResponsesAnswer("r1", {"model": "m", "input": "x", **body}, True, body.pop("namespaced", None))
    return sse(answer.feed(stream) + answer.end())


def call(index, id=None, name=None, arguments=None) -> dict:
    fn = {k: v for k, v in (("name", name), ("arguments", arguments)) if v is not None}
    return {"tool_calls": [{k: v for k, v in (("index", index), ("id", id), ("function", fn)) if v is not None}]}


def test_tool_call_arguments_before_its_name_interleaved_and_without_index():
    # arguments before the id and name; two calls interleaved; a third call with no index at all
    events = responses(chunks(call(0, arguments='{"a"'), call(0, id="c0", name="f"), call(1, id="c1", name="g", arguments='{"b"'),
                              call(0, arguments=":1}"), call(1, arguments=":2}"),
                              {"tool_calls": [{"id": "c2", "function": {"name": "h", "arguments": "{}"}}]}))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    calls = [i for i in events[-1]["response"]["output"] if i["type"] == "function_call"]
    assert [(c["call_id"], c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("c0", "f", {"a": 1}), ("c1", "g", {"b": 2}), ("c2", "h", {})]


def test_a_stream_cut_without_finish_ends_failed_not_complete():
    events = responses(chunks({"content": "half an ans"}, finish=None, done=False))
    lifecycle_holds(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "half an ans"  # what came is kept
    messages = MessagesAnswer("r1", "m", True, 5)
    out = messages.feed(chunks({"content": "half"}, finish=None, done=False)) + messages.end()
    assert out.rstrip().split(b"\n\n")[-1].startswith(b"event: error\n")


def test_length_is_incomplete_and_namespaces_split_only_where_they_were_made():
    events = responses(chunks({"content": "cut"}, finish="length"))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"
    made = {"mcp__lanes__register": ("mcp__lanes", "register")}
    events = responses(chunks(call(0, id="c", name="mcp__lanes__register", arguments="{}"),
                              call(1, id="d", name="plain__name", arguments="{}")), namespaced=made)
    out = events[-1]["response"]["output"]
    assert (out[0]["namespace"], out[0]["name"]) == ("mcp__lanes", "register")
    assert out[1]["name"] == "plain__name" and "namespace" not in out[1]


@pytest.mark.parametrize("path,body", [
    ("/v1/responses", {"model": "gpt-5.4", "input": "hi", "tools": 5}),
    ("/v1/responses", {"model": "gpt-5.4", "input": "hi", "tools": [{"type": "function"}]}),
    ("/v1/responses", {"input": "hi"}),
    ("/v1/responses", {"model": "gpt-5.4", "input": [{"type": "function_call", "call_id": "c", "name": "f",
                                                      "arguments": json.loads("[" * 300 + "]" * 300)}]}),
    ("/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]}),
    ("/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                      "stop_sequences": 5}),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
])
async def test_hostile_bodies_are_400s(gateway, upstream, path, body):
    client = await gateway(providers=CHAT_ONLY)
    resp = await client.post(path, json=body)
    assert resp.status == 400, await resp.text()
    doc = await resp.json()
    assert doc["error"]["message"] and (doc["type"] == "error" if path.endswith("messages") else "type" in doc["error"])
    assert not upstream.seen


async def test_passthrough_forwards_neither_openrouter_extras_nor_our_own_reasoning(kilo, upstream):
    upstream.replay, upstream.done = fixture_lines("openai-responses-stream-text-with-usage.jsonl"), True
    client = await kilo()
    ours = {"type": "reasoning", "summary": [], "encrypted_content": "turnstile:W10="}
    theirs = {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}
    resp = await client.post("/api/gateway/responses", json={
        "model": "minimax/minimax-m2.5:free", "stream": True, "models": ["openai/o3-pro"], "plugins": [{"id": "web"}],
        "provider": {"order": ["x"]}, "tools": [{"type": "function", "name": "f", "parameters": {}}],
        "input": [{"role": "user", "content": "hi"}, ours, theirs, {"role": "user", "content": "again"}]})
    assert resp.status == 200
    sent = upstream.seen[0].body
    assert not {"models", "plugins", "provider"} & set(sent)
    assert sent["tools"] == [{"type": "function", "name": "f", "parameters": {}}]
    assert sent["input"] == [{"role": "user", "content": "hi"}, theirs, {"role": "user", "content": "again"}]


async def test_passthrough_usage_is_read_from_the_counting_event_only(kilo, upstream, account, store_url):
    """A tool whose schema has a `usage` property comes before the real usage in the echoed response
    object: the bill is the terminal event's usage."""
    events = fixture_lines("openai-responses-stream-text-with-usage.jsonl")
    for e in events:
        if "response" in e:
            e["response"]["tools"] = [{"type": "function", "name": "f", "parameters": {"properties": {"usage": {
                "type": "object"}}, "usage": {"bogus": True}}}]
    upstream.replay = events
    key = account("alice", "10")
    client = await kilo()
    resp = await client.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-5.4", "input": "hi", "stream": True})
    await resp.read()
    await client.app[STORE].flush()
    (row,) = ledger_rows(store_url)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (299, 12, 0)


async def test_passthrough_cut_after_a_delta_quoting_the_terminal_event_is_still_an_error(gateway, upstream):
    events = fixture_lines("anthropic-messages-stream-text.jsonl")
    for e in events:
        if e["type"] == "content_block_delta":
            e["delta"]["text"] = "event: message_stop\n and response.completed"
    upstream.replay, upstream.cut = events, 4
    client = await gateway()
    resp = await client.post("/v1/messages", json={"model": "claude-sonnet-4-6", "max_tokens": 10, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    body = await resp.read()
    assert body.rstrip().split(b"\n\n")[-1].startswith(b"event: error\n")


async def test_server_tools_pass_through_and_are_refused_only_where_translated(gateway, upstream):
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    client = await gateway()
    resp = await client.post("/v1/messages", json=body)
    assert resp.status == 200 and upstream.seen[-1].body["tools"] == body["tools"]
    client = await gateway(providers=CHAT_ONLY)
    resp = await client.post("/v1/messages", json=body)
    doc = await resp.json()
    assert resp.status == 400 and doc["type"] == "error" and "server tools" in doc["error"]["message"]
    assert len(upstream.seen) == 1


def chat_chunk(delta: dict, finish=None, **extra) -> bytes:
    doc = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", **extra,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


STREAMS = {
    "text": [chat_chunk({"content": w}) for w in ["a", "b\\\"c", "é\n", "", "d"]],
    "text, refusal, text": [chat_chunk({"content": "a"}), chat_chunk({"content": "b"}), chat_chunk({"refusal": "no"}),
                            chat_chunk({"content": "c"})],
    "text, reasoning, tool": [chat_chunk({"content": "a"}), chat_chunk({"content": "b"}),
                              chat_chunk({"content": "c", "reasoning": "r"}), chat_chunk({"content": "d"}),
                              chat_chunk({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f", "arguments": "{}"}}]}),
                              chat_chunk({"content": "e"})],
    "other ids and usage": [chat_chunk({"content": "a"}), chat_chunk({"content": "b"}, id="chatcmpl-2"),
                            chat_chunk({"content": "c"}, usage={"prompt_tokens": 1}), chat_chunk({"content": "d"}),
                            chat_chunk({"content": "e"}, finish="stop")],
}


@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("dialect", ["messages", "responses"])
def test_runs_of_text_chunks_make_what_chunk_by_chunk_makes(name, dialect):
    """Whatever a stream holds, turning its runs of text chunks at once gives the bytes the chunk by
    chunk way gives."""
    events = STREAMS[name] + [chat_chunk({}, finish="stop"), b"data: [DONE]\n\n"]

    def made(runs: bool, reads: list[bytes]) -> bytes:
        answer = MessagesAnswer("r", "m", True, 5) if dialect == "messages" else ResponsesAnswer("r", {"model": "m"}, True)
        if not runs:
            answer._prefix = b""  # never learnt: every chunk goes the usual way
        return b"".join(answer.feed(r) for r in reads) + answer.end()

    slow = made(False, events)
    assert made(True, [b"".join(events)]) == slow
    assert made(True, events) == slow
    assert made(True, [b"".join(events[:2]), b"".join(events[2:])]) == slow


def test_messages_tool_use_waits_for_its_name_and_splits_calls_without_index():
    answer = MessagesAnswer("r1", "m", True, 5)
    out = answer.feed(chunks(call(0, arguments='{"a"'), call(0, id="c0", name="f"), call(0, arguments=":1}"),
                             {"tool_calls": [{"id": "c1", "function": {"name": "g", "arguments": "{}"}}]})) + answer.end()
    events = [json.loads(e.split(b"data: ", 1)[1]) for e in out.split(b"\n\n") if b"data: " in e]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [(b["id"], b["name"]) for b in starts] == [("c0", "f"), ("c1", "g")]
    args: dict[int, str] = {}
    for e in events:
        if e["type"] == "content_block_delta":
            args[e["index"]] = args.get(e["index"], "") + e["delta"]["partial_json"]
    assert [json.loads(a) for a in args.values()] == [{"a": 1}, {}]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


async def test_images_for_a_model_that_takes_none_are_a_400_in_the_dialect(gateway, upstream):
    client = await gateway(providers=CHAT_ONLY)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    resp = await client.post("/v1/messages", json={"model": "deepseek/deepseek-v3.2", "max_tokens": 5, "messages": [
        {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]})
    doc = await resp.json()
    assert resp.status == 400 and doc["type"] == "error" and "does not take images" in doc["error"]["message"]
    resp = await client.post("/v1/responses", json={"model": "deepseek/deepseek-v3.2", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}]})
    assert resp.status == 400 and "does not take images" in (await resp.json())["error"]["message"]
    assert not upstream.seen
    resp = await client.post("/v1/messages", json={"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [
        {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]})
    assert resp.status == 200
    assert upstream.seen[0].body["messages"][0]["content"][0] == {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


async def test_codex_requests_with_hosted_tools_are_translated_for_openrouter(gateway, upstream):
    """OpenRouter's Responses API refuses OpenAI's own tool kinds (namespace, web_search): Codex's
    request goes to it as chat completions, a request with functions only as it came."""
    upstream.replay, upstream.done = fixture_lines("openai-responses-stream-text-with-usage.jsonl"), True
    client = await gateway()
    codex = fixture_json("codex-0.171.0-responses-request.json")["body"]
    resp = await client.post("/v1/responses", json=codex)
    lifecycle_holds(sse(await resp.read()))
    resp = await client.post("/v1/responses", json={"model": "gpt-5.4", "stream": True, "input": "hi", "tools": [
        {"type": "function", "name": "f", "parameters": {"type": "object"}}]})
    assert resp.status == 200 and (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert [s.path for s in upstream.seen] == ["/chat/completions", "/responses"]


@pytest.mark.parametrize("block", [
    {"type": "search_result", "source": "https://example.com", "title": "t", "content": [{"type": "text", "text": "x"}]},
    {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
    {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
])
async def test_blocks_without_a_chat_form_pass_through_or_are_refused(gateway, upstream, block):
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": [block, {"type": "text", "text": "and?"}]}]}
    client = await gateway()
    resp = await client.post("/v1/messages", json=body)
    assert resp.status == 200 and upstream.seen[-1].body["messages"] == body["messages"]
    client = await gateway(providers=CHAT_ONLY)
    resp = await client.post("/v1/messages", json=body)
    doc = await resp.json()
    assert resp.status == 400 and doc["type"] == "error" and doc["error"]["message"]
    assert len(upstream.seen) == 1


async def test_balanced_picks_haiku_for_messages_callers(kilo, upstream, account):
    upstream.replay = fixture_lines("anthropic-messages-stream-text.jsonl")
    key = account("alice", "10")
    client = await kilo()
    resp = await client.post("/v1/messages", headers={"x-api-key": key}, json={
        "model": "kilo-auto/balanced", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200 and (await resp.read()).endswith(b'"message_stop"}\n\n')
    resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={
        "model": "kilo-auto/balanced", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    assert [s.body["model"] for s in upstream.seen] == ["anthropic/claude-haiku-4.5", "openai/gpt-5.3-codex"]


@pytest.mark.parametrize("path,body", [
    ("/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": [], "content": ""}]}),
    ("/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                      "tool_choice": {"type": []}}),
    ("/v1/responses", {"model": "gpt-5.4", "input": [{"role": {}, "content": "x"}]}),
    ("/v1/responses", {"model": "gpt-5.4", "input": "x", "tool_choice": {"type": []},
                       "tools": [{"type": "function", "name": "f"}]}),
])
async def test_unhashable_values_where_names_go_are_never_a_500(gateway, upstream, path, body):
    """A list or an object where a name is looked up (found by the fuzzer): refused, or ignored."""
    client = await gateway(providers=CHAT_ONLY)
    resp = await client.post(path, json=body)
    assert resp.status in (200, 400), await resp.text()


async def test_a_responses_error_keeps_the_providers_code_and_param(gateway, upstream):
    """Codex acts on an error's code (invalid_encrypted_content: drop stale reasoning and retry)."""
    upstream.status = 400
    upstream.error_body = json.dumps(fixture_json("openai-responses-error-400-unsupported-parameter.json")).encode()
    expected = fixture_json("openai-responses-error-400-unsupported-parameter.json")["error"]
    client = await gateway()
    resp = await client.post("/v1/responses", json={"model": "gpt-5.4", "input": "hi"})
    error = (await resp.json())["error"]
    assert resp.status == 400 and (error["code"], error["param"]) == (expected["code"], expected["param"])
    assert error["message"] == expected["message"]
