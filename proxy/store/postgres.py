"""The store in PostgreSQL (asyncpg, a pool): what several gateways share.

Every instance sees the same money because the money never leaves the database:
- a reservation is one statement that takes the amount off the balance and writes a hold, under
  the account row's lock, so two gateways cannot both spend the last of a balance;
- a batch of ledger rows is one statement that inserts them, deletes the holds of the requests
  that ended and moves each balance by the difference (`balance - cost + hold`);
- keys are kept in memory and reloaded from the rows whose `revision` moved (every key change takes
  a new one from a sequence), a second's worth of them read again each time so that a change
  committed late is not missed.

A request whose process died keeps its hold until that process's journal is read back (its run's
holds are given back then) or, if it never is, for `hold_ttl` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any, AsyncIterator

import asyncpg
import structlog

from proxy.keys import Account, invalid_key, load_settings
from proxy.store import (ACCOUNT_COLUMNS, COLUMNS, DatabaseError, Row, Store, StoreSettings, redacted,
                         unavailable)
from proxy.store.postgres_sql import MIGRATION_LOCK, MIGRATIONS, RESERVE, SCHEMA_VERSION, WRITE, numbered

log = structlog.get_logger("turnstile.store")


_NEVER = -1.0  # a hold's created_at is never below it: no hold is swept
SETTLE_SOON = 0.05  # seconds from a request's end to the write that gives its reservation back


class PostgresStore(Store):
    backend = "postgresql"
    errors = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError)
    day = "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"

    def __init__(self, settings: StoreSettings) -> None:
        super().__init__(settings)
        self.pool: asyncpg.Pool | None = None
        self.down = False  # the last call failed: logged once, and once more when one succeeds
        self.released: list[str] = []  # request ids whose holds the next write gives back
        self.run = ""  # this process's journal run: its holds are named after it
        self._soon: asyncio.TimerHandle | None = None
        self._settling_tasks: set[asyncio.Task[int]] = set()
        self._floor = self._top = 0  # keys: the revisions read by the last reload were above _floor, up to _top
        self._swept = time.monotonic()

    def describe(self) -> str:
        return redacted(self.settings.url)

    def _journal_base(self) -> str:
        return self.settings.journal or "turnstile-ledger"

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; GatewayError 503 (the original as its cause) when the database
        cannot be reached or fails."""
        if self.pool is None:
            raise unavailable()
        try:
            async with self.pool.acquire(timeout=5) as conn:
                yield conn
        except self.errors as exc:
            if not self.down:
                self.down = True
                log.error("store_unavailable", store=self.describe(), error=f"{type(exc).__name__}: {exc}"[:300])
            raise unavailable() from exc
        if self.down:
            self.down = False
            log.warning("store_recovered", store=self.describe())

    async def open(self) -> None:
        # A server still starting (compose, a pod beside its database) is waited for, a while;
        # a refusal that waiting will not change (a wrong password, no such database) is not.
        deadline = time.monotonic() + self.settings.connect_wait
        while True:
            try:
                # min_size 0: no pool "floor" to restore, and no tracebacks logged, while the server is away.
                self.pool = await asyncpg.create_pool(
                    self.settings.url, password=self.settings.password or None, min_size=0,
                    max_size=self.settings.pool_size, command_timeout=5, timeout=5,
                )
                async with self.pool.acquire(timeout=5):
                    pass
                break
            except (*self.errors, ValueError) as exc:
                if self.pool is not None:
                    await self.close()
                waiting = isinstance(exc, (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError))
                if not waiting or time.monotonic() > deadline:
                    raise DatabaseError(f"cannot open the store {self.describe()}: {type(exc).__name__}: "
                                        f"{redacted(str(exc))}") from None
                log.warning("store_waiting", store=self.describe(), error=type(exc).__name__)
                await asyncio.sleep(1)
        try:
            await self._migrate()
            async with self._conn() as conn:
                await conn.execute("INSERT INTO meta (key, value) VALUES ('ip_secret', $1) ON CONFLICT (key) DO NOTHING",
                                   secrets.token_hex(32))
                self.secret = bytes.fromhex(await conn.fetchval("SELECT value FROM meta WHERE key = 'ip_secret'"))
            self.is_open = True
            await self.refresh()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self.is_open = False
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        for task in list(self._settling_tasks):
            with contextlib.suppress(BaseException):
                await task
        if self.pool is not None:
            pool, self.pool = self.pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)

    async def _migrate(self) -> tuple[int, int]:
        async with self._conn() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                found = int(await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'") or 0)
                if found > SCHEMA_VERSION:
                    raise DatabaseError(f"the store {self.describe()} is at schema version {found}, newer than "
                                        f"this gateway's {SCHEMA_VERSION}: upgrade the gateway")
                for version in range(found + 1, SCHEMA_VERSION + 1):
                    await conn.execute(MIGRATIONS[version - 1])
                    await conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', $1) "
                                       "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", str(version))
                    if found:
                        log.info("store_migrated", version=version)
        return found, SCHEMA_VERSION

    async def migrate(self) -> tuple[int, int]:
        return await self._migrate()

    # Keys.
    async def _refresh(self) -> bool:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT key_hash, id, name, balance_micros, created_at, key_hint, revoked_at, revision, "
                                    "settings FROM accounts WHERE revision > $1", self._floor)
        changed = False
        for digest, id_, name, balance, created, hint, revoked, _, settings in rows:
            known = self._by_hash.get(digest)
            if revoked is not None:
                changed |= self._by_hash.pop(digest, None) is not None
                self._by_id.pop(id_, None)
            else:
                account = Account(id_, name, balance, created, None, hint, load_settings(settings))
                if account != known:
                    self._by_hash[digest] = self._by_id[id_] = account
                    changed = True
        # Each row is read by two reloads in a row: a change that took its revision before one
        # already seen, but committed after it, is read by the next.
        self._floor, self._top = self._top, max((r[7] for r in rows), default=self._top)
        return changed

    # Money.
    def _started(self) -> None:
        assert self.journal is not None
        self.run = self.journal.run

    async def reserve(self, account_id: int, request_id: str, micros: int) -> int | None:
        # Shielded: a client that leaves while the statement runs must not leave its hold behind
        # (committed, but never given back). Its reservation is given back once it is known.
        done = asyncio.ensure_future(self._reserve_or_settle(account_id, request_id, micros))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result() is None
                                   or self.release(account_id, request_id, 0))
            raise

    async def _reserve_or_settle(self, account_id: int, request_id: str, micros: int) -> int | None:
        amount = await self._reserve(account_id, request_id, micros)
        if amount is None and self.released:
            # Requests of this process that ended still hold their reservations until the next
            # write gives them back: write now rather than refuse a client whose last request ended.
            await self.flush()
            amount = await self._reserve(account_id, request_id, micros)
        return amount

    async def _reserve(self, account_id: int, request_id: str, micros: int) -> int | None:
        async with self._conn() as conn:
            found = await conn.fetchrow(RESERVE, account_id, micros, request_id, self.run, time.time())
        if found is None:
            return None
        self._balance(account_id, found[1])
        return int(found[0])

    def _balance(self, account_id: int, micros: int) -> None:
        """The balance the database just gave, for what reads it from memory (kilo-auto's choice)."""
        account = self._by_id.get(account_id)
        if account is not None:
            account.balance_micros = int(micros)

    def release(self, account_id: int, request_id: str, micros: int) -> None:
        self.released.append(request_id)
        if self._soon is None:  # given back within SETTLE_SOON, for any instance to see, not at the next flush
            self._soon = asyncio.get_running_loop().call_later(SETTLE_SOON, self._settle_soon)

    def _settle_soon(self) -> None:
        self._soon = None
        task = asyncio.ensure_future(self.flush())
        self._settling_tasks.add(task)
        task.add_done_callback(self._settling_tasks.discard)

    async def held(self, account_id: int) -> tuple[int, int]:
        await self._settle_now()
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT balance_micros, (SELECT COALESCE(SUM(micros), 0) FROM holds "
                                      "WHERE account_id = $1), revoked_at FROM accounts WHERE id = $1", account_id)
        if row is None or row[2] is not None:  # revoked on another instance a moment ago
            raise invalid_key()
        self._balance(account_id, row[0])
        return int(row[0]), int(row[1])

    async def balance(self, account_id: int) -> int:
        await self._settle_now()
        async with self._conn() as conn:
            return int(await conn.fetchval("SELECT balance_micros FROM accounts WHERE id = $1", account_id) or 0)

    async def _settle_now(self) -> None:
        """Before a balance is reported: what this process's ended requests cost, and the
        reservations they give back, are written first."""
        if self.rows or self.released:
            await self.flush()

    def _settling(self) -> bool:
        return bool(self.released)

    async def _written(self) -> None:
        """Nothing to reload: the write returned the balances it moved."""

    def _take(self) -> list[str]:
        released, self.released = self.released, []
        return released

    def _untake(self, released: list[str]) -> None:
        self.released[:0] = released

    async def _settle(self, rows: list[Any], released: list[str], run: str | None, older: float) -> int:
        columns = list(zip(*rows)) if rows else [()] * len(COLUMNS)
        async with self._conn() as conn:
            inserted, ids, balances = await conn.fetchrow(WRITE, *columns, released, run, older)
        for account_id, micros in zip(ids or (), balances or ()):
            self._balance(account_id, micros)
        return int(inserted)

    async def _write(self, rows: list[Row], released: list[str]) -> None:
        await self._settle(rows, released, None, _NEVER)

    async def _replay(self, rows: list[list[Any]], run: str) -> int:
        for row in rows:  # JSON has no integer/float distinction to keep: as the columns want them
            row[14] = None if row[14] is None else float(row[14])
            row[15], row[18] = float(row[15]), float(row[18])
        return await self._settle(rows, [], run, _NEVER)

    async def _tend(self) -> None:
        """Once a minute: holds older than `hold_ttl` (their process died and its journal was never
        read back) are given back."""
        if time.monotonic() - self._swept < 60:
            return
        self._swept = time.monotonic()
        async with self.lock:
            await self._settle([], [], None, time.time() - self.settings.hold_ttl)

    # Reports.
    async def _select(self, sql: str, *args: Any) -> list[Any]:
        async with self._conn() as conn:
            return list(await conn.fetch(numbered(sql), *args))

    # Accounts.
    touch = ", revision = nextval('account_revisions')"
    held_sql = "(SELECT COALESCE(SUM(micros), 0) FROM holds WHERE holds.account_id = accounts.id)"

    async def _execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        counts = []
        async with self._conn() as conn:
            async with conn.transaction():
                for sql, args in statements:
                    done = await conn.execute(numbered(sql), *args)
                    counts.append(int(done.rsplit(" ", 1)[-1]))
        return counts

    async def _insert_account(self, values: tuple[Any, ...]) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval("INSERT INTO accounts (name, key_hash, key_hint, balance_micros, created_at, "
                                           "settings) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id", *values))

    # Copying.
    async def load(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        async with self._conn() as conn:
            async with conn.transaction():
                if table == "meta":
                    await conn.executemany("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) "
                                           "DO UPDATE SET value = EXCLUDED.value",
                                           [r for r in rows if r[0] != "schema_version"])
                    return
                columns = {"accounts": ACCOUNT_COLUMNS, "ledger": COLUMNS, "key_tags": ["account_id", "tag"]}[table]
                if table == "ledger":
                    rows = [tuple(Row.read(r)) for r in rows]
                await conn.copy_records_to_table(table, records=rows, columns=columns)
                if table == "accounts":  # new accounts number on from the copied ones
                    await conn.execute("SELECT setval(pg_get_serial_sequence('accounts', 'id'), "
                                       "GREATEST((SELECT MAX(id) FROM accounts), 1))")
