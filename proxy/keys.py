"""Accounts and their API keys in SQLite. Keys are shown once and stored only as SHA-256 hashes.

The gateway answers lookups from memory and reloads when another process (the `turnstile keys`
command) commits a change, so a revoked key stops working within `refresh_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import AsyncIterator, Mapping

import structlog
from aiohttp import web

from proxy.config import ConfigError
from proxy.errors import GatewayError

log = structlog.get_logger("turnstile.keys")

KEY_PREFIX = "tsk_"
MICROS = Decimal(1_000_000)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_hint TEXT NOT NULL,
    balance_micros INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    account_id INTEGER,
    ip_hash TEXT,
    model_asked TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_micros INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    status INTEGER NOT NULL,
    ttfb_ms REAL,
    duration_ms REAL NOT NULL,
    finish_reason TEXT,
    streamed INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_account ON ledger (account_id, created_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# The schema's versions: MIGRATIONS[n - 1] takes a database from version n - 1 to n (SQLite's
# `user_version`). Version 1 is the schema above, which databases made before versions were kept
# already have (every statement of it is IF NOT EXISTS). A new version is a new entry, never an
# edit of an old one.
MIGRATIONS: list[str] = [_SCHEMA]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> tuple[int, int]:
    """Brings the database to SCHEMA_VERSION, each step in its own transaction: (from, to). A
    database newer than this gateway is refused (DatabaseError) rather than used half-understood."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise DatabaseError(f"the key database is at schema version {found}, newer than this gateway's "
                            f"{SCHEMA_VERSION}: upgrade the gateway")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] < version:  # another process may have done it
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if found:
            log.info("key_database_migrated", version=version)
    return found, SCHEMA_VERSION


ANONYMOUS = "anonymous"


def bearer_token(header: str | None) -> str | None:
    """The caller's key from an Authorization header, or None when the caller is anonymous (no
    header, an empty one, or `Bearer anonymous`). Raises for a header that is not a bearer key."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        if not header.strip():
            return None
        raise invalid_key()
    if not token or token == ANONYMOUS:
        return None
    return token


def caller_key(headers: Mapping[str, str]) -> str | None:
    """The caller's key: `x-api-key` (Anthropic's clients; preferred when both are sent), else the
    bearer token. None for an anonymous caller."""
    key = headers.get("x-api-key")
    if key is not None:
        key = key.strip()
        return None if not key or key == ANONYMOUS else key
    return bearer_token(headers.get("Authorization"))


def invalid_key() -> GatewayError:
    return GatewayError(401, "invalid_api_key", "Invalid API key.", code="invalid_api_key")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def to_micros(usd: str | float | Decimal) -> int:
    return int((Decimal(str(usd)) * MICROS).to_integral_value())


@dataclass(slots=True)
class Account:
    id: int
    name: str
    balance_micros: int
    created_at: float
    revoked_at: float | None = None
    key_hint: str = ""

    @property
    def balance(self) -> float:
        """USD, for display only: arithmetic stays in integer micro-dollars.

        In the gateway, the balance already has this process's not-yet-written debits taken off."""
        return self.balance_micros / 1_000_000


def _private(path: str) -> None:
    """The database holds key hashes, the ledger and the secret behind the ledger's IP hashes: only
    its owner may read it. SQLite gives the -wal and -shm files the database's own mode."""
    if path == ":memory:" or path.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


class DatabaseError(ConfigError):
    """The key database cannot be opened; the message names it and says why."""


