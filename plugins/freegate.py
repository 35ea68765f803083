"""Free models for everyone, paid models for accounts with balance: a paid request reserves the most
it may cost against the balance before it goes on (given back once its real cost is debited), and
is refused with 402 when nothing is left to reserve.

A free request cannot carry extras that the provider bills per request (OpenRouter's web search
plugins, web_search_options): they are dropped. Reads ctx.model (already resolved from
kilo-auto/*) and ctx.account; may remove fields from ctx.body.
"""

from __future__ import annotations

from aiohttp import web

from proxy.config import UpstreamSettings
from proxy.context import Context
from proxy.errors import GatewayError
from proxy.estimate import most
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
