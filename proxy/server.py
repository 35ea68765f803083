"""Runs the app: uvloop when installed, handler cancellation on client disconnect, graceful stop.

SIGTERM or SIGINT stops accepting, lets in-flight requests and streams finish within
`server.shutdown_timeout`, runs every cleanup (the ledger's last write among them) and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys

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


async def serve(cfg: Config, app: web.Application, uvloop: bool) -> int:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=cfg.server.shutdown_timeout)
    await runner.setup()
    host, port = cfg.server.host, cfg.server.port
    try:
        await web.TCPSite(runner, host, port, backlog=1024, reuse_port=cfg.server.workers > 1).start()
    except OSError as exc:
        await runner.cleanup()
        print(f"turnstile: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening", url=f"http://{host}:{port}", uvloop=uvloop, stages=[r.use for r in cfg.pipeline])
    await stop.wait()
    log.info("stopping", grace_seconds=cfg.server.shutdown_timeout)
    await runner.cleanup()
    log.info("stopped")
    return 0


def run(cfg: Config) -> int:
    logs.setup(cfg.logging, cache=True)
    uvloop = _use_uvloop()
    app = create_app(cfg)
    return asyncio.run(serve(cfg, app, uvloop))
