"""Who is calling: no key, an empty bearer or `Bearer anonymous` is anonymous; a known
key is its account; anything else is 401 `invalid_api_key`. Writes ctx.account.
"""

from __future__ import annotations

import time

from aiohttp import web

from proxy.context import Context
from proxy.keys import caller_key, invalid_key
from proxy.store import Store
from proxy.pipeline import Next

class Auth:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        token = caller_key(ctx.request.headers)
        if token is not None:
            account = self.store.lookup(token)
            if account is None:
                await self.store.recheck()
                account = self.store.lookup(token)
            if account is None or (account.settings is not None and account.expired(time.time())):
                raise invalid_key()  # an expired key is refused as a revoked one is
            ctx.account = account
            ctx.outcome.account_id = account.id  # whose request it was, refused later or not
        return await call_next(ctx)
