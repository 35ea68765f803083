"""One access-log line per request, with the fields operators need and nothing secret."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import re

import structlog
from structlog.testing import capture_logs

from proxy import logs
from proxy.config import Logging

SECRET_USER_KEY = "sk-user-very-secret-0001"
CONTENT = "my private medical question"


async def test_one_line_per_request_without_secrets(gateway):
    client = await gateway()
    body = {"model": "openai/gpt-5.4", "messages": [{"role": "user", "content": CONTENT}], "stream": True}
    with capture_logs() as captured:
        resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET_USER_KEY}"})
        await resp.read()
        await client.get("/v1/models")
    lines = [e for e in captured if e["event"] == "request"]
    assert len(lines) == 2
    chat = lines[0]
    assert chat["request_id"] == resp.headers["X-Request-Id"]
    assert (chat["method"], chat["path"], chat["status"]) == ("POST", "/v1/chat/completions", 200)
    assert chat["model"] == "openai/gpt-5.4" and chat["route"] == "openrouter"
    assert chat["bytes_out"] > 0 and chat["ttfb_ms"] >= 0 and chat["total_ms"] >= chat["ttfb_ms"]
    everything = json.dumps(captured, default=str)
    assert SECRET_USER_KEY not in everything
    assert "sk-or-test-key" not in everything
    assert CONTENT not in everything


def test_json_lines_when_not_a_terminal():
    out = io.BytesIO()
    logs.setup(Logging(level="info", format="json"), stream=out)
    try:
        before = datetime.datetime.now(datetime.timezone.utc)
        structlog.get_logger("t").info("hello", n=1)
        structlog.get_logger("t").warn("careful")
        after = datetime.datetime.now(datetime.timezone.utc)
        line, warned = (json.loads(x) for x in out.getvalue().splitlines()[-2:])
        assert line["event"] == "hello" and line["n"] == 1 and line["level"] == "info"
        assert warned["level"] == "warning"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])
        stamped = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert before - datetime.timedelta(microseconds=1) <= stamped <= after
    finally:
        structlog.reset_defaults()


class Writes:
    """A binary stream that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.writes.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


async def test_info_lines_are_batched_in_whole_lines_and_errors_go_at_once():
    out = Writes()
    logs.setup(Logging(level="info", format="json"), stream=out)
    try:
        log = structlog.get_logger("t")
        for n in range(100):
            log.info("request", n=n, pad="x" * 100)
        assert 0 < len(out.writes) < 10  # full pieces only, so far
        log.info("last", n=100)
        log.error("broken", n=101)  # flushes everything waiting, in order
        await asyncio.sleep(logs.FLUSH_EVERY * 2)
        assert all(len(w) <= logs.PIECE and w.endswith(b"\n") for w in out.writes)
        lines = [json.loads(line) for w in out.writes for line in w.splitlines()]
        assert [line["n"] for line in lines] == list(range(102))
        log.info("alone")
        assert lines[-1]["level"] == "error"
        await asyncio.sleep(logs.FLUSH_EVERY * 2)  # a lone line waits at most FLUSH_EVERY
        assert json.loads(out.writes[-1])["event"] == "alone"
    finally:
        structlog.reset_defaults()


def test_lines_logged_outside_an_event_loop_are_written_at_once():
    out = Writes()
    logs.setup(Logging(level="info", format="json"), stream=out)
    try:
        structlog.get_logger("t").info("hello")
        assert json.loads(out.writes[-1])["event"] == "hello"
    finally:
        structlog.reset_defaults()


def test_access_line_in_json_is_the_line_structlog_writes():
    out = Writes()
    structlog.contextvars.bind_contextvars(worker=3)
    try:
        logs.setup(Logging(level="info", format="json"), stream=out, workers=True)
        fields = {"request_id": "r1", "method": "POST", "path": "/v1/chat/completions", "status": 200,
                  "ttfb_ms": None, "total_ms": 1.25, "bytes_out": 10, "model": "openai/gpt-5.4", "fallbacks": ["a/b"]}
        structlog.get_logger("turnstile.access").info("request", **fields)
        logs.access_writer()(dict(fields))
        logs.flush()
        by_structlog, ours = (json.loads(line) for w in out.writes for line in w.splitlines())
        assert list(ours) == list(by_structlog)  # the same fields in the same order
        assert {**ours, "timestamp": None} == {**by_structlog, "timestamp": None}
        assert ours["worker"] == 3 and ours["event"] == "request" and ours["level"] == "info"

        with capture_logs() as captured:  # reconfigured since: an app built now logs through structlog
            logs.access_writer()(dict(fields))
        assert captured == [{**fields, "event": "request", "log_level": "info"}]

        logs.setup(Logging(level="info", format="json"), stream=out)
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        logs.access_writer()(dict(fields))  # reconfigured to a higher level since: not written

        logs.setup(Logging(level="warning", format="json"), stream=out)
        logs.access_writer()(dict(fields))  # below the level: not written
        logs.flush()
        assert sum(len(w.splitlines()) for w in out.writes) == 2
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
