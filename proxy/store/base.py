"""What both store backends share: keys answered from memory and reloaded when the store changes,
reservations, ledger rows journaled and written in batches, and the gateway's life around them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import structlog
from aiohttp import web

from proxy.config import ConfigError
from proxy.errors import GatewayError
from proxy.keys import Account, hash_key
from proxy.store import journal
from proxy.store.accounts import Accounts
from proxy.store.records import COLUMNS, Row

log = structlog.get_logger("turnstile.store")

STOP_TRIES = 5  # writes tried at shutdown before rows are left to the journal


class DatabaseError(ConfigError):
    """The store cannot be opened; the message names it and says why."""


def unavailable() -> GatewayError:
    return GatewayError(503, "service_unavailable", "The key and billing store cannot be reached; retry shortly.",
                        code="store_unavailable")


@dataclass(slots=True)
class StoreSettings:
    url: str
    refresh_interval: float = 1.0
    flush_interval: float = 1.0
    journal: str = ""  # where this process's journal files go (a path prefix); "" = beside a SQLite file
    password: str = ""  # PostgreSQL's, from the environment
    pool_size: int = 10
    hold_ttl: float = 3600.0
    connect_wait: float = 30.0  # seconds a gateway waits at start-up for a PostgreSQL that is not up yet


class Store(Accounts):
    """What both backends share; each implements the methods that raise NotImplementedError."""

    backend = ""
    errors: tuple[type[BaseException], ...] = (OSError,)  # what the backend raises when it cannot be reached

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self._by_hash: dict[str, Account] = {}
        self._by_id: dict[int, Account] = {}
        self.rows: list[Row] = []  # recorded, not yet written
        self.lock = asyncio.Lock()  # one reload or write at a time
        self.secret = b""
        self.journal: journal.Journal | None = None
        self.is_open = False
        self._checked = 0.0
        self._rechecking: asyncio.Future[None] | None = None

    def describe(self) -> str:
        raise NotImplementedError

    # Opening and closing, and the schema.
    async def open(self) -> None:
        """Connects and brings the schema to this gateway's version."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def migrate(self) -> tuple[int, int]:
        """(version found, version now); run by `open` as well."""
        raise NotImplementedError

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Keys.
    def lookup(self, key: str) -> Account | None:
        return self._by_hash.get(hash_key(key))

    def name_of(self, account_id: int) -> str | None:
        """A live key's name, from memory (for the console's Live page)."""
        account = self._by_id.get(account_id)
        return account.name if account is not None else None

    async def recheck(self) -> None:
        """An unknown key may have been made a moment ago: look again. Every request that asks while
        a look is due or under way waits for that one; there are at most ten a second."""
        if not self.is_open:
            return
        pending = self._rechecking
        if pending is None:
            pending = self._rechecking = asyncio.ensure_future(self._recheck())
            pending.add_done_callback(self._rechecked)
        await asyncio.shield(pending)

    async def _recheck(self) -> None:
        wait = 0.1 - (time.monotonic() - self._checked)
        if wait > 0:
            await asyncio.sleep(wait)
        async with self.lock:
            await self.refresh()

    def _rechecked(self, done: asyncio.Future[None]) -> None:
        self._rechecking = None
        if not done.cancelled() and done.exception() is not None:
            log.warning("keys_reload_failed", error=type(done.exception()).__name__)

    async def refresh(self) -> bool:
        """Reloads the keys if the store changed; the caller holds `lock`."""
        self._checked = time.monotonic()
        return await self._refresh()

    async def _refresh(self) -> bool:
        raise NotImplementedError

    # Money.
    async def reserve(self, account_id: int, request_id: str, micros: int) -> int | None:
        """Sets aside `micros` (the most the request may cost) of the account's balance for a request
        about to be sent; or, when the balance is less and nothing else of the account is held, what
        is left of it. Else None: the request is refused.

        So at most one request is ever in flight on a partial reservation, and no other is admitted
        beside it unless its whole estimate fits: the balance goes below zero by less than one
        request's most cost, whatever the concurrency. GatewayError 503 when the store cannot be
        reached."""
        raise NotImplementedError

    def release(self, account_id: int, request_id: str, micros: int) -> None:
        """Gives a reservation back: its request's row is recorded, or it had nothing to bill."""
        raise NotImplementedError

    async def held(self, account_id: int) -> tuple[int, int]:
        """(balance left, held by requests in flight), micro-dollars, for a refusal's message."""
        raise NotImplementedError

    def provisional(self, row: tuple[Any, ...]) -> None:
        """A request whose answer has begun: its row as it would be if the process died now."""
        if self.journal is not None:
            self.journal.provisional(row)

    def record(self, row: Row) -> None:
        self.rows.append(row)
        if self.journal is not None:
            self.journal.final(row)

    async def flush(self) -> int:
        """Writes the pending rows; on any error they stay pending for the next try."""
        async with self.lock:
            if not self.rows and not self._settling():
                return 0
            rows, self.rows = self.rows, []
            batch = self._take()
            if self.journal is not None:  # the rows from here on go to a new journal
                self.journal.rotate()
            try:
                await self._write(rows, batch)
            except Exception as exc:  # noqa: BLE001 (whatever it is, the rows wait for the next try)
                cause = exc.__cause__ or exc  # the database's own error, under a 503's
                log.error("ledger_write_failed", rows=len(rows), error=f"{type(cause).__name__}: {cause}")
                self.rows[:0] = rows
                self._untake(batch)
                return 0
            if self.journal is not None:
                self.journal.committed()
            try:
                await self._written()
            except Exception as exc:  # noqa: BLE001 (written already: the next reload catches up)
                log.warning("keys_reload_failed", error=f"{type(exc).__name__}: {exc}")
            return len(rows)

    async def _written(self) -> None:
        """After a write: the balances in memory catch up with it."""
        await self.refresh()

    def _settling(self) -> bool:
        """Whether something other than rows waits for the next write (released reservations)."""
        return False

    def _take(self) -> Any:
        """What the next write settles besides the rows, taken from what waits."""
        return None

    def _untake(self, batch: Any) -> None:
        """Puts back what `_take` took, after a failed write."""

    async def _write(self, rows: list[Row], batch: Any) -> None:
        raise NotImplementedError

    async def _replay(self, rows: list[list[Any]], run: str) -> int:
        """A dead run's journal: each request's last row, inserted unless the ledger has it (its
        account debited only then), and the run's reservations given back. Returns rows inserted."""
        raise NotImplementedError

    # The gateway's life.
    def _journal_base(self) -> str:
        return self.settings.journal

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                async with self.lock:
                    if await self.refresh():
                        log.debug("keys_reloaded", accounts=len(self._by_hash))
                await self._tend()
            except Exception as exc:  # noqa: BLE001 (the store unreachable for a while: try again later)
                cause = exc.__cause__ or exc
                log.warning("keys_reload_failed", error=f"{type(cause).__name__}: {cause}")

    async def _tend(self) -> None:
        """Housekeeping the backend does every `refresh_interval`."""

    async def _flusher(self) -> None:
        """Never ends but by cancelling: an error of one flush is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 (flush logs its own; this is for what it did not foresee)
                log.exception("ledger_flush_failed", pending=len(self.rows))

    async def _recover(self) -> None:
        base = self._journal_base()
        inserted = 0
        for run in journal.dead_runs(base):
            try:
                inserted += await self._replay(run.rows(len(COLUMNS)), run.run)
                run.remove()
            finally:
                run.close()
        if inserted:
            log.warning("ledger_recovered_from_journal", rows=inserted)
            async with self.lock:
                await self.refresh()  # the recovered debits

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        await self.open()
        await self._recover()
        self.journal = journal.Journal(self._journal_base())
        self.journal.open()
        self._started()
        tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._flusher())]
        yield
        # A write may run in a thread that cancelling cannot stop: take the lock first, so that
        # none is half-way when the loops stop and the connections close.
        async with self.lock:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):  # cancelled, as it should be
                    await task
        written = 0
        for attempt in range(STOP_TRIES):  # a passing error (a locked database) gets a few more tries
            written = await self.flush()
            if not self.rows and not self._settling():
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        if self.rows:
            log.error("ledger_rows_left_in_the_journal", rows=len(self.rows))  # read back at the next start
        else:
            log.info("ledger_flushed_on_stop", rows=written)
        self.journal.close(empty=not self.rows)
        await self.close()

    def _started(self) -> None:
        """Called once the journal is open (its run names this process's reservations)."""
