"""Reading a test's store as it is in the database, whichever backend holds it."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from proxy.store import is_postgres, run_sync


def query(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows as dicts; `?` placeholders on both backends."""
    if not is_postgres(url):
        db = sqlite3.connect(url)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(sql, args)]
        finally:
            db.close()
    import asyncpg

    numbered = iter(range(1, 1000))
    sql = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)

    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return run_sync(fetch)  # in a thread of its own: the test's loop may be running in this one


def ledger_rows(url: str) -> list[dict[str, Any]]:
    return query(url, "SELECT * FROM ledger ORDER BY created_at")


def balance(url: str, account_id: int = 1) -> int:
    return int(query(url, "SELECT balance_micros FROM accounts WHERE id = ?", account_id)[0]["balance_micros"])
