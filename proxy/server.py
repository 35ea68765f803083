"""Runs the app: uvloop when installed, handler cancellation on client disconnect, graceful stop.

SIGTERM or SIGINT stops accepting, lets in-flight requests and streams finish within
`server.shutdown_timeout`, runs every cleanup (the ledger's last write among them) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import ssl
import sys
import time

import structlog
from aiohttp import web

from proxy import logs
from proxy.app import create_app
from proxy.config import Config
from proxy.protocol import Runner

log = structlog.get_logger("turnstile")

BACKLOG = 1024
FULL_COLLECTION_AFTER = 1000  # collections of the middle generation before a full one (Python: 10)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Set by a SIGTERM or SIGINT that comes while the process is still starting, before its event loop
# takes the signals: it then stops as soon as it has started, cleanly, instead of dying by the signal.
_stop_asked = False


def _ask_stop(signum: int, frame: object) -> None:
    """The first signal stops the process once it has started; a second one, while start-up is
    still slow (a catalog sync waiting on its provider), stops it at once, as the default would."""
    global _stop_asked
    if _stop_asked:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _stop_asked = True


def _use_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _tls(cfg: Config) -> ssl.SSLContext | None:
    """The TLS context, or None for plain HTTP. OSError or ssl.SSLError when it cannot be loaded."""
    if not cfg.server.tls_cert:
        return None
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cfg.server.tls_cert, cfg.server.tls_key)
    return tls


def _bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Sockets bound (not yet listening) to every address of `host`, as asyncio's `create_server`
    binds them. OSError (socket.gaierror for a bad host) when one cannot be."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this kernel lacks: asyncio skips it too
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # IPv6 only, not also every IPv4 address
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _reserve(host: str, port: int, workers: int) -> list[list[socket.socket]]:
    """One set of SO_REUSEPORT sockets per worker, listening from before any worker starts and kept
    by the supervisor for its whole life: the port is the gateway's from here on (a socket that only
    binds does not keep it), connections made while the workers start wait for them, and a worker
    started again takes over the socket of the one that died, with the connections that wait on it.

    Sharing would also let a second gateway on a running one's port take half of its connections:
    the first bind, without SO_REUSEPORT, fails wherever a socket already listens on the port, as a
    single process's would."""
    for sock in _bind(host, port, reuse_port=False):
        sock.close()
    reserved: list[list[socket.socket]] = []
    try:
        for _ in range(workers):
            reserved.append(_bind(host, port, reuse_port=True))
            for sock in reserved[-1]:
                sock.listen(BACKLOG)
    except OSError:
        for sock in (s for sockets in reserved for s in sockets):
            sock.close()
        raise
    return reserved


def _ignore_signals() -> None:
    """Once stopped, a second SIGTERM or SIGINT must not turn the exit into a death by signal (the
    interpreter restores the default handlers while it shuts down)."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


async def serve(cfg: Config, app: web.Application, uvloop: bool, sockets: list[socket.socket] | None = None) -> int:
    """Serves on `sockets` (a worker's, bound by its supervisor), or on a port of its own."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    if _stop_asked:
        stop.set()
    stopped = asyncio.ensure_future(stop.wait())
    runner = Runner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=cfg.server.shutdown_timeout)
    # Start-up can be slow (a catalog sync waits up to 30 s on its provider): a stop asked meanwhile
    # cancels it, and what had started is cleaned up.
    setup = asyncio.ensure_future(runner.setup())
    await asyncio.wait((setup, stopped), return_when=asyncio.FIRST_COMPLETED)
    if not setup.done():
        setup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
        await runner.cleanup()
        log.info("stopped", during="start-up")
        return 0
    setup.result()
    host, port = cfg.server.host, cfg.server.port
    try:
        tls = _tls(cfg)
    except (OSError, ssl.SSLError) as exc:
        await runner.cleanup()
        print(f"turnstile: cannot load the TLS certificate or key: {exc}", file=sys.stderr)
        return 2
    sites = [web.SockSite(runner, sock, backlog=BACKLOG, ssl_context=tls) for sock in sockets] if sockets else \
        [web.TCPSite(runner, host, port, backlog=BACKLOG, ssl_context=tls)]
    try:
        for site in sites:
            await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"turnstile: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # Everything built so far lives as long as the process: the cycle collector need not walk it
    # again. (Its full passes took ~25 ms each under load; frozen, ~2 ms.)
    gc.collect()
    gc.freeze()
    # A full collection walks every object of every request in flight: with 1,000 streams open, each
    # one held all of them up for 100 ms and more, to find next to nothing (a request leaves no
    # cycle; tests/test_cycles.py checks it). It now waits for 1,000 collections of the middle
    # generation (about 10,000 of the youngest), not 10. (Python 3.14's incremental collector
    # ignores this third value.)
    gc.set_threshold(*gc.get_threshold()[:2], FULL_COLLECTION_AFTER)
    log.info("listening", url=f"{'https' if tls else 'http'}://{host}:{port}", uvloop=uvloop, stages=[r.use for r in cfg.pipeline])
    await stopped
    log.info("stopping", grace_seconds=cfg.server.shutdown_timeout)
    await runner.cleanup()
    log.info("stopped")
    return 0


