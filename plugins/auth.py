"""Who is calling (decision 4): no key, an empty bearer or `Bearer anonymous` is anonymous; a known
key is its account; anything else is 401 `invalid_api_key`. Writes ctx.account.
"""

from __future__ import annotations

from aiohttp import web

from proxy.context import Context
from proxy.errors import GatewayError
from proxy.keys import KeyStore
from proxy.pipeline import Next

ANONYMOUS = "anonymous"


def bearer_token(header: str | None) -> str | None:
    """The caller's token, or None when the caller is anonymous. Raises for a malformed header."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        if not header.strip():
            return None
        raise invalid_key()
    if not token or token == ANONYMOUS:
        return None
    return token


def invalid_key() -> GatewayError:
    return GatewayError(401, "invalid_api_key", "Invalid API key.", code="invalid_api_key")


class Auth:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        token = bearer_token(ctx.request.headers.get("Authorization"))
        if token is not None:
            account = self.keys.lookup(token)
            if account is None and await self.keys.recheck():
                account = self.keys.lookup(token)
            if account is None:
                raise invalid_key()
            ctx.account = account
        return await call_next(ctx)
