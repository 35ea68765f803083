"""The ledger: one row per request that reached a provider, written in batches off the hot path,
debiting each account by the rows' cost in the same transaction.

A graceful stop writes everything; a crash loses nothing: every row is in the process's journal
before the batch that writes it (`proxy/journal.py`), read back at the next start. Several gateway
processes may share one database: debits are `balance = balance - ?` in a write transaction, so
none is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import sqlite3
import threading
import time
from typing import Any, AsyncIterator, NamedTuple

import structlog
from aiohttp import web

from proxy import journal
from proxy.keys import KeyStore, connect, ip_secret

log = structlog.get_logger("turnstile.ledger")

STOP_TRIES = 5  # writes tried at shutdown before rows are given up (and logged as unwritten)

# A bool is stored as the integer it is either way; without an adapter, sqlite3 first asks it for
# `__adapt__` and `__conform__`: two AttributeErrors per bool column.
sqlite3.register_adapter(bool, int)


class Row(NamedTuple):
    """A tuple, so that a batch is bound to its INSERT as it is, without a Python step per column."""

    request_id: str
    account_id: int | None
    ip_hash: str | None
    model_asked: str
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    cost_micros: int
    estimated: bool
    status: int
    ttfb_ms: float | None
    duration_ms: float
    finish_reason: str | None
    streamed: bool
    created_at: float

    def public(self) -> dict[str, Any]:
        """OpenRouter's /generation fields that we have."""
        return {
            "id": self.request_id,
            "model": self.model,
            "model_asked": self.model_asked,
            "provider_name": self.provider,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
            "streamed": self.streamed,
            "cancelled": self.status == 499,
            "finish_reason": self.finish_reason,
            "tokens_prompt": self.prompt_tokens,
            "tokens_completion": self.completion_tokens,
            "native_tokens_reasoning": self.reasoning_tokens,
            "native_tokens_cached": self.cached_tokens,
            "native_tokens_cache_write": self.cache_write_tokens,
            "total_cost": self.cost_micros / 1_000_000,
            "usage_estimated": self.estimated,
            "status": self.status,
            "latency": self.ttfb_ms,
            "generation_time": self.duration_ms,
            "is_byok": False,
        }


COLUMNS = list(Row._fields)
# Many rows per INSERT (`VALUES (…), (…), …`): SQLite takes a batch in a few steps, handing the GIL
# back and forth a few times per flush, not once per request. Batches are cut into power-of-two
# parts (700 rows: 512, 128, 32, 16, 8 and 4): ten statements, each compiled once and kept by
# sqlite3; a statement of a new size each flush would cost more to compile than to run.
_VALUES = "(" + ", ".join("?" * len(COLUMNS)) + ")"
_SIZES = [1 << n for n in range(9, -1, -1)]  # 512 rows per INSERT at most: 9,728 parameters


def _insert(rows: int) -> str:
    return f"INSERT OR IGNORE INTO ledger ({', '.join(COLUMNS)}) VALUES " + ", ".join([_VALUES] * rows)


_INSERTS = {size: _insert(size) for size in _SIZES}


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


def ip_hash(secret: bytes, ip: str) -> str:
    """An anonymous caller's IP, pseudonymised: keyed BLAKE2b (a MAC) with this installation's secret,
    a third of HMAC-SHA256's cost per request."""
    return hashlib.blake2b(ip.encode("utf-8", "surrogateescape"), key=secret[:64], digest_size=16).hexdigest()


