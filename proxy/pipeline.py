"""Stages and their composition: each stage is one async method, the chain is built once."""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol, Sequence

from aiohttp import web

from proxy.context import Context

Next = Callable[[Context], Awaitable[web.StreamResponse]]


class Stage(Protocol):
    """Do work before `call_next`, after it, around it, or raise `GatewayError` to stop."""

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse: ...


def _link(stage: Stage, call_next: Next) -> Next:
    async def run(ctx: Context) -> web.StreamResponse:
        return await stage(ctx, call_next)

    return run


def compose(stages: Sequence[Stage], last: Next) -> Next:
    """One callable that runs `stages` top to bottom, then `last` (the provider)."""
    handler = last
    for stage in reversed(stages):
        handler = _link(stage, handler)
    return handler
