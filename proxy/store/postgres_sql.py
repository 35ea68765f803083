"""The PostgreSQL store's schema, its migrations and the statements that move money, each one
statement so that the database does the arithmetic under its own locks."""

from __future__ import annotations

import functools
import itertools
import re

from proxy.store.records import COLUMNS, USAGE_INDEX

_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS account_revisions;
CREATE TABLE IF NOT EXISTS accounts (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_hint TEXT NOT NULL,
    balance_micros BIGINT NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION,
    revision BIGINT NOT NULL DEFAULT nextval('account_revisions'),
    holding INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS accounts_revision ON accounts (revision);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    account_id BIGINT,
    ip_hash TEXT,
    model_asked TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    estimated BOOLEAN NOT NULL,
    status INTEGER NOT NULL,
    ttfb_ms DOUBLE PRECISION,
    duration_ms DOUBLE PRECISION NOT NULL,
    finish_reason TEXT,
    streamed BOOLEAN NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_account ON ledger (account_id, created_at);
CREATE TABLE IF NOT EXISTS holds (
    request_id TEXT PRIMARY KEY,
    account_id BIGINT NOT NULL,
    micros BIGINT NOT NULL,
    run TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_account ON holds (account_id);
CREATE INDEX IF NOT EXISTS holds_run ON holds (run);
"""

# As for SQLite: MIGRATIONS[n - 1] takes the schema from version n - 1 to n, recorded in
# meta's `schema_version`. A new version is a new entry, never an edit of an old one.
_SETTINGS = """
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS settings TEXT NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS key_tags (account_id BIGINT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (account_id, tag));
CREATE INDEX IF NOT EXISTS ledger_created ON ledger (created_at);
"""
MIGRATIONS: list[str] = [_SCHEMA, _SETTINGS, USAGE_INDEX]
SCHEMA_VERSION = len(MIGRATIONS)
MIGRATION_LOCK = 0x7475726E  # an advisory lock: one instance migrates, the others wait for it

_TYPES = ["text", "bigint", "text", "text", "text", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint",
          "boolean", "integer", "float8", "float8", "text", "boolean", "float8"]
_UNNEST = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, start=1))
_N = len(COLUMNS)
# One statement per batch: the rows in (a row already there is skipped and debits nothing), the
# holds of the requests that ended out, each account moved by what its rows cost less what its
# holds had taken. Returns the rows inserted and the balances it moved.
WRITE = f"""
WITH ins AS (
    INSERT INTO ledger ({', '.join(COLUMNS)}) SELECT * FROM unnest({_UNNEST})
    ON CONFLICT (request_id) DO NOTHING RETURNING account_id, cost_micros
), rel AS (
    DELETE FROM holds WHERE request_id = ANY(${_N + 1}::text[]) OR run = ${_N + 2} OR created_at < ${_N + 3}
    RETURNING account_id, micros
), d AS (
    SELECT account_id, SUM(x) AS x, SUM(n) AS n FROM (
        SELECT account_id, cost_micros AS x, 0 AS n FROM ins WHERE account_id IS NOT NULL
        UNION ALL SELECT account_id, -micros, 1 FROM rel
    ) t GROUP BY account_id
), upd AS (
    UPDATE accounts SET balance_micros = accounts.balance_micros - d.x, holding = accounts.holding - d.n FROM d
    WHERE accounts.id = d.account_id AND (d.x <> 0 OR d.n <> 0) RETURNING accounts.id, accounts.balance_micros
)
SELECT (SELECT COUNT(*) FROM ins), (SELECT array_agg(id) FROM upd), (SELECT array_agg(balance_micros) FROM upd)
"""
# The whole estimate, or what is left of the balance when that is less and nothing else is held
# (the rule of `Store.reserve`). `holding` counts the account's holds in its own row, so that a
# reservation that waited for another's lock sees that one's hold.
RESERVE = """
WITH a AS (
    SELECT id, LEAST($2::bigint, balance_micros) AS amount FROM accounts
    WHERE id = $1 AND revoked_at IS NULL AND (balance_micros >= $2::bigint OR (balance_micros > 0 AND holding = 0))
    FOR UPDATE
), u AS (
    UPDATE accounts SET balance_micros = accounts.balance_micros - a.amount, holding = accounts.holding + 1
    FROM a WHERE accounts.id = a.id
    RETURNING a.amount, accounts.balance_micros
), h AS (
    INSERT INTO holds (request_id, account_id, micros, run, created_at) SELECT $3, $1, amount, $4, $5 FROM u
)
SELECT amount, balance_micros FROM u
"""


@functools.lru_cache(maxsize=64)
def numbered(sql: str) -> str:
    """The shared reads' `?` placeholders as PostgreSQL's `$1`, `$2`…"""
    count = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)
