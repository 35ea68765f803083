"""Stages a third party might write, loaded in tests by `module:Class` path."""

from __future__ import annotations

import os
import time
from pathlib import Path

from aiohttp import web

from proxy.context import Context
from proxy.pipeline import Next

ORDER: list[str] = []


class Tag:
    """Records its name on the way in and out, and stamps a response header."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        ORDER.append(f"in:{self.name}")
        ctx.response_headers[f"X-Stage-{self.name}"] = "1"
        response = await call_next(ctx)
        ORDER.append(f"out:{self.name}")
        return response


class OtherNames:
    """The same, with its own names for the parameters: it must chain just as well."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, context: Context, nxt: Next) -> web.StreamResponse:
        ORDER.append(f"in:{self.name}")
        response = await nxt(context)
        ORDER.append(f"out:{self.name}")
        return response


class SlowStart:
    """Slow to build (a plugin loading a model, say): writes its process id to `marks`, then sleeps."""

    def __init__(self, marks: str, seconds: float) -> None:
        Path(marks, str(os.getpid())).touch()
        time.sleep(seconds)

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        return await call_next(ctx)
