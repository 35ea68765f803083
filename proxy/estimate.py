"""The most a request may cost, before it is sent: what a paid request reserves of its balance and
what a key's budget counts for it."""

from __future__ import annotations

from proxy import retry
from proxy.catalog import Model
from proxy.config import UpstreamSettings
from proxy.context import Context


def most(ctx: Context, upstream: UpstreamSettings) -> int:
    """The most the request may cost: its prompt, and as many output tokens as it allows (else as
    many as the model gives) for each of its `n` choices, at the prices of its model or of the
    dearest model it may fall back to (its own `models` list, then the configured fallbacks)."""
    body = ctx.body
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    asked = asked if type(asked) is int and asked > 0 else 0
    n = body.get("n")
    choices = n if type(n) is int and n > 1 else 1
    models = [ctx.model]
    if body.get("models") or upstream.fallbacks:
        models += [m for m in map(ctx.catalog.get, retry.fallback_models(ctx, upstream, body.get("models"))) if m is not None]
    return max(_model_most(m, ctx.outcome.request_bytes, asked, choices) for m in models)


def _model_most(model: Model, request_bytes: int, asked: int, choices: int) -> int:
    top = model.entry.get("top_provider")
    limit = top.get("max_completion_tokens") if isinstance(top, dict) else None
    output = asked or (limit if type(limit) is int and limit > 0 else model.bounds.completion)
    return model.prices.most_micros(request_bytes, output * choices)
