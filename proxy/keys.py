"""Accounts and their API keys in SQLite. Keys are shown once and stored only as SHA-256 hashes.

The gateway answers lookups from memory and reloads when another process (the `turnstile keys`
command) commits a change, so a revoked key stops working within `refresh_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import AsyncIterator

import structlog
from aiohttp import web

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
)
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def to_micros(usd: str | float | Decimal) -> int:
    return int((Decimal(str(usd)) * MICROS).to_integral_value())


@dataclass(slots=True, frozen=True)
class Account:
    id: int
    name: str
    balance_micros: int
    created_at: float
    revoked_at: float | None = None
    key_hint: str = ""

    @property
    def balance(self) -> float:
        """USD, for display only: arithmetic stays in integer micro-dollars."""
        return self.balance_micros / 1_000_000


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(_SCHEMA)
    return db


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
    """Live keys by hash, in memory; reloaded when the database changes."""

    def __init__(self, path: str, refresh_interval: float = 1.0) -> None:
        self.path = path
        self.refresh_interval = refresh_interval
        self._by_hash: dict[str, Account] = {}
        self._db: sqlite3.Connection | None = None
        self._version = -1

    def lookup(self, key: str) -> Account | None:
        return self._by_hash.get(hash_key(key))

    def _reload_if_changed(self) -> bool:
        assert self._db is not None
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:
            return False
        rows = self._db.execute(
            "SELECT key_hash, id, name, balance_micros, created_at, key_hint FROM accounts WHERE revoked_at IS NULL"
        ).fetchall()
        self._by_hash = {r[0]: Account(r[1], r[2], r[3], r[4], None, r[5]) for r in rows}
        self._version = version
        return True

    def open(self) -> None:
        self._db = connect(self.path)
        self._reload_if_changed()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                if await asyncio.to_thread(self._reload_if_changed):
                    log.info("keys_reloaded", accounts=len(self._by_hash))
            except sqlite3.Error as exc:
                log.warning("keys_reload_failed", error=str(exc))

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self.open()
        task = asyncio.create_task(self._watch())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._db is not None:
            self._db.close()
