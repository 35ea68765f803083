"""`turnstile usage`: the store's usage rows as a table for operators."""

from __future__ import annotations

import datetime as dt
from typing import Any

def parse_since(text: str) -> float:
    """`2026-11-01` or `2026-11-01T12:00` (UTC)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date: {text!r} (use YYYY-MM-DD)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def table(rows: list[dict[str, Any]], by: str) -> str:
    head = f"{by.upper():<40} {'REQUESTS':>9} {'PROMPT':>12} {'COMPLETION':>12} {'CACHED':>10} {'COST USD':>14}"
    lines = [head]
    for r in rows:
        lines.append(f"{str(r[by])[:40]:<40} {r['requests']:>9} {r['prompt_tokens']:>12} {r['completion_tokens']:>12} "
                     f"{r['cached_tokens']:>10} {r['cost_usd']:>14.6f}")
    total_cost = sum(r["cost_usd"] for r in rows)
    lines.append(f"{'TOTAL':<40} {sum(r['requests'] for r in rows):>9} {sum(r['prompt_tokens'] for r in rows):>12} "
                 f"{sum(r['completion_tokens'] for r in rows):>12} {sum(r['cached_tokens'] for r in rows):>10} {total_cost:>14.6f}")
    if by == "tag":
        lines.append("(a request counts once under each tag of its key)")
    return "\n".join(lines)
