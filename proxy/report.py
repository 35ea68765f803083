"""`turnstile usage`: requests, tokens and cost from the ledger, grouped for operators."""

from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Any

GROUPS = {
    "model": "model",
    "account": "COALESCE(CAST(account_id AS TEXT), 'anonymous')",
    "day": "strftime('%Y-%m-%d', created_at, 'unixepoch')",
}


def parse_since(text: str) -> float:
    """`2026-11-01` or `2026-11-01T12:00` (UTC)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date: {text!r} (use YYYY-MM-DD)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def usage(db: sqlite3.Connection, by: str = "model", account: int | None = None, since: float | None = None) -> list[dict[str, Any]]:
    key = GROUPS[by]
    where, args = [], []
    if account is not None:
        where.append("account_id = ?")
        args.append(account)
    if since is not None:
        where.append("created_at >= ?")
        args.append(since)
    sql = (
        f"SELECT {key} AS k, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
        f"SUM(cost_micros), SUM(estimated) FROM ledger {'WHERE ' + ' AND '.join(where) if where else ''} "
        "GROUP BY k ORDER BY SUM(cost_micros) DESC, k"
    )
    return [
        {by: k, "requests": n, "prompt_tokens": p or 0, "completion_tokens": c or 0, "cached_tokens": ca or 0,
         "cost_usd": (cost or 0) / 1_000_000, "estimated": e or 0}
        for k, n, p, c, ca, cost, e in db.execute(sql, args).fetchall()
    ]


def table(rows: list[dict[str, Any]], by: str) -> str:
    head = f"{by.upper():<40} {'REQUESTS':>9} {'PROMPT':>12} {'COMPLETION':>12} {'CACHED':>10} {'COST USD':>14}"
    lines = [head]
    for r in rows:
        lines.append(f"{str(r[by])[:40]:<40} {r['requests']:>9} {r['prompt_tokens']:>12} {r['completion_tokens']:>12} "
                     f"{r['cached_tokens']:>10} {r['cost_usd']:>14.6f}")
    total_cost = sum(r["cost_usd"] for r in rows)
    lines.append(f"{'TOTAL':<40} {sum(r['requests'] for r in rows):>9} {sum(r['prompt_tokens'] for r in rows):>12} "
                 f"{sum(r['completion_tokens'] for r in rows):>12} {sum(r['cached_tokens'] for r in rows):>10} {total_cost:>14.6f}")
    return "\n".join(lines)
