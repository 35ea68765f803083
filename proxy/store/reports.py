"""The store's reads: spend, one request's row, usage grouped, the console's windows, and a whole
store for `turnstile store copy`. Written once over each backend's `_select` (`?` placeholders)."""

from __future__ import annotations

from typing import Any, AsyncIterator

from proxy.store.records import ACCOUNT_COLUMNS, COLUMNS, Row


class Reports:
    rows: list[Row]
    held_sql = "0"  # SQL of what an account's requests in flight hold, when the database holds it (PostgreSQL)

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
