"""Free models for everyone, paid models for accounts with balance.

A free request cannot carry extras that the provider bills per request (OpenRouter's web search
plugins, web_search_options): they are dropped. Reads ctx.model (already resolved from
kilo-auto/*) and ctx.account; may remove fields from ctx.body.
"""

from __future__ import annotations

from aiohttp import web

from proxy.context import Context
from proxy.errors import GatewayError
from proxy.pipeline import Next


BILLED_EXTRAS = ("plugins", "web_search_options")


class FreeGate:
    def __init__(
        self,
        title: str = "Paid Model - Credits Required",
        message: str = "This is a paid model. To use paid models, you need to add credits.",
        buy_credits_url: str = "",
    ) -> None:
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
        if account.balance_micros <= 0:
            extra: dict[str, object] = {
                "title": self.title, "balance": account.balance, "buyCreditsUrl": self.buy_credits_url or None,
            }
            raise GatewayError(402, "usage_limit_exceeded", self.message, extra=extra)
        return await call_next(ctx)
