"""Runs the app: uvloop when installed, handler cancellation on client disconnect, graceful stop.

SIGTERM or SIGINT stops accepting, lets in-flight requests and streams finish within
`server.shutdown_timeout`, runs every cleanup (the ledger's last write among them) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import shutil
import signal
import socket
import ssl
import sys
import time

import structlog
from aiohttp import web
from prometheus_client import multiprocess

from proxy import logs, metrics, stopping
from proxy.app import create_app
from proxy.config import Config, Server
from proxy.protocol import Runner

log = structlog.get_logger("turnstile")

BACKLOG = 1024
FULL_COLLECTION_AFTER = 1000  # collections of the middle generation before a full one (Python: 10)
PARENT_CHECK_SECONDS = 1.0


def settle_collector() -> None:
    """Called once the app is up, before the first request (the load-test kit's counter does the same)."""
    # Everything built so far lives as long as the process: the cycle collector need not walk it again.
    gc.collect()
    gc.freeze()
    # A full collection walks every object of every request in flight, to find next to nothing (a
    # request leaves no cycle; tests/test_cycles.py checks it): it waits for 1,000 collections of
    # the middle generation, not 10. (Python 3.14's incremental collector ignores this value.)
    gc.set_threshold(*gc.get_threshold()[:2], FULL_COLLECTION_AFTER)


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
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(found):  # (a name may list an address twice)
            if port == 0 and sockets:  # port 0: the port the first one got, on every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
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
    """The sockets of each worker, listening from before the app is built: a port in use is refused
    at once, and the port is the gateway's from here on (a socket that only binds does not keep it).

    Several workers get one set of SO_REUSEPORT sockets each, kept by the supervisor for its whole
    life: connections made while the workers start wait for them, and a worker started again takes
    over the socket of the one that died, with the connections that wait on it. Sharing would also
    let a second gateway on a running one's port take half of its connections: the first bind,
    without SO_REUSEPORT, fails wherever a socket already listens on the port, as a single
    process's would."""
    sharing = workers > 1
    if sharing and port:
        for sock in _bind(host, port, reuse_port=False):
            sock.close()
    reserved: list[list[socket.socket]] = []
    try:
        for _ in range(workers):
            reserved.append(_bind(host, port, reuse_port=sharing))
            for sock in reserved[-1]:
                sock.listen(BACKLOG)
            if not port and reserved[0]:  # port 0: the one the first set got, for every other set
                port = reserved[0][0].getsockname()[1]
    except OSError:
        for sock in (s for sockets in reserved for s in sockets):
            sock.close()
        raise
    return reserved


def _fitted(server: Server, pool_size: int) -> Server:
    """`server` with `max_connections` lowered, if need be, to what the open-file limit allows: the
    soft limit is first raised to the hard one. Past the limit, accept() fails and asyncio stops
    accepting for a second at a time: every new client would be refused, silently. Room is kept for
    the upstream pool (at most a quarter of the limit) and 64 other files."""
    try:
        import resource
    except ImportError:  # not on this platform
        return server
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return server
    room = max(64, soft - 64 - min(pool_size, soft // 4))
    if server.max_connections <= room:
        return server
    log.warning("max_connections_lowered", configured=server.max_connections, to=room, open_file_limit=soft)
    return dataclasses.replace(server, max_connections=room)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _url(tls: bool, sockets: list[socket.socket]) -> str:
    return f"{'https' if tls else 'http'}://{_address(*sockets[0].getsockname()[:2])}"


async def serve(cfg: Config, app: web.Application, uvloop: bool, sockets: list[socket.socket],
                signals: tuple[signal.Signals, ...] = stopping.SIGNALS, parent: int | None = None) -> int:
    """Serves on `sockets`, listening already. `signals` stop it; so does the end of the process
    `parent` (a worker's supervisor), if given."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if stopping.asked:
        stop.set()
    if parent is not None:
        def watch() -> None:
            """A supervisor killed outright (SIGKILL, OOM killer) cannot stop its workers: each one
            sees it gone and stops, freeing the port for the next gateway."""
            if os.getppid() != parent:
                log.warning("supervisor_gone", pid=parent)
                stop.set()
            else:
                loop.call_later(PARENT_CHECK_SECONDS, watch)

        loop.call_later(PARENT_CHECK_SECONDS, watch)
    stopped = asyncio.ensure_future(stop.wait())
    runner = Runner(app, _fitted(cfg.server, cfg.upstream.pool_size), access_log=None, handle_signals=False,
                    handler_cancellation=True, shutdown_timeout=cfg.server.shutdown_timeout)
    # Start-up can be slow (a catalog sync waits up to 30 s on its provider): a stop asked meanwhile
    # cancels it, and what had started is cleaned up.
    setup = asyncio.ensure_future(runner.setup())
    await asyncio.wait((setup, stopped), return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():  # (the set-up may have ended in the same turn: no listening then)
        setup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
        await runner.cleanup()
        log.info("stopped", during="start-up")
        return 0
    setup.result()
    try:
        tls = _tls(cfg)
    except (OSError, ssl.SSLError) as exc:
        await runner.cleanup()
        print(f"turnstile: cannot load the TLS certificate or key: {exc}", file=sys.stderr)
        return 2
    for sock in sockets:
        await web.SockSite(runner, sock, backlog=BACKLOG, ssl_context=tls).start()
    settle_collector()
    log.info("listening", url=_url(tls is not None, sockets), uvloop=uvloop, stages=[r.use for r in cfg.pipeline])
    await stopped
    log.info("stopping", grace_seconds=cfg.server.shutdown_timeout)
    await runner.cleanup()
    log.info("stopped")
    return 0


def run(cfg: Config) -> int:
    """Serves until stopped; the command has already installed `stopping`'s handlers."""
    logs.setup(cfg.logging, cache=True, workers=cfg.server.workers > 1)
    try:
        reserved = _reserve(cfg.server.host, cfg.server.port, cfg.server.workers)
    except OSError as exc:
        print(f"turnstile: cannot listen on {_address(cfg.server.host, cfg.server.port)}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    if cfg.server.workers == 1:
        return _worker(cfg, reserved[0])
    samples = None
    try:
        # Every configuration error shows here, once, before any worker starts. (Before the samples
        # are shared: the supervisor's own metrics must not show up beside the workers'.)
        create_app(cfg)
        samples = metrics.shared_samples() if cfg.metrics.enabled else None
        try:
            _tls(cfg)
        except (OSError, ssl.SSLError) as exc:
            print(f"turnstile: cannot load the TLS certificate or key: {exc}", file=sys.stderr)
            return 2
        return supervise(cfg, reserved)
    finally:
        stopping.ignore()
        if samples is not None:
            shutil.rmtree(samples, ignore_errors=True)
        for sock in (s for sockets in reserved for s in sockets):
            sock.close()


def _worker(cfg: Config, sockets: list[socket.socket], signals: tuple[signal.Signals, ...] = stopping.SIGNALS,
            parent: int | None = None) -> int:
    uvloop = _use_uvloop()
    app = create_app(cfg)
    try:
        return asyncio.run(serve(cfg, app, uvloop, sockets, signals, parent))
    finally:
        stopping.ignore()
        logs.flush()


def _fork(cfg: Config, index: int, mask: set[signal.Signals], reserved: list[list[socket.socket]]) -> int:
    """Called with SIGTERM and SIGINT blocked; `mask` is the mask to restore in the child."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker: its own event loop, app, connection pool and key cache
        code = 1
        try:
            # Not the supervisor's handlers; a signal that waited arrives here. A worker stops on
            # its supervisor's SIGTERM only, and a second one does not hurry it: a Ctrl-C in a
            # terminal, or a SIGTERM to the process group, reaches it too, before the supervisor's.
            stopping.catch((signal.SIGTERM,), escalate=False)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for other in reserved[:index] + reserved[index + 1:]:  # its stop must close the port to it
                for sock in other:
                    sock.close()
            structlog.contextvars.bind_contextvars(worker=index)
            code = _worker(cfg, reserved[index], (signal.SIGTERM,), parent)
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
    draining = False
    workers: dict[int, int] = {}  # pid -> index
    born: dict[int, float] = {}

    def stop(signum: int, frame: object) -> None:
        nonlocal draining
        if not draining:  # from now on a socket closes with its worker: new connections are refused
            for sock in (s for sockets in reserved for s in sockets):
                sock.close()
        draining = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def spawn(index: int) -> None:
        """The signals wait while a worker is forked: by the time `stop` runs, the new worker is in
        `workers` and has its own handlers, or was not started at all. Either way none is missed."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stopping.SIGNALS)
        try:
            if not draining:
                pid = _fork(cfg, index, mask, reserved)
                workers[pid], born[pid] = index, time.monotonic()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if stopping.asked:  # while the supervisor was starting
        stop(signal.SIGTERM, None)
        log.info("stopped", during="start-up")
        return 0
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
        if draining:
            if code != 0:
                log.error("worker_died", worker=index, pid=pid, exit_code=code, during="stop")
                failed = True
            continue
        log.error("worker_died", worker=index, pid=pid, exit_code=code)
        if cfg.metrics.enabled:  # its gauges no longer count; its counters do
            multiprocess.mark_process_dead(pid)
        age = time.monotonic() - born.pop(pid, 0.0)
        if code > 0 and age < 2.0:  # it could not start (a plugin that fails in a new process, say): give up
            stop(signal.SIGTERM, None)
            failed = True
            continue
        spawn(index)
    log.info("stopped")
    return 1 if failed else 0
