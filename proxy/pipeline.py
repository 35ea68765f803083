"""Stages and their composition: each stage is one async method, the chain is built once."""

from __future__ import annotations

import functools
import inspect
from typing import Awaitable, Callable, Protocol, Sequence

from aiohttp import web

from proxy.context import Context

Next = Callable[[Context], Awaitable[web.StreamResponse]]


class Stage(Protocol):
    """Do work before `call_next`, after it, around it, or raise `GatewayError` to stop."""

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse: ...


def _link(stage: Stage, call_next: Next) -> Next:
    """`stage` with its next handler bound. With the protocol's parameter name this is a partial (no
    extra coroutine frame per stage on every request); any other name gets a small wrapper."""
    try:
        param = inspect.signature(stage).parameters.get("call_next")
    except (TypeError, ValueError):
        param = None
    if param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
        return functools.partial(stage, call_next=call_next)

    async def run(ctx: Context) -> web.StreamResponse:
        return await stage(ctx, call_next)

    return run


def compose(stages: Sequence[Stage], last: Next) -> Next:
    """One callable that runs `stages` top to bottom, then `last` (the provider)."""
    handler = last
    for stage in reversed(stages):
        handler = _link(stage, handler)
    return handler