def run(cfg: Config) -> int:
    logs.setup(cfg.logging, cache=True, workers=cfg.server.workers > 1)
    if cfg.server.workers > 1:
        # Every configuration error shows here, once, before any worker starts.
        create_app(cfg)
        try:
            _tls(cfg)
        except (OSError, ssl.SSLError) as exc:
            print(f"turnstile: cannot load the TLS certificate or key: {exc}", file=sys.stderr)
            return 2
        try:
            reserved = _reserve(cfg.server.host, cfg.server.port, cfg.server.workers)
        except OSError as exc:
            print(f"turnstile: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        try:
            return supervise(cfg, reserved)
        finally:
            _ignore_signals()
    return _worker(cfg)


def _worker(cfg: Config, sockets: list[socket.socket] | None = None) -> int:
    for sig in _SIGNALS:
        signal.signal(sig, _ask_stop)
    uvloop = _use_uvloop()
    app = create_app(cfg)
    try:
        return asyncio.run(serve(cfg, app, uvloop, sockets))
    finally:
        _ignore_signals()
        logs.flush()


def _fork(cfg: Config, index: int, mask: set[signal.Signals], reserved: list[list[socket.socket]]) -> int:
    """Called with SIGTERM and SIGINT blocked; `mask` is the mask to restore in the child."""
    pid = os.fork()
    if pid == 0:  # the worker: its own event loop, app, connection pool and key cache
        code = 1
        try:
            for sig in _SIGNALS:  # not the supervisor's handler; a signal that waited arrives here
                signal.signal(sig, _ask_stop)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for other in reserved[:index] + reserved[index + 1:]:  # its stop must close the port to it
                for sock in other:
                    sock.close()
            structlog.contextvars.bind_contextvars(worker=index)
            code = _worker(cfg, reserved[index])
        except Exception:
            log.exception("worker_failed")  # the supervisor only sees the exit code
        finally:
            logs.flush()
            os._exit(code)
    return pid


def supervise(cfg: Config, reserved: list[list[socket.socket]]) -> int:
    """N worker processes share the port (SO_REUSEPORT), each on its own sockets from `reserved`.
    A worker that dies is started again; SIGTERM is passed to every worker, each drains its
    requests, then the supervisor exits 0."""
    stopping = False
    workers: dict[int, int] = {}  # pid -> index
    born: dict[int, float] = {}

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:  # from now on a socket closes with its worker: new connections are refused
            for sock in (s for sockets in reserved for s in sockets):
                sock.close()
        stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def spawn(index: int) -> None:
        """The signals wait while a worker is forked: by the time `stop` runs, the new worker is in
        `workers` and has its own handlers, or was not started at all. Either way none is missed."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            if not stopping:
                pid = _fork(cfg, index, mask, reserved)
                workers[pid], born[pid] = index, time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(cfg.server.workers):
        spawn(i)
    log.info("supervising", workers=cfg.server.workers, pids=sorted(workers))
    failed = False
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = workers.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed = failed or code != 0
            continue
        log.error("worker_died", worker=index, pid=pid, exit_code=code)
        age = time.monotonic() - born.pop(pid, 0.0)
        if code > 0 and age < 2.0:  # it could not start (port taken?): give up
            stop(signal.SIGTERM, None)
            failed = True
            continue
        spawn(index)
    log.info("stopped")
    return 1 if failed else 0
