"""The store: accounts (their hashed keys and balances) and the ledger, behind one interface that
the auth stage, the free-model gate, `/key`, `/generation`, billing and the `turnstile` command use.

Two backends: SQLite (`sqlite:///path`, the embedded default, one machine) and PostgreSQL
(`postgresql://…`, shared by several gateways). What they share lives here:
- keys are answered from memory, reloaded when the store changes (`refresh_interval`), and looked
  up at once when an unknown key comes (a key made a moment ago elsewhere);
- ledger rows are written in batches off the request path, each first appended to this process's
  journal (`journal.py`), which the next start reads back if the process died;
- a paid request reserves the most it may cost before it is sent (`reserve`) and gives the
  reservation back once its real cost is recorded (`release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping, NamedTuple

import structlog
from aiohttp import web

from proxy.config import ConfigError
from proxy.errors import GatewayError
from proxy.keys import Account, KeySettings, dump_settings, hash_key, load_settings, new_key, to_micros
from proxy.store import journal

log = structlog.get_logger("turnstile.store")

STOP_TRIES = 5  # writes tried at shutdown before rows are left to the journal


class DatabaseError(ConfigError):
    """The store cannot be opened; the message names it and says why."""


def unavailable() -> GatewayError:
    return GatewayError(503, "service_unavailable", "The key and billing store cannot be reached; retry shortly.",
                        code="store_unavailable")


class Row(NamedTuple):
    """A ledger row. A tuple, so that a batch is bound to its INSERT as it is."""

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

    @classmethod
    def read(cls, values: Any) -> Row:
        """From a database row (SQLite keeps the two flags as integers)."""
        row = cls(*values)
        return row._replace(estimated=bool(row.estimated), streamed=bool(row.streamed))

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
ACCOUNT_COLUMNS = ["id", "name", "key_hash", "key_hint", "balance_micros", "created_at", "revoked_at", "settings"]
_ACCOUNT = "SELECT id, name, balance_micros, created_at, revoked_at, key_hint, settings FROM accounts"


def _account(row: Any) -> Account:
    return Account(row[0], row[1], row[2], row[3], row[4], row[5], load_settings(row[6]))


# Schema version 3 on either backend: usage over a time range read from the index alone (a week of
# 1,000,000 rows grouped in 70 ms, not 500).
USAGE_INDEX = """
DROP INDEX IF EXISTS ledger_created;
CREATE INDEX IF NOT EXISTS ledger_usage ON ledger
    (created_at, model, cost_micros, prompt_tokens, completion_tokens, cached_tokens, estimated);
"""


def ip_hash(secret: bytes, ip: str) -> str:
    """An anonymous caller's IP, pseudonymised: keyed BLAKE2b (a MAC) with this installation's secret,
    a third of HMAC-SHA256's cost per request."""
    return hashlib.blake2b(ip.encode("utf-8", "surrogateescape"), key=secret[:64], digest_size=16).hexdigest()


def since(days: int) -> float:
    """The start (UTC) of today, this week (from Monday) or this month, for 1, 7 and 30."""
    today = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if days == 7:
        today -= dt.timedelta(days=today.weekday())
    elif days == 30:
        today = today.replace(day=1)
    return today.timestamp()


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


