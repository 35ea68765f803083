"""The `turnstile` command: serve, check-config, keys, migrate, usage, store copy."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

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
    from proxy import store

    store.check(store.settings(cfg).url)
    from proxy import stopping

    stopping.catch()  # before the server's imports: a Ctrl-C during them is a clean stop
    from proxy import server

    return server.run(cfg)


def _check(args: argparse.Namespace) -> int:
    from proxy import store
    from proxy.app import create_app

    cfg = configuration.load(args.file)
    create_app(cfg)  # builds every stage and provider: unknown options fail here
    store.check(store.settings(cfg).url)
    print(f"{args.file}: OK ({len(cfg.pipeline)} stages, {len(cfg.providers)} providers)")
    return 0


def _settings(args: argparse.Namespace, url: str | None = None) -> object:
    """The store named by `url` or --db (a SQLite path or a store URL), else by the config."""
    from proxy import store

    url = url or getattr(args, "db", None)
    if url:
        return store.StoreSettings(url=store.store_url(url, ""), password=os.environ.get("TURNSTILE_STORE_PASSWORD", ""))
    return store.settings(configuration.load(args.config))


def _run(args: argparse.Namespace, work: object, url: str | None = None) -> int:
    """Runs `work(store)` on the store opened (and migrated), then closes it."""
    from proxy import store

    settings = _settings(args, url)

    async def go() -> int:
        opened = store.open_store(settings)  # type: ignore[arg-type]
        async with opened:
            print(f"(store: {opened.describe()})", file=sys.stderr)
            return int(await work(opened))  # type: ignore[operator]

    return int(store.run_sync(go))


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, as the admin API takes them (null clears one)."""
    given: dict[str, Any] = {}
    for name in ("rpm", "tpm", "concurrency"):
        value = getattr(args, name, None)
        if value is not None:
            given[name] = value or None  # 0 clears it
    for name, flag in (("budgets", "budget"), ("allow", "allow"), ("deny", "deny")):
        values = getattr(args, flag, None)
        if values is not None:
            given[name] = [v for v in values if v] or None  # --budget '' clears them
    if getattr(args, "expires", None) is not None:
        given["expires_at"] = args.expires or None
    if getattr(args, "owner", None) is not None:
        given["owner"] = args.owner
    if getattr(args, "tag", None) is not None:
        tags = [t for t in args.tag if t]
        bad = [t for t in tags if "=" not in t]
        if bad:
            from proxy.keys import SettingsError

            raise SettingsError(f"tag {bad[0]!r}: give name=value, e.g. team=search")
        given["tags"] = dict(t.split("=", 1) for t in tags) or None
    return given


def _show(account: Any) -> str:
    from proxy.keys import iso

    lines = [f"Account {account.id} ({account.name}), key {account.key_hint}, balance ${account.balance_micros / 1e6:.6f}, "
             f"{'revoked ' + iso(account.revoked_at) if account.revoked_at else 'active'}, created {iso(account.created_at)}"]
    for name, value in (account.settings.to_json() if account.settings else {}).items():
        lines.append(f"  {name}: {', '.join(value) if isinstance(value, list) else value}")
    return "\n".join(lines)


def _keys(args: argparse.Namespace) -> int:
    from proxy.keys import KeySettings, SettingsError, clean_name

    try:
        given = _flags(args)
        settings = KeySettings.from_json(given) if given and args.action == "create" else None
        if getattr(args, "name", None) is not None:
            args.name = clean_name(args.name)
    except SettingsError as exc:
        print(f"turnstile: {exc}", file=sys.stderr)
        return 2

    async def work(store: Any) -> int:
        if args.action == "create":
            account, key = await store.create(args.name, args.balance, settings)
            print(f"Created account {account.id} ({account.name}), balance ${account.balance:g}.")
            print("API key (shown only this once):")
            print(key)
        elif args.action in ("show", "update"):
            account = await store.account(args.id)
            if account is None:
                print(f"turnstile: no account {args.id}", file=sys.stderr)
                return 1
            if args.action == "update":
                try:
                    merged = (account.settings or KeySettings()).merged(given)
                except SettingsError as exc:
                    print(f"turnstile: {exc}", file=sys.stderr)
                    return 2
                await store.update(args.id, args.name, merged)
                account = await store.account(args.id)
            print(_show(account))
        elif args.action == "list":
            print(f"{'ID':>4}  {'NAME':<24} {'KEY':<10} {'BALANCE USD':>14}  STATUS")
            for a in await store.accounts():
                status = "revoked" if a.revoked_at else "active"
                print(f"{a.id:>4}  {a.name[:24]:<24} {a.key_hint:<10} {a.balance_micros / 1e6:>14.6f}  {status}")
        elif args.action == "set-balance":
            if not await store.set_balance(args.id, args.usd):
                print(f"turnstile: no account {args.id}", file=sys.stderr)
                return 1
            print(f"Account {args.id}: balance set to ${args.usd}.")
        elif args.action == "revoke":
            if not await store.revoke(args.id):
                print(f"turnstile: no active account {args.id}", file=sys.stderr)
                return 1
            print(f"Account {args.id}: key revoked.")
        return 0

    return _run(args, work)


def _migrate(args: argparse.Namespace) -> int:
    from proxy import store

    settings = _settings(args)
    path = store.sqlite_path(settings.url)  # type: ignore[attr-defined]
    if path is not None and not os.path.exists(path):  # a mistyped path is not a new database
        print(f"turnstile: no key database at {os.path.abspath(path)}", file=sys.stderr)
        return 1

    async def work(opened: Any) -> int:
        _, version = await opened.migrate()  # `open` has migrated it already
        print(f"{opened.describe()}: schema version {version} (this gateway's: {version})")
        return 0

    return _run(args, work)


