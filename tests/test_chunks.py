"""The OpenAI chunks translators send: the same bytes as encoding each chunk whole."""

from __future__ import annotations

from types import SimpleNamespace

import orjson

from proxy.provider import Chunks
from proxy.sse import data


def test_delta_chunks_are_the_whole_chunk_encoded():
    ctx = SimpleNamespace(request_id="abc", model=SimpleNamespace(id="anthropic/claude-sonnet-4.6"))
    out = Chunks(ctx)
    deltas = [({"role": "assistant", "content": ""}, None), ({"content": 'quote " and \\ and ünï'}, None),
              ({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, None), ({}, "stop")]
    for renamed in (False, True):
        if renamed:
            out.id = out.base["id"] = "msg_upstream"
        for delta, finish in deltas:
            whole = data({**out.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            assert out.delta(delta, finish) == whole
            assert orjson.loads(whole[6:])["id"] == ("msg_upstream" if renamed else "chatcmpl-abc")
    assert out.id == "msg_upstream"
