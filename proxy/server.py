"""Runs the app: uvloop when installed, handler cancellation on client disconnect, graceful stop."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from proxy import logs
from proxy.app import create_app
from proxy.config import Config

log = structlog.get_logger("turnstile")


def _use_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(cfg: Config) -> int:
    logs.setup(cfg.logging, cache=True)
    uvloop = _use_uvloop()
    app = create_app(cfg)
    host, port = cfg.server.host, cfg.server.port
    log.info("listening", url=f"http://{host}:{port}", uvloop=uvloop, stages=[r.use for r in cfg.pipeline])
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=None,
        handler_cancellation=True,  # a client that hangs up cancels its upstream request at once
        shutdown_timeout=cfg.server.shutdown_timeout,
        backlog=1024,
    )
    return 0
