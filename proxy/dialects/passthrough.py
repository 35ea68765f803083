"""Passthrough: a Messages or Responses request sent as it came to a provider that speaks that
dialect, its answer relayed byte for byte (the meter reads the dialect's own usage events).

The only edits to the body: the model (the provider's id for the catalog's model), and what a stage
changed of the reasoning (an auto model's tier), written the dialect's way. When only the model
changes, it is spliced into the bytes, so thinking blocks and their signatures go back exactly as
they were received.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson

from proxy.dialects.messages import chat_usage
from proxy.dialects.responses import CARRIED
from proxy.meter import _positive

if TYPE_CHECKING:
    from proxy.context import Context, Native

_MODEL = re.compile(rb'(?<!\\)"model"\s*:\s*')
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")


_FIRST = re.compile(rb'\s*\{\s*"model"\s*:\s*')  # the body's first key (Claude Code's, Codex's, the SDKs')


def _splice(raw: bytes, model: str) -> bytes | None:
    """`raw` with its top-level `"model"` value replaced: the first key, or else the only `"model"`
    key of the body; None when it cannot be told from the bytes alone (the body is then written anew)."""
    m = _FIRST.match(raw)
    if m is None:
        found = _MODEL.findall(raw)
        if len(found) != 1:
            return None
        m = _MODEL.search(raw)
        assert m is not None
    start = m.end()
    if raw[start:start + 1] != b'"':
        return None
    end = raw.find(b'"', start + 1)
    while end > 0 and raw[end - 1] == 92:  # an escaped quote, or an escaped backslash: written anew
        if raw[end - 2] == 92:
            return None
        end = raw.find(b'"', end + 1)
    if end < 0:
        return None
    return b"".join((raw[:start], orjson.dumps(model), raw[end + 1:]))


def _changes(ctx: Context, native: Native) -> dict[str, Any]:
    """What the stages changed of the request's reasoning, in the dialect's own fields."""
    body = ctx.body
    reasoning, verbosity = body.get("reasoning"), body.get("verbosity")
    if reasoning == native.reasoning and verbosity == native.verbosity:
        return {}
    wish = reasoning if isinstance(reasoning, dict) else {}
    effort = wish.get("effort") if isinstance(wish.get("effort"), str) else None
    if native.dialect == "messages":
        # The hosted gateway's frontier tier: adaptive thinking, its verbosity as the effort.
        config = native.body.get("output_config") if isinstance(native.body.get("output_config"), dict) else {}
        changes: dict[str, Any] = {}
        if wish.get("enabled") is False:
            changes["thinking"] = {"type": "disabled"}
        elif wish:
            changes["thinking"] = {"type": "adaptive"}
        level = verbosity if isinstance(verbosity, str) else effort
        if level:
            changes["output_config"] = {**config, "effort": level}
        return changes
    changes = {}
    if wish:
        old = native.body.get("reasoning") if isinstance(native.body.get("reasoning"), dict) else {}
        changes["reasoning"] = {**old, "effort": "none" if wish.get("enabled") is False else effort or "medium"}
    if isinstance(verbosity, str):
        old_text = native.body.get("text") if isinstance(native.body.get("text"), dict) else {}
        changes["text"] = {**old_text, "verbosity": verbosity}
    return changes


# Not the dialect's, but OpenRouter's (fallback models, paid plugins, provider routing): what the chat
# endpoint keeps from the provider, or prices apart, a passed-through request must not carry either.
NOT_THE_DIALECTS = ("models", "plugins", "web_search_options", "provider", "route", "transforms")


def _server_tool(tool: Any, dialect: str) -> bool:
    """A tool the provider runs itself, and bills apart (web search, code execution…)."""
    if not isinstance(tool, dict):
        return False
    if dialect == "messages":
        return "input_schema" not in tool and tool.get("type") not in (None, "custom")
    return tool.get("type") not in ("function", "namespace", "custom")


def _dropped(ctx: Context, native: Native) -> dict[str, Any]:
    """What of the request the provider must not get: our own reasoning items (only we can read
    them), and, for a free model, the tools the provider runs and bills itself."""
    changes: dict[str, Any] = {}
    given = native.body.get("input")
    if native.dialect == "responses" and isinstance(given, list) and native.raw.find(b'"' + CARRIED.encode()) >= 0:
        changes["input"] = [i for i in given if not (isinstance(i, dict) and i.get("type") == "reasoning"
                                                     and str(i.get("encrypted_content", "")).startswith(CARRIED))]
    turns = native.body.get("messages")
    if native.dialect == "messages" and isinstance(turns, list) and native.raw.find(b'"' + CARRIED.encode()) >= 0:
        changes["messages"] = [_without_carried(m) for m in turns]
    tools = native.body.get("tools")
    if ctx.model.free and isinstance(tools, list) and any(_server_tool(t, native.dialect) for t in tools):
        changes["tools"] = [t for t in tools if not _server_tool(t, native.dialect)]
    return changes


def _without_carried(message: Any) -> Any:
    """A turn without the redacted thinking blocks the gateway made (another provider's signatures)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    kept = [b for b in content if not (isinstance(b, dict) and b.get("type") == "redacted_thinking"
                                       and str(b.get("data", "")).startswith(CARRIED))]
    return {**message, "content": kept}


def body(ctx: Context, upstream_model: str) -> bytes:
    """The native request's body for the provider, with only what must change changed."""
    native = ctx.native
    assert native is not None
    changes = _changes(ctx, native) | _dropped(ctx, native)
    drop = [k for k in NOT_THE_DIALECTS if k in native.body]
    if not changes and not drop:
        spliced = _splice(native.raw, upstream_model)
        if spliced is not None:
            return spliced
    doc = {k: v for k, v in native.body.items() if k not in drop}
    doc.update(changes)
    doc["model"] = upstream_model
    return orjson.dumps(doc)


def headers(ctx: Context, base: dict[str, str]) -> dict[str, str]:
    """The provider's own headers (its key), plus the client's Anthropic version and betas for a
    Messages request: the client's credentials are never forwarded."""
    native = ctx.native
    if native is None or native.dialect != "messages":
        return base
    given = ctx.request.headers
    # A header sent several times (one `anthropic-beta` a beta) is one comma-separated list.
    extra = {name: ", ".join(given.getall(name)) for name in ANTHROPIC_HEADERS if name in given}
    return {**base, **extra} if extra else base


class MessagesUsage:
    """Anthropic's usage as it streams: `message_start` gives the input, `message_delta` the
    cumulative output (and, from some providers, the input again). Chat usage out."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}

    def __call__(self, u: dict[str, Any]) -> dict[str, Any]:
        self.counts.update((k, v) for k, v in u.items() if type(v) is int or isinstance(v, dict))
        return chat_usage(self.counts)


def responses_usage(u: dict[str, Any]) -> dict[str, Any]:
    """Responses usage to chat usage: both count cached tokens inside the input."""
    pd = u.get("input_tokens_details") if isinstance(u.get("input_tokens_details"), dict) else {}
    od = u.get("output_tokens_details") if isinstance(u.get("output_tokens_details"), dict) else {}
    prompt, completion = u.get("input_tokens"), u.get("output_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": _positive(pd.get("cached_tokens"))},
            "completion_tokens_details": {"reasoning_tokens": _positive(od.get("reasoning_tokens"))}}




def reader(dialect: str) -> Any:
    """The usage reader of a dialect's answers, for the meter."""
    return MessagesUsage() if dialect == "messages" else responses_usage
