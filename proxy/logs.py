"""structlog set-up: JSON lines when not on a terminal, readable lines when on one.

Log only what is safe: never a key, an Authorization value or message content.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
import time
from typing import Any, Callable

import orjson
import structlog

from proxy.config import ConfigError, Logging

FLUSH_EVERY = 0.1  # seconds an info line may wait while the server runs
PIECE = 4096  # bytes per write at most: a pipe shared by several workers never splits a line (PIPE_BUF)


class BatchedBytesLogger:
    """structlog's BytesLogger, except that info and debug lines logged on a running event loop are
    written together within `FLUSH_EVERY` seconds, in whole-line pieces of at most `PIECE` bytes:
    one write for many access lines instead of one per request. Warnings and errors go at once."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def msg(self, message: bytes) -> None:
        self._lines.append(message + b"\n")
        self._size += len(message) + 1
        if self._size >= PIECE:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)
            except RuntimeError:  # no event loop: nothing to batch with
                self.flush()

    def now(self, message: bytes) -> None:
        self._lines.append(message + b"\n")
        self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines, self._size = self._lines, [], 0
        piece: list[bytes] = []
        size = 0
        for line in lines:
            if piece and size + len(line) > PIECE:
                self._write(b"".join(piece))
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            self._write(b"".join(piece))

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to save
            self._file.write(data)
            self._file.flush()

    debug = info = msg
    warning = warn = error = critical = exception = fatal = failure = err = now


_LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level names them


class Stamp:
    """structlog's `add_log_level` and `TimeStamper(fmt="iso", utc=True)` in one processor, with the
    date and time formatted once a second instead of once a line (about a third of a line's cost)."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second, self._prefix = -1, ""

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event["level"] = _LEVEL_NAMES.get(method, method)
        second, micro = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        # Six digits with their zeros by the string of a seven-digit number: a format spec is parsed each time.
        event["timestamp"] = self._prefix + str(micro + 1_000_000)[1:] + "Z"
        return event


_batched: BatchedBytesLogger | None = None


class JSONAccessLine:
    """The access line, in JSON: the same line structlog would write, serialized straight to the
    batched stream. It is the one line per request, and structlog's chain of processors costs more
    than the rest of it."""

    def __init__(self, out: BatchedBytesLogger, stamp: Stamp, processors: list[Any], merge_contextvars: bool) -> None:
        self.out, self.stamp, self.processors, self.installed = out, stamp, processors, list(processors)
        self.merge_contextvars = merge_contextvars
        self.wrapper_class: Any = None  # what `setup` configured with these processors
        self.factory: Any = None

    def bind(self) -> Callable[[dict[str, Any]], None]:
        """The writer for one app. Context variables (the worker's number) are taken now, once: what
        is bound later does not reach the access line."""
        bound = structlog.contextvars.get_contextvars() if self.merge_contextvars else {}
        out, stamp, dumps = self.out, self.stamp, orjson.dumps

        def line(fields: dict[str, Any]) -> None:
            fields["event"] = "request"
            for name, value in bound.items():
                fields.setdefault(name, value)
            out.msg(dumps(stamp(None, "info", fields), default=repr))

        return line


_access: JSONAccessLine | None = None


def access_writer() -> Callable[[dict[str, Any]], None]:
    """How an app writes its access line, chosen when the app is built: straight to the stream when
    `setup` made info lines in JSON and they are still configured so; else through structlog (console
    lines, a test capturing the logs)."""
    config = structlog.get_config()
    processors = config["processors"]  # (capture_logs changes this list in place)
    if (_access is not None and processors is _access.processors and processors == _access.installed
            and config["wrapper_class"] is _access.wrapper_class and config["logger_factory"] is _access.factory):
        return _access.bind()
    logger = structlog.get_logger("turnstile.access")
    return lambda fields: logger.info("request", **fields)


def flush() -> None:
    """Write what is waiting (before a process ends)."""
    if _batched is not None:
        _batched.flush()


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(settings: Logging, stream: object = None, cache: bool = False, workers: bool = False) -> None:
    level = _LEVELS.get(settings.level.lower())
    if level is None:
        raise ConfigError(f"logging.level: {settings.level!r} is not one of {', '.join(_LEVELS)}")
    out = stream or sys.stdout
    fmt = settings.format
    if fmt not in ("auto", "json", "console"):
        raise ConfigError(f"logging.format: {fmt!r} is not one of auto, json, console")
    as_json = fmt == "json" or (fmt == "auto" and not getattr(out, "isatty", lambda: False)())
    stamp = Stamp()
    processors: list[structlog.typing.Processor] = [
        *([structlog.contextvars.merge_contextvars] if workers else []),  # the worker's number
        stamp,
    ]
    global _access, _batched
    _access = None
    if as_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        if _batched is None:
            atexit.register(flush)  # whatever waits when the interpreter ends
        batched = _batched = BatchedBytesLogger(getattr(out, "buffer", out))
        factory: object = lambda *args: batched  # noqa: E731
        if level <= logging.INFO:
            _access = JSONAccessLine(batched, stamp, processors, workers)
    else:
        # Plain tracebacks: a rich one would print local variables, keys among them.
        processors.append(structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback))
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,  # type: ignore[arg-type]
        cache_logger_on_first_use=cache,
    )
    if _access is not None:
        config = structlog.get_config()
        _access.wrapper_class, _access.factory = config["wrapper_class"], config["logger_factory"]
    # aiohttp and asyncio report through the standard library: route them to the same stream.
    logging.basicConfig(level=max(level, logging.WARNING), stream=out, format="%(levelname)s %(name)s: %(message)s")
