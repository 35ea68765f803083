"""The store: accounts (their hashed keys and balances) and the ledger, behind one interface that
the auth stage, the free-model gate, `/key`, `/generation`, billing and the `turnstile` command use.

Two backends: SQLite (`sqlite:///path`, the embedded default, one machine) and PostgreSQL
(`postgresql://…`, shared by several gateways). This module names the store a URL means and opens
it; what the backends share is in `base.py` (and its reads and account writes in `reports.py` and
`accounts.py`):
- keys are answered from memory, reloaded when the store changes (`refresh_interval`), and looked
  up at once when an unknown key comes (a key made a moment ago elsewhere);
- ledger rows are written in batches off the request path, each first appended to this process's
  journal (`journal.py`), which the next start reads back if the process died;
- a paid request reserves the most it may cost before it is sent (`reserve`) and gives the
  reservation back once its real cost is recorded (`release`).
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any, Mapping

from proxy.store.base import STOP_TRIES, DatabaseError, Store, StoreSettings, unavailable
from proxy.store.records import ACCOUNT_COLUMNS, COLUMNS, USAGE_INDEX, Row, ip_hash, since

__all__ = ["ACCOUNT_COLUMNS", "COLUMNS", "USAGE_INDEX", "STOP_TRIES", "DatabaseError", "Row", "Store",
           "StoreSettings", "check", "create_key", "ip_hash", "is_postgres", "open_store", "redacted", "run_sync",
           "settings", "since", "sqlite_path", "store_url", "unavailable"]


def store_url(configured_url: str, keys_db: str, env: Mapping[str, str] = os.environ) -> str:
    """Which store: TURNSTILE_STORE_URL, else `[store] url`, else a SQLite file at TURNSTILE_KEYS_DB
    or `[keys] db` (the setting of gateways older than `[store]`)."""
    url = env.get("TURNSTILE_STORE_URL") or configured_url
    if url:
        return url
    return "sqlite:///" + (env.get("TURNSTILE_KEYS_DB") or keys_db)


def settings(config: Any, env: Mapping[str, str] = os.environ) -> StoreSettings:
    """The store a gateway's config (and environment) names."""
    store = config.store
    return StoreSettings(
        url=store_url(store.url, config.keys.db, env),
        refresh_interval=config.keys.refresh_interval,
        flush_interval=config.ledger.flush_interval,
        journal=config.ledger.journal,
        password=env.get(store.password_env, "") if store.password_env else "",
        pool_size=store.pool_size,
        hold_ttl=store.hold_ttl,
    )


def sqlite_path(url: str) -> str | None:
    """The file of a `sqlite:///path` URL (three slashes and a relative path, four and an absolute
    one); a bare path is taken as a SQLite file as well. None for any other URL."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://"):]
        if not rest.startswith("/") or rest == "/":
            raise DatabaseError(f"store url {url!r}: write sqlite:///relative/path or sqlite:////absolute/path")
        return rest[1:]
    if "://" in url:
        return None
    return url


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL (or a message quoting it) as it may be shown: a password in it replaced by ***."""
    url = re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


def open_store(settings: StoreSettings) -> Store:
    """The store a URL names (not yet opened). DatabaseError for a URL of no known backend."""
    if is_postgres(settings.url):
        from proxy.store.postgres import PostgresStore

        return PostgresStore(settings)
    path = sqlite_path(settings.url)
    if path is None:
        raise DatabaseError(f"store url {redacted(settings.url)!r}: give sqlite:///path or postgresql://…")
    from proxy.store.sqlite import SQLiteStore

    return SQLiteStore(settings, path)


def check(url: str) -> None:
    """DatabaseError unless the store can be used: `turnstile check-config` and `serve` call it.
    Opens nothing for PostgreSQL (the server may come up after the gateway); a SQLite file must
    be there or creatable."""
    if is_postgres(url):
        return
    path = sqlite_path(url)
    if path is None:
        raise DatabaseError(f"store url {redacted(url)!r}: give sqlite:///path or postgresql://…")
    from proxy.store.sqlite import check_file

    check_file(path)


def run_sync(work: Any) -> Any:
    """`asyncio.run(work())` from code that is not async (the `turnstile` command, scripts, the
    tests' fixtures), in a thread with its own event loop: callable while a loop runs in this one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work()).result()


def create_key(url: str, name: str, balance_usd: str = "0") -> str:
    """A new account's key, made in the store at `url` (a SQLite path or a store URL)."""

    async def work() -> str:
        async with open_store(StoreSettings(url=url, password=os.environ.get("TURNSTILE_STORE_PASSWORD", ""))) as store:
            return (await store.create(name, balance_usd))[1]

    return str(run_sync(work))