class Store:
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

    # Reports.
    def _pending(self, account_id: int) -> list[Row]:
        return [r for r in self.rows if r.account_id == account_id]

    async def spent(self, account_id: int, periods: list[float]) -> list[int]:
        """Micro-dollars spent in all, then since each of `periods` (timestamps); rows not yet
        written included."""
        found = await self._spent(account_id, periods)
        pending = self._pending(account_id)
        totals = [found[0] + sum(r.cost_micros for r in pending)]
        for i, start in enumerate(periods, start=1):
            totals.append(found[i] + sum(r.cost_micros for r in pending if r.created_at >= start))
        return totals

    async def _select(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a read, `?` for each argument on either backend; GatewayError 503 when the
        database cannot answer."""
        raise NotImplementedError

    async def _spent(self, account_id: int, periods: list[float]) -> list[int]:
        sums = ", ".join(["COALESCE(SUM(CASE WHEN created_at >= ? THEN cost_micros END), 0)"] * len(periods))
        found = await self._select(f"SELECT COALESCE(SUM(cost_micros), 0), {sums} FROM ledger WHERE account_id = ?",
                                   *periods, account_id)
        return [int(v) for v in found[0]]

    async def balance(self, account_id: int) -> int:
        """The account's balance now, less what this process's requests in flight hold."""
        raise NotImplementedError

    async def generation(self, request_id: str, account_id: int) -> Row | None:
        row = next((r for r in self.rows if r.request_id == request_id), None)
        if row is None:
            row = await self._generation(request_id)
        if row is None or row.account_id != account_id:
            return None  # another caller's request is as good as unknown
        return row

    async def _generation(self, request_id: str) -> Row | None:
        found = await self._select(f"SELECT {', '.join(COLUMNS)} FROM ledger WHERE request_id = ?", request_id)
        return Row.read(found[0]) if found else None

    day = ""  # the SQL of a row's day (UTC), YYYY-MM-DD

    async def usage(self, by: str = "model", account: int | None = None, start: float | None = None,
                    end: float | None = None, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Requests, tokens and cost grouped by model, account, day (UTC) or tag (`team=search`: a
        request counts once under each tag its key has), dearest first."""
        group = {"model": "model", "account": "COALESCE(CAST(ledger.account_id AS TEXT), 'anonymous')",
                 "day": self.day, "tag": "key_tags.tag"}[by]
        join = " JOIN key_tags ON key_tags.account_id = ledger.account_id" if by == "tag" else ""
        where, args = [], []
        for clause, value in (("ledger.account_id = ?", account), ("ledger.created_at >= ?", start),
                              ("ledger.created_at < ?", end)):
            if value is not None:
                where.append(clause)
                args.append(value)
        page = f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit else ""
        found = await self._select(
            f"SELECT {group} AS k, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
            f"SUM(cost_micros), SUM(CASE WHEN estimated THEN 1 ELSE 0 END) FROM ledger{join} "
            f"{'WHERE ' + ' AND '.join(where) if where else ''} GROUP BY k ORDER BY SUM(cost_micros) DESC, k{page}", *args)
        return [
            {by: k, "requests": int(n), "prompt_tokens": int(p or 0), "completion_tokens": int(c or 0),
             "cached_tokens": int(ca or 0), "cost_usd": int(cost or 0) / 1_000_000, "estimated": int(e or 0)}
            for k, n, p, c, ca, cost, e in found
        ]

    # Accounts: the `turnstile keys` command and the admin API.
    touch = ""  # SQL that marks an account's row changed, for other instances' reloads (PostgreSQL)
    held_sql = "0"  # SQL of what an account's requests in flight hold, when the database holds it (PostgreSQL)

    async def _execute(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Writes, `?` placeholders, in one transaction: each statement's row count."""
        raise NotImplementedError

    async def _insert_account(self, values: tuple[Any, ...]) -> int:
        """INSERT of (name, key_hash, key_hint, balance_micros, created_at, settings): the new id."""
        raise NotImplementedError

    @staticmethod
    def _tags(account_id: int, settings: KeySettings | None) -> list[tuple[str, tuple[Any, ...]]]:
        """The account's tags as rows of `key_tags` (`team=search`), which `usage --by tag` joins."""
        statements: list[tuple[str, tuple[Any, ...]]] = [("DELETE FROM key_tags WHERE account_id = ?", (account_id,))]
        for name, value in (settings.tags if settings is not None else {}).items():
            statements.append(("INSERT INTO key_tags (account_id, tag) VALUES (?, ?)", (account_id, f"{name}={value}")))
        return statements

    async def create(self, name: str, balance_usd: str = "0", settings: KeySettings | None = None) -> tuple[Account, str]:
        """A new account and its key; the key is returned once and never stored."""
        key, digest, hint = new_key()
        now, micros = time.time(), to_micros(balance_usd)
        settings = None if settings is None or settings.empty() else settings
        account_id = await self._insert_account((name, digest, hint, micros, now, dump_settings(settings)))
        if settings is not None and settings.tags:
            await self._execute(self._tags(account_id, settings))
        return Account(account_id, name, micros, now, None, hint, settings), key

    async def account(self, account_id: int) -> Account | None:
        found = await self._select(_ACCOUNT + " WHERE id = ?", account_id)
        return _account(found[0]) if found else None

    async def accounts(self, limit: int | None = None, after: int = 0) -> list[Account]:
        """By id, from the one after `after`; all of them without `limit`."""
        rows = await self._select(_ACCOUNT + " WHERE id > ? ORDER BY id" + (f" LIMIT {int(limit)}" if limit else ""), after)
        return [_account(row) for row in rows]

    async def update(self, account_id: int, name: str | None = None, settings: KeySettings | None = None) -> bool:
        """A new name and/or new settings (the whole of them: merge with `KeySettings.merged` first)."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        if name is not None:
            statements.append((f"UPDATE accounts SET name = ?{self.touch} WHERE id = ?", (name, account_id)))
        if settings is not None:
            kept = None if settings.empty() else settings
            statements.append((f"UPDATE accounts SET settings = ?{self.touch} WHERE id = ?", (dump_settings(kept), account_id)))
            statements += self._tags(account_id, kept)
        if not statements:
            return await self.account(account_id) is not None
        return (await self._execute(statements))[0] == 1

    async def set_balance(self, account_id: int, usd: str) -> bool:
        # What ended before is written first (its cost is not taken off the new balance later), and
        # what requests in flight hold in the database is taken off (given back as they end, it
        # would add up).
        await self.flush()
        done = await self._execute([(f"UPDATE accounts SET balance_micros = ? - {self.held_sql}{self.touch} WHERE id = ?",
                                     (to_micros(usd), account_id))])
        return done[0] == 1

    async def top_up(self, account_id: int, usd: str) -> bool:
        """Adds to the balance (or takes off, for a negative amount), in the database."""
        done = await self._execute([(f"UPDATE accounts SET balance_micros = balance_micros + ?{self.touch} WHERE id = ?",
                                     (to_micros(usd), account_id))])
        return done[0] == 1

    async def revoke(self, account_id: int) -> bool:
        done = await self._execute([(f"UPDATE accounts SET revoked_at = ?{self.touch} WHERE id = ? AND revoked_at IS NULL",
                                     (time.time(), account_id))])
        return done[0] == 1

    async def window_spent(self, account_id: int, starts: list[float]) -> list[int]:
        """What the account spent since each of `starts`, rows not yet written included; reads only
        the rows since the earliest (a budget's check, on every request of its key)."""
        sums = ", ".join(["COALESCE(SUM(CASE WHEN created_at >= ? THEN cost_micros END), 0)"] * len(starts))
        found = await self._select(f"SELECT {sums} FROM ledger WHERE account_id = ? AND created_at >= ?",
                                   *starts, account_id, min(starts))
        pending = self._pending(account_id)
        return [int(v) + sum(r.cost_micros for r in pending if r.created_at >= start) for v, start in zip(found[0], starts)]

    async def window(self, start: float) -> list[Any]:
        """(created_at, status, tokens, cost_micros, duration_ms, ttfb_ms) of every request since
        `start`, oldest first, for the console's overview."""
        return await self._select("SELECT created_at, status, prompt_tokens + completion_tokens, cost_micros, duration_ms, "
                                  "ttfb_ms FROM ledger WHERE created_at >= ? ORDER BY created_at", start)

    async def names(self, account_ids: list[int]) -> dict[int, str]:
        if not account_ids:
            return {}
        marks = ", ".join("?" * len(account_ids))
        return {int(i): n for i, n in await self._select(f"SELECT id, name FROM accounts WHERE id IN ({marks})", *account_ids)}

    async def spent_by_key(self, account_ids: list[int]) -> dict[int, int]:
        """Each account's spend in all, for a page of keys."""
        if not account_ids:
            return {}
        marks = ", ".join("?" * len(account_ids))
        found = await self._select(f"SELECT account_id, SUM(cost_micros) FROM ledger WHERE account_id IN ({marks}) "
                                   "GROUP BY account_id", *account_ids)
        return {int(a): int(c or 0) for a, c in found}

    async def oldest(self, account_id: int, start: float) -> float | None:
        """The time of the account's first spending since `start` (when a sliding budget frees up)."""
        found = await self._select("SELECT MIN(created_at) FROM ledger WHERE account_id = ? AND created_at >= ? "
                                   "AND cost_micros > 0", account_id, start)
        return found[0][0] if found and found[0][0] is not None else None

    # `turnstile store copy`.
    async def dump(self) -> AsyncIterator[tuple[str, list[tuple[Any, ...]]]]:
        """("meta" | "accounts" | "ledger", rows) in batches, accounts with their key hashes."""
        yield "meta", [tuple(r) for r in await self._select("SELECT key, value FROM meta WHERE key = 'ip_secret'")]
        # Balances with what requests in flight hold added back: the copy has no reservations.
        columns = ", ".join(f"balance_micros + {self.held_sql}" if c == "balance_micros" else c for c in ACCOUNT_COLUMNS)
        yield "accounts", [tuple(r) for r in await self._select(f"SELECT {columns} FROM accounts ORDER BY id")]
        yield "key_tags", [tuple(r) for r in await self._select("SELECT account_id, tag FROM key_tags")]
        last = ""
        while True:
            rows = await self._select(f"SELECT {', '.join(COLUMNS)} FROM ledger WHERE request_id > ? "
                                      "ORDER BY request_id LIMIT 5000", last)
            if not rows:
                return
            yield "ledger", [tuple(Row.read(r)) for r in rows]
            last = rows[-1][0]

    async def load(self, table: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def is_empty(self) -> bool:
        found = await self._select("SELECT (SELECT COUNT(*) FROM accounts) + (SELECT COUNT(*) FROM ledger)")
        return bool(found[0][0] == 0)

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
