"""The store in one SQLite file (WAL mode): the embedded default, for one machine.

SQLite calls block, so each runs in a worker thread. Keys and balances are kept in memory and
reloaded when another connection commits (`PRAGMA data_version`). Reservations are this process's
own, in memory: with several workers on one file, each holds the balance it last read, so
the overspend bound holds per worker (PostgreSQL holds reservations in the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import sqlite3
import threading
import time
from typing import Any

import structlog

from proxy.keys import Account, load_settings
from proxy.store import ACCOUNT_COLUMNS, COLUMNS, USAGE_INDEX, DatabaseError, Row, Store, StoreSettings, unavailable

log = structlog.get_logger("turnstile.store")

# A bool is stored as the integer it is either way; without an adapter, sqlite3 first asks it for
# `__adapt__` and `__conform__`: two AttributeErrors per bool column.
sqlite3.register_adapter(bool, int)

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
_SETTINGS = """
ALTER TABLE accounts ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS key_tags (account_id INTEGER NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (account_id, tag));
CREATE INDEX IF NOT EXISTS ledger_created ON ledger (created_at);
"""
MIGRATIONS: list[str] = [_SCHEMA, _SETTINGS, USAGE_INDEX]
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


def connect(path: str) -> sqlite3.Connection:
    """Opens (and creates, 0600) the database, migrated. DatabaseError, naming the path, when it cannot."""
    try:
        _private(path)
        db = _open(path)
    except (OSError, sqlite3.Error) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DatabaseError(f"cannot open the key database {os.path.abspath(path)}: {why}") from None
    return db


def check_file(path: str) -> None:
    """DatabaseError, naming the path, unless the database can be opened (or created) there. Creates
    nothing."""
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
    db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable at checkpoints; the journal covers a crash
    migrate(db)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('ip_secret', ?)", (secrets.token_hex(32),))
    return db


# Many rows per INSERT (`VALUES (…), (…), …`): SQLite takes a batch in a few steps, handing the GIL
# back and forth a few times per flush, not once per request. Batches are cut into power-of-two
# parts (700 rows: 512, 128, 32, 16, 8 and 4): ten statements, each compiled once and kept by
# sqlite3; a statement of a new size each flush would cost more to compile than to run.
_VALUES = "(" + ", ".join("?" * len(COLUMNS)) + ")"
_SIZES = [1 << n for n in range(9, -1, -1)]  # 512 rows per INSERT at most: 9,728 parameters


def _insert(rows: int) -> str:
    return f"INSERT OR IGNORE INTO ledger ({', '.join(COLUMNS)}) VALUES " + ", ".join([_VALUES] * rows)


_INSERTS = {size: _insert(size) for size in _SIZES}
_DEBIT = "UPDATE accounts SET balance_micros = balance_micros - ? WHERE id = ?"


def _parts(count: int, most: int) -> list[tuple[int, int]]:
    """(start, size) of each INSERT for `count` rows, the sizes powers of two, at most `most`."""
    parts, start = [], 0
    for size in _SIZES:
        if size > most:
            continue
        while count - start >= size:
            parts.append((start, size))
            start += size
    return parts


def _transaction(db: sqlite3.Connection, work: Any, *args: Any) -> Any:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db, *args)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _write(db: sqlite3.Connection, rows: list[Row], debits: dict[int, int]) -> None:
    # SQLite before 3.32 binds at most 999 parameters per statement: 32 rows.
    most = max(1, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS))
    for start, size in _parts(len(rows), most):
        db.execute(_INSERTS[size], list(itertools.chain.from_iterable(rows[start:start + size])))
    db.executemany(_DEBIT, [(micros, account) for account, micros in debits.items() if micros])


def _replay(db: sqlite3.Connection, rows: list[list[Any]]) -> int:
    inserted = 0
    for row in rows:
        if db.execute(_INSERTS[1], row).rowcount == 1:
            inserted += 1
            account, cost = row[1], row[11]
            if account is not None and cost:
                db.execute(_DEBIT, (cost, account))
    return inserted




class SQLiteStore(Store):
    backend = "sqlite"
    errors = (sqlite3.Error, OSError)
    day = "strftime('%Y-%m-%d', created_at, 'unixepoch')"

    def __init__(self, settings: StoreSettings, path: str) -> None:
        super().__init__(settings)
        self.path = path
        self.unflushed: dict[int, int] = {}  # debits recorded, not yet written
        self.reserved: dict[int, int] = {}  # held by this process's requests in flight
        self._db: sqlite3.Connection | None = None  # writes
        self._reader: sqlite3.Connection | None = None  # reports
        self._keys: sqlite3.Connection | None = None  # notices other connections' commits (data_version)
        self._read_lock = asyncio.Lock()
        self._db_lock = threading.Lock()  # the connections close only between two calls
        self._version = -1

    def describe(self) -> str:
        return os.path.abspath(self.path)

    def _journal_base(self) -> str:
        return self.settings.journal or self.path

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._db_lock:
            return fn(*args)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(self._locked, fn, *args)

    async def _select(self, sql: str, *args: Any) -> list[Any]:
        db = self._reader
        if db is None:
            raise unavailable()
        async with self._read_lock:
            try:
                return await self._run(lambda: db.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise unavailable() from exc

    async def open(self) -> None:
        self._db = connect(self.path)
        self._reader = connect(self.path)
        self._keys = connect(self.path)
        self.secret = bytes.fromhex(self._db.execute("SELECT value FROM meta WHERE key = 'ip_secret'").fetchone()[0])
        self.is_open = True
        self._install(self._read_if_changed() or [])

    async def close(self) -> None:
        with self._db_lock:  # after any thread still using a connection
            for db in (self._db, self._reader, self._keys):
                if db is not None:
                    db.close()
            self._db = self._reader = self._keys = None
            self.is_open = False

    async def migrate(self) -> tuple[int, int]:
        db = connect(self.path)  # which migrates, as `open` does
        try:
            return db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION
        finally:
            db.close()

    # Keys.
    def _read_if_changed(self) -> list[tuple[str, Account]] | None:
        with self._db_lock:
            if self._keys is None:
                return None
            version = self._keys.execute("PRAGMA data_version").fetchone()[0]
            if version == self._version:
                return None
            self._version = version
            rows = self._keys.execute(
                "SELECT key_hash, id, name, balance_micros, created_at, key_hint, settings FROM accounts "
                "WHERE revoked_at IS NULL"
            ).fetchall()
        return [(r[0], Account(r[1], r[2], r[3], r[4], None, r[5], load_settings(r[6]))) for r in rows]

    def _install(self, rows: list[tuple[str, Account]]) -> None:
        for _, account in rows:
            account.balance_micros -= self.unflushed.get(account.id, 0) + self.reserved.get(account.id, 0)
        self._by_hash = dict(rows)
        self._by_id = {a.id: a for _, a in rows}

    async def _refresh(self) -> bool:
        rows = await asyncio.to_thread(self._read_if_changed)
        if rows is None:
            return False
        self._install(rows)
        return True

    # Money: reservations and debits not yet written are this process's, in memory, and taken off
    # every balance it loads, so that a balance never jumps back up between two writes.
    async def reserve(self, account_id: int, request_id: str, micros: int) -> int | None:
        account = self._by_id.get(account_id)
        micros = max(micros, 1)
        if account is None or not (account.balance_micros >= micros or (account.balance_micros > 0 and
                                                                        not self.reserved.get(account_id))):
            return None
        amount = min(micros, account.balance_micros)
        account.balance_micros -= amount
        self.reserved[account_id] = self.reserved.get(account_id, 0) + amount
        return amount

    def release(self, account_id: int, request_id: str, micros: int) -> None:
        left = self.reserved.get(account_id, 0) - micros
        if left > 0:
            self.reserved[account_id] = left
        else:
            self.reserved.pop(account_id, None)
        account = self._by_id.get(account_id)
        if account is not None:
            account.balance_micros += micros

    async def held(self, account_id: int) -> tuple[int, int]:
        account = self._by_id.get(account_id)
        return (account.balance_micros if account else 0), self.reserved.get(account_id, 0)

    async def balance(self, account_id: int) -> int:
        account = self._by_id.get(account_id)
        return account.balance_micros if account else 0

    def record(self, row: Row) -> None:
        super().record(row)
        if row.account_id is not None and row.cost_micros:
            self.unflushed[row.account_id] = self.unflushed.get(row.account_id, 0) + row.cost_micros
            account = self._by_id.get(row.account_id)
            if account is not None:
                account.balance_micros -= row.cost_micros

    def _take(self) -> dict[int, int]:
        debits, self.unflushed = self.unflushed, {}
        return debits

    def _untake(self, debits: dict[int, int]) -> None:
        for account, micros in debits.items():
            self.unflushed[account] = self.unflushed.get(account, 0) + micros

    async def _write(self, rows: list[Row], debits: dict[int, int]) -> None:
        assert self._db is not None
        await self._run(_transaction, self._db, _write, rows, debits)

    async def _replay(self, rows: list[list[Any]], run: str) -> int:
        assert self._db is not None
        return int(await self._run(_transaction, self._db, _replay, rows))

    # Reports.
    # Accounts.
    async def _execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        assert self._db is not None
        return list(await self._run(_transaction, self._db,
                                    lambda db: [db.execute(sql, args).rowcount for sql, args in statements]))

    async def _insert_account(self, values: tuple[Any, ...]) -> int:
        assert self._db is not None
        cur = await self._run(self._db.execute, "INSERT INTO accounts (name, key_hash, key_hint, balance_micros, "
                              "created_at, settings) VALUES (?, ?, ?, ?, ?, ?)", values)
        return int(cur.lastrowid or 0)

    # Copying.
    async def load(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        columns = {"meta": ["key", "value"], "accounts": ACCOUNT_COLUMNS, "ledger": COLUMNS,
                   "key_tags": ["account_id", "tag"]}[table]
        sql = (f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})")
        assert self._db is not None
        await self._run(_transaction, self._db, lambda db: db.executemany(sql, rows))
