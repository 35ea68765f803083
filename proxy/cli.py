"""The `turnstile` command: serve, check-config, keys."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from proxy import config as configuration
from proxy.config import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from proxy import server

    cfg = configuration.load(args.config)
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    if args.workers is not None:
        cfg.server.workers = args.workers
    return server.run(cfg)


def _check(args: argparse.Namespace) -> int:
    from proxy.app import create_app

    cfg = configuration.load(args.file)
    create_app(cfg)  # builds every stage and provider: unknown options fail here
    print(f"{args.file}: OK ({len(cfg.pipeline)} stages, {len(cfg.providers)} providers)")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turnstile", description="Turnstile, an OpenAI-compatible AI gateway.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="TOML file laid over the embedded defaults")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8787)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    serve.set_defaults(run=_serve)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(run=_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"turnstile: configuration error: {exc}", file=sys.stderr)
        return 2
