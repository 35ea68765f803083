"""structlog set-up: JSON lines when not on a terminal, readable lines when on one.

Log only what is safe: never a key, an Authorization value or message content.
"""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

from proxy.config import ConfigError, Logging

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
    processors: list[structlog.typing.Processor] = [
        *([structlog.contextvars.merge_contextvars] if workers else []),  # the worker's number
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        factory: object = structlog.BytesLoggerFactory(getattr(out, "buffer", out))
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
    # aiohttp and asyncio report through the standard library: route them to the same stream.
    logging.basicConfig(level=max(level, logging.WARNING), stream=out, format="%(levelname)s %(name)s: %(message)s")
