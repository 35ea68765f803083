"""Free models for everyone, paid models for accounts with balance: a paid request reserves the most
it may cost against the balance before it goes on (given back once its real cost is debited), and
is refused with 402 when nothing is left to reserve.

A free request cannot carry extras that the provider bills per request (OpenRouter's web search
plugins, web_search_options): they are dropped. Reads ctx.model (already resolved from
kilo-auto/*) and ctx.account; may remove fields from ctx.body.
"""

from __future__ import annotations

from aiohttp import web

from proxy import retry
from proxy.catalog import Model
from proxy.config import UpstreamSettings
from proxy.context import Context
from proxy.errors import GatewayError
from proxy.store import Store
from proxy.pipeline import Next


BILLED_EXTRAS = ("plugins", "web_search_options")


class FreeGate:
    def __init__(
        self,
        title: str = "Paid Model - Credits Required",
        message: str = "This is a paid model. To use paid models, you need to add credits.",
        buy_credits_url: str = "",
        store: Store | None = None,
        upstream: UpstreamSettings | None = None,
    ) -> None:
        self.store = store  # where a paid request reserves its most cost before it is sent
        self.upstream = upstream or UpstreamSettings()  # its configured fallbacks, priced in
        self.title = title
        self.message = message
        self.buy_credits_url = buy_credits_url

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        if ctx.model.free:
            for key in BILLED_EXTRAS:
                ctx.body.pop(key, None)
            return await call_next(ctx)
        account = ctx.account
        if account is None:
            raise GatewayError(
                401, "paid_model_auth_required", "You need to sign in to use this model.", code="PAID_MODEL_AUTH_REQUIRED"
            )
        store = self.store
        reserved = (await store.reserve(account.id, ctx.outcome.request_id, most(ctx, self.upstream)) if store is not None
                    else account.balance_micros)
        if not reserved or reserved < 0:
            left, held = await store.held(account.id) if store is not None else (account.balance_micros, 0)
            extra: dict[str, object] = {
                "title": self.title, "balance": (left + held) / 1_000_000,
                "buyCreditsUrl": self.buy_credits_url or None,
            }
            message = self.message
            if left + held > 0:  # credit there is, all held by requests in flight
                extra["reserved"] = held / 1_000_000
                message = ("This key's balance is held by its requests in progress, each reserving the most it may "
                           "cost: retry when they end, or ask for fewer output tokens (max_tokens).")
            raise GatewayError(402, "usage_limit_exceeded", message, extra=extra)
        if store is not None:
            ctx.outcome.account_id, ctx.outcome.reserved_micros = account.id, reserved
        return await call_next(ctx)


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