def _usage(args: argparse.Namespace) -> int:
    import json

    from proxy import report

    try:
        since = report.parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"turnstile: {exc}", file=sys.stderr)
        return 2

    async def work(store: Any) -> int:
        rows = await store.usage(args.by, args.account, since)
        print(json.dumps(rows, indent=2) if args.json else report.table(rows, args.by))
        return 0

    return _run(args, work)


def _copy(args: argparse.Namespace) -> int:
    """`turnstile store copy FROM TO`: every account (with its key hash, so keys go on working),
    the ledger and the installation's secret, into a store that holds nothing yet."""
    from proxy import store

    path = store.sqlite_path(args.source)
    if path is not None and not os.path.exists(path):  # a mistyped path is not an empty store
        print(f"turnstile: no key database at {os.path.abspath(path)}", file=sys.stderr)
        return 1

    async def go() -> int:
        source = store.open_store(_settings(args, args.source))  # type: ignore[arg-type]
        target = store.open_store(_settings(args, args.target))  # type: ignore[arg-type]
        async with source, target:
            if not await target.is_empty():
                print(f"turnstile: {target.describe()} already holds accounts or ledger rows; copy into an empty store",
                      file=sys.stderr)
                return 1
            counts: dict[str, int] = {}
            async for table, rows in source.dump():
                await target.load(table, rows)
                counts[table] = counts.get(table, 0) + len(rows)
        print(f"Copied {counts.get('accounts', 0)} accounts and {counts.get('ledger', 0)} ledger rows "
              f"from {source.describe()} to {target.describe()}.")
        return 0

    return int(store.run_sync(go))


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
                      help="config file whose store to use (default: $TURNSTILE_CONFIG)")
    keys.add_argument("--db", help="the store: a SQLite file or a store URL (default: TURNSTILE_STORE_URL, else the config's)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create an account and print its key once")
    create.add_argument("--name", required=True)
    create.add_argument("--balance", type=_usd, default="0", help="starting balance in USD (default 0)")
    show = actions.add_parser("show", help="an account's balance and settings")
    show.add_argument("id", type=int)
    update = actions.add_parser("update", help="change an account's name or settings (the flags of create)")
    update.add_argument("id", type=int)
    update.add_argument("--name")
    for parser_ in (create, update):
        parser_.add_argument("--rpm", type=int, help="requests per minute (0 clears)")
        parser_.add_argument("--tpm", type=int, help="tokens per minute, counted from usage (0 clears)")
        parser_.add_argument("--concurrency", type=int, help="requests in flight at once (0 clears)")
        parser_.add_argument("--budget", action="append", metavar="USD/WINDOW",
                             help="e.g. 5/day, 100/month (calendar, UTC) or 1/24h (sliding); repeat for more; '' clears")
        parser_.add_argument("--allow", action="append", metavar="PATTERN", help="only models matching, e.g. 'anthropic/*'")
        parser_.add_argument("--deny", action="append", metavar="PATTERN", help="never models matching")
        parser_.add_argument("--expires", metavar="TIME", help="e.g. 2027-01-01T00:00:00Z ('' clears)")
        parser_.add_argument("--owner")
        parser_.add_argument("--tag", action="append", metavar="NAME=VALUE", help="e.g. team=search; repeat for more")
    actions.add_parser("list", help="list accounts (keys are never shown)")
    balance = actions.add_parser("set-balance", help="set an account's balance in USD")
    balance.add_argument("id", type=int)
    balance.add_argument("usd", type=_usd)
    revoke = actions.add_parser("revoke", help="revoke an account's key")
    revoke.add_argument("id", type=int)
    keys.set_defaults(run=_keys)

    migrate = sub.add_parser("migrate", help="bring the store to this gateway's schema (serve does it too)")
    migrate.add_argument("--config", default=os.environ.get("TURNSTILE_CONFIG") or None,
                         help="config file whose store to use (default: $TURNSTILE_CONFIG)")
    migrate.add_argument("--db", help="the store: a SQLite file or a store URL (default: TURNSTILE_STORE_URL, else the config's)")
    migrate.set_defaults(run=_migrate)

    usage = sub.add_parser("usage", help="requests, tokens and cost from the ledger")
    usage.add_argument("--config", default=os.environ.get("TURNSTILE_CONFIG") or None,
                       help="config file whose store to use (default: $TURNSTILE_CONFIG)")
    usage.add_argument("--db", help="the store: a SQLite file or a store URL (default: TURNSTILE_STORE_URL, else the config's)")
    usage.add_argument("--account", type=int, help="only this account")
    usage.add_argument("--since", help="only requests from this date on (YYYY-MM-DD, UTC)")
    usage.add_argument("--by", choices=("model", "account", "day", "tag"), default="model")
    usage.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    usage.set_defaults(run=_usage)

    stores = sub.add_parser("store", help="the store of keys, balances and the ledger")
    store_actions = stores.add_subparsers(dest="action", required=True)
    copy = store_actions.add_parser("copy", help="copy a whole store into another, empty one (SQLite into PostgreSQL, or back)")
    copy.add_argument("source", metavar="FROM", help="a SQLite file or a store URL")
    copy.add_argument("target", metavar="TO", help="a store URL, e.g. postgresql://turnstile@db/turnstile "
                      "(the password from TURNSTILE_STORE_PASSWORD)")
    copy.set_defaults(run=_copy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"turnstile: configuration error: {exc}", file=sys.stderr)
        return 2
