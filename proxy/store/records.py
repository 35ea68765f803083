"""What the store keeps: a ledger row and its columns, the accounts' columns, the schema both
backends share, and the pseudonym of an anonymous caller's IP."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from typing import Any, NamedTuple

from proxy.keys import Account, load_settings

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