def connect(path: str) -> sqlite3.Connection:
    """Opens (and creates, 0600) the key database. DatabaseError, naming the path, when it cannot."""
    try:
        _private(path)
        db = _open(path)
    except (OSError, sqlite3.Error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatabaseError(f"cannot open the key database {os.path.abspath(path)}: {why}") from None
    return db


def check(path: str) -> None:
    """DatabaseError, naming the path, unless the database can be opened (or created) there. Creates
    nothing: `turnstile check-config` uses it."""
    where = os.path.abspath(path)
    if os.path.exists(path):
        try:
            version = sqlite3.connect(f"file:{path}?mode=rw", uri=True).execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open the key database {where}: {exc}") from None
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"the key database {where} is at schema version {version}, newer than this "
                                f"gateway's {SCHEMA_VERSION}: upgrade the gateway")
        return
    folder = os.path.dirname(where)
    if not os.path.isdir(folder):
        raise DatabaseError(f"cannot create the key database {where}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DatabaseError(f"cannot create the key database {where}: the directory {folder} is not writable")


def db_path(configured: str, env: Mapping[str, str] = os.environ) -> str:
    """The key database's path: TURNSTILE_KEYS_DB, else the config's `[keys] db`."""
    return env.get("TURNSTILE_KEYS_DB") or configured


def _open(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    # Turning WAL on takes a lock that SQLite does not wait for: a process opening a new database
    # while another does the same (workers starting together) is told "locked" at once. It retries
    # here for as long as the connection would wait for any other lock.
    deadline = time.monotonic() + 10
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints, no fsync per batch
    migrate(db)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('ip_secret', ?)", (secrets.token_hex(32),))
    return db


def ip_secret(db: sqlite3.Connection) -> bytes:
    """This installation's key for pseudonymising client IPs in the ledger."""
    return bytes.fromhex(db.execute("SELECT value FROM meta WHERE key = 'ip_secret'").fetchone()[0])


def create(db: sqlite3.Connection, name: str, balance_usd: str = "0") -> tuple[Account, str]:
    """A new account and its key; the key is returned once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    hint = key[:4] + "…" + key[-4:]  # enough to tell keys apart, too little to use
    cur = db.execute(
        "INSERT INTO accounts (name, key_hash, key_hint, balance_micros, created_at) VALUES (?, ?, ?, ?, ?)",
        (name, hash_key(key), hint, to_micros(balance_usd), now),
    )
    return Account(int(cur.lastrowid or 0), name, to_micros(balance_usd), now, None, hint), key


def list_accounts(db: sqlite3.Connection) -> list[Account]:
    rows = db.execute(
        "SELECT id, name, balance_micros, created_at, revoked_at, key_hint FROM accounts ORDER BY id"
    ).fetchall()
    return [Account(*row) for row in rows]


def set_balance(db: sqlite3.Connection, account_id: int, usd: str) -> bool:
    return db.execute("UPDATE accounts SET balance_micros = ? WHERE id = ?", (to_micros(usd), account_id)).rowcount == 1


def revoke(db: sqlite3.Connection, account_id: int) -> bool:
    cur = db.execute("UPDATE accounts SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), account_id))
    return cur.rowcount == 1


class KeyStore:
    """Live keys by hash, in memory; reloaded when the database changes.

    Debits of this process that the ledger has not written yet are kept aside (`unflushed`) and
    taken off every balance it loads, so a balance never jumps back up between two writes. So are
    the reservations of requests in flight (`reserved`): a paid request reserves its estimated cost
    before it is sent, and gives it back once its real cost is debited.
    """

    def __init__(self, path: str, refresh_interval: float = 1.0) -> None:
        self.path = path
        self.refresh_interval = refresh_interval
        self._by_hash: dict[str, Account] = {}
        self._by_id: dict[int, Account] = {}
        self.unflushed: dict[int, int] = {}
        self.reserved: dict[int, int] = {}
        self.lock = asyncio.Lock()  # one reload or ledger write at a time
        self._db: sqlite3.Connection | None = None
        self._version = -1
        self._checked = 0.0
        self._db_lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def lookup(self, key: str) -> Account | None:
        return self._by_hash.get(hash_key(key))

    def debit(self, account_id: int, micros: int) -> None:
        self.unflushed[account_id] = self.unflushed.get(account_id, 0) + micros
        account = self._by_id.get(account_id)
        if account is not None:
            account.balance_micros -= micros

    def reserve(self, account_id: int, micros: int) -> int | None:
        """Sets aside up to `micros` of the account's balance for a request about to be sent: what
        is left of the balance when that is less. None (refuse the request) when nothing is left.
        So a paid request is admitted only while reservations have not used the balance up, and
        the overspend is at most what the last admitted request costs beyond what was left."""
        account = self._by_id.get(account_id)
        if account is None or account.balance_micros <= 0:
            return None
        amount = max(min(micros, account.balance_micros), 1)
        account.balance_micros -= amount
        self.reserved[account_id] = self.reserved.get(account_id, 0) + amount
        return amount

    def release(self, account_id: int, micros: int) -> None:
        """Gives a reservation back (its request's real cost has been debited, or it cost nothing)."""
        left = self.reserved.get(account_id, 0) - micros
        if left > 0:
            self.reserved[account_id] = left
        else:
            self.reserved.pop(account_id, None)
        account = self._by_id.get(account_id)
        if account is not None:
            account.balance_micros += micros

    def _read_if_changed(self) -> list[tuple[str, Account]] | None:
        with self._db_lock:  # the connection is never closed under a thread still reading it
            return self._read_locked()

    def _read_locked(self) -> list[tuple[str, Account]] | None:
        if self._db is None:
            return None
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return None
        self._version = version
        rows = self._db.execute(
            "SELECT key_hash, id, name, balance_micros, created_at, key_hint FROM accounts WHERE revoked_at IS NULL"
        ).fetchall()
        return [(r[0], Account(r[1], r[2], r[3], r[4], None, r[5])) for r in rows]

    def _install(self, rows: list[tuple[str, Account]]) -> None:
        for _, account in rows:
            account.balance_micros -= self.unflushed.get(account.id, 0) + self.reserved.get(account.id, 0)
        self._by_hash = dict(rows)
        self._by_id = {a.id: a for _, a in rows}

    def open(self) -> None:
        self._db = connect(self.path)
        rows = self._read_if_changed()
        self._install(rows or [])

    async def recheck(self) -> bool:
        """An unknown key may have been created a moment ago: look again, at most ten times a second."""
        if time.monotonic() - self._checked < 0.1 or self._db is None:
            return False
        async with self.lock:
            return await self.refresh()

    async def refresh(self) -> bool:
        """Reload if another connection committed; the caller holds `lock`."""
        self._checked = time.monotonic()
        rows = await asyncio.to_thread(self._read_if_changed)
        if rows is None:
            return False
        self._install(rows)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                async with self.lock:
                    if await self.refresh():
                        log.debug("keys_reloaded", accounts=len(self._by_hash))
            except sqlite3.Error as exc:
                log.warning("keys_reload_failed", error=str(exc))

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self.open()
        task = asyncio.create_task(self._watch())
        yield
        async with self.lock:  # no reload half-way in its thread when the connection closes
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