def _write(db: sqlite3.Connection, rows: list[Row], debits: dict[int, int]) -> None:
    # SQLite before 3.32 binds at most 999 parameters per statement: 32 rows.
    most = max(1, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS))
    db.execute("BEGIN IMMEDIATE")
    try:
        for start, size in _parts(len(rows), most):
            db.execute(_INSERTS[size], list(itertools.chain.from_iterable(rows[start:start + size])))
        db.executemany("UPDATE accounts SET balance_micros = balance_micros - ? WHERE id = ?",
                       [(micros, account) for account, micros in debits.items() if micros])
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Ledger:
    def __init__(self, keys: KeyStore, flush_interval: float = 1.0) -> None:
        self.keys = keys
        self.flush_interval = flush_interval
        self.rows: list[Row] = []
        self._db: sqlite3.Connection | None = None  # the writer's
        self._reader: sqlite3.Connection | None = None
        self._read_lock = asyncio.Lock()
        self.secret = b""
        self._db_lock = threading.Lock()
        self.journal: journal.Journal | None = None  # opened with the database

    def _locked(self, fn: Any, *args: Any) -> Any:
        """Runs in a worker thread; the connections close only between two such calls."""
        with self._db_lock:
            return fn(*args)

    def provisional(self, row: tuple[Any, ...]) -> None:
        """A request whose answer has begun: its row as it would be if the process died now."""
        if self.journal is not None:
            self.journal.provisional(row)

    def record(self, row: Row) -> None:
        self.rows.append(row)
        if self.journal is not None:
            self.journal.final(row)
        if row.account_id is not None and row.cost_micros:
            self.keys.debit(row.account_id, row.cost_micros)

    def pending(self, request_id: str) -> Row | None:
        return next((r for r in self.rows if r.request_id == request_id), None)

    async def flush(self) -> int:
        """Writes the pending rows; on any error they stay pending for the next try."""
        async with self.keys.lock:
            if not self.rows:
                return 0
            rows, self.rows = self.rows, []
            debits, self.keys.unflushed = self.keys.unflushed, {}
            if self.journal is not None:  # the rows from here on go to a new journal
                self.journal.rotate()
            assert self._db is not None
            try:
                await asyncio.to_thread(self._locked, _write, self._db, rows, debits)
            except Exception as exc:  # noqa: BLE001 (whatever it is, the rows wait for the next try)
                log.error("ledger_write_failed", rows=len(rows), error=f"{type(exc).__name__}: {exc}")
                self.rows[:0] = rows  # keep them for the next try
                for account, micros in debits.items():
                    self.keys.unflushed[account] = self.keys.unflushed.get(account, 0) + micros
                return 0
            if self.journal is not None:
                self.journal.committed()
            try:
                await self.keys.refresh()  # balances now include what was just written
            except Exception as exc:  # noqa: BLE001 (written already: the next reload catches up)
                log.warning("keys_reload_failed", error=f"{type(exc).__name__}: {exc}")
            return len(rows)

    async def _loop(self) -> None:
        """Never ends but by cancelling: an error of one flush is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 (flush logs its own; this is for what it did not foresee)
                log.exception("ledger_flush_failed", pending=len(self.rows))

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        self._db = connect(self.keys.path)
        self._reader = connect(self.keys.path)
        self.secret = ip_secret(self._db)
        if journal.recover(self._db, self.keys.path, _INSERTS[1], len(COLUMNS)):
            await self.keys.refresh()  # the recovered debits
        self.journal = journal.Journal(self.keys.path)
        self.journal.open()
        task = asyncio.create_task(self._loop())
        yield
        # A write runs in a thread that cancelling cannot stop: take the lock first, so that none is
        # half-way when the loop stops and the connections close.
        async with self.keys.lock:
            task.cancel()
            with contextlib.suppress(BaseException):  # cancelled, as it should be
                await task
        for attempt in range(STOP_TRIES):  # a passing error (a locked database) gets a few more tries
            written = await self.flush()
            if not self.rows:
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        if self.rows:
            log.error("ledger_rows_left_in_the_journal", rows=len(self.rows))  # read back at the next start
        else:
            log.info("ledger_flushed_on_stop", rows=written)
        if self.journal is not None:
            self.journal.close(empty=not self.rows)
        with self._db_lock:  # after any thread still using a connection
            self._db.close()
            self._reader.close()

    async def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        assert self._reader is not None
        db = self._reader
        async with self._read_lock:
            return await asyncio.to_thread(self._locked, lambda: db.execute(sql, args).fetchall())

    async def generation(self, request_id: str, account_id: int) -> Row | None:
        row = self.pending(request_id)
        if row is None:
            found = await self.query(f"SELECT {', '.join(COLUMNS)} FROM ledger WHERE request_id = ?", request_id)
            row = None
            if found:
                row = Row(*found[0])
                row = row._replace(estimated=bool(row.estimated), streamed=bool(row.streamed))
        if row is None or row.account_id != account_id:
            return None  # another caller's request is as good as unknown
        return row

    async def spent_micros(self, account_id: int) -> int:
        found = await self.query("SELECT COALESCE(SUM(cost_micros), 0) FROM ledger WHERE account_id = ?", account_id)
        return int(found[0][0]) + sum(r.cost_micros for r in self.rows if r.account_id == account_id)
