"""The store's accounts: made (the key shown once), read, renamed, set up, topped up and revoked,
for the `turnstile keys` command and the admin API."""

from __future__ import annotations

import time
from typing import Any

from proxy.keys import Account, KeySettings, dump_settings, new_key, to_micros
from proxy.store.records import _ACCOUNT, _account
from proxy.store.reports import Reports


class Accounts(Reports):
    touch = ""  # SQL that marks an account's row changed, for other instances' reloads (PostgreSQL)

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
