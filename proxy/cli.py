"""The `turnstile` command: serve, check-config, keys."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from proxy import config as configuration
from proxy.config import ConfigError


def _serve(args: argparse.Namespace) -> int:
    cfg = configuration.load(args.config)
    if args.host:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    if args.workers is not None:
        cfg.server.workers = args.workers
    configuration.check_server(cfg.server)
    from proxy import keys

    keys.check(keys.db_path(cfg.keys.db))
    from proxy import stopping

    stopping.catch()  # before the server's imports: a Ctrl-C during them is a clean stop
    from proxy import server

    return server.run(cfg)


def _check(args: argparse.Namespace) -> int:
    from proxy import keys
    from proxy.app import create_app

    cfg = configuration.load(args.file)
    create_app(cfg)  # builds every stage and provider: unknown options fail here
    keys.check(keys.db_path(cfg.keys.db))
    print(f"{args.file}: OK ({len(cfg.pipeline)} stages, {len(cfg.providers)} providers)")
    return 0


def _keys(args: argparse.Namespace) -> int:
    import os

    from proxy import keys

    path = args.db or keys.db_path(configuration.load(args.config).keys.db)
    db = keys.connect(path)
    try:
        print(f"(key database: {os.path.abspath(path)})", file=sys.stderr)
        if args.action == "create":
            account, key = keys.create(db, args.name, args.balance)
            print(f"Created account {account.id} ({account.name}), balance ${account.balance:.2f}.")
            print("API key (shown only this once):")
            print(key)
        elif args.action == "list":
            print(f"{'ID':>4}  {'NAME':<24} {'KEY':<10} {'BALANCE USD':>14}  STATUS")
            for a in keys.list_accounts(db):
                status = "revoked" if a.revoked_at else "active"
                print(f"{a.id:>4}  {a.name[:24]:<24} {a.key_hint:<10} {a.balance_micros / 1e6:>14.6f}  {status}")
        elif args.action == "set-balance":
            if not keys.set_balance(db, args.id, args.usd):
                print(f"turnstile: no account {args.id}", file=sys.stderr)
                return 1
            print(f"Account {args.id}: balance set to ${float(args.usd):.2f}.")
        elif args.action == "revoke":
            if not keys.revoke(db, args.id):
                print(f"turnstile: no active account {args.id}", file=sys.stderr)
                return 1
            print(f"Account {args.id}: key revoked.")
    finally:
        db.close()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    import os

    from proxy import keys

    path = args.db or keys.db_path(configuration.load(args.config).keys.db)
    if not os.path.exists(path):  # a mistyped path is not a new database
        print(f"turnstile: no key database at {os.path.abspath(path)}", file=sys.stderr)
        return 1
    db = keys.connect(path)  # which migrates
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()
    print(f"{os.path.abspath(path)}: schema version {version} (this gateway's: {keys.SCHEMA_VERSION})")
    return 0


def _usage(args: argparse.Namespace) -> int:
    import json

    from proxy import keys, report

    path = args.db or keys.db_path(configuration.load(args.config).keys.db)
    try:
        since = report.parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"turnstile: {exc}", file=sys.stderr)
        return 2
    db = keys.connect(path)
    try:
        rows = report.usage(db, args.by, args.account, since)
    finally:
        db.close()
    print(json.dumps(rows, indent=2) if args.json else report.table(rows, args.by))
    return 0


def _usd(text: str) -> str:
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount in USD: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"not an amount in USD (0 or more): {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="turnstile", description="Turnstile, an OpenAI-compatible AI gateway.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=os.environ.get("TURNSTILE_CONFIG") or None,
                       help="TOML file laid over the embedded defaults (default: $TURNSTILE_CONFIG)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8787)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (default 1)")
    serve.set_defaults(run=_serve)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(run=_check)

    keys = sub.add_parser("keys", help="manage accounts and their API keys")
    keys.add_argument("--config", default=os.environ.get("TURNSTILE_CONFIG") or None,
                      help="config file whose [keys] db to use (default: $TURNSTILE_CONFIG)")
    keys.add_argument("--db", help="SQLite file (default: TURNSTILE_KEYS_DB, else the config's [keys] db)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create an account and print its key once")
    create.add_argument("--name", required=True)
    create.add_argument("--balance", type=_usd, default="0", help="starting balance in USD (default 0)")
    actions.add_parser("list", help="list accounts (keys are never shown)")
    balance = actions.add_parser("set-balance", help="set an account's balance in USD")
    balance.add_argument("id", type=int)
    balance.add_argument("usd", type=_usd)
    revoke = actions.add_parser("revoke", help="revoke an account's key")
    revoke.add_argument("id", type=int)
    keys.set_defaults(run=_keys)

    migrate = sub.add_parser("migrate", help="bring the key database to this gateway's schema (serve does it too)")
    migrate.add_argument("--config", default=os.environ.get("TURNSTILE_CONFIG") or None,
                         help="config file whose [keys] db to use (default: $TURNSTILE_CONFIG)")
    migrate.add_argument("--db", help="SQLite file (default: TURNSTILE_KEYS_DB, else the config's [keys] db)")
    migrate.set_defaults(run=_migrate)

    usage = sub.add_parser("usage", help="requests, tokens and cost from the ledger")
    usage.add_argument("--config", default=os.environ.get("TURNSTILE_CONFIG") or None,
                       help="config file whose [keys] db to use (default: $TURNSTILE_CONFIG)")
    usage.add_argument("--db", help="SQLite file (default: TURNSTILE_KEYS_DB, else the config's [keys] db)")
    usage.add_argument("--account", type=int, help="only this account")
    usage.add_argument("--since", help="only requests from this date on (YYYY-MM-DD, UTC)")
    usage.add_argument("--by", choices=("model", "account", "day"), default="model")
    usage.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    usage.set_defaults(run=_usage)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"turnstile: configuration error: {exc}", file=sys.stderr)
        return 2
