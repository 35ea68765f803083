"""The ledger's journal: every row is appended to a file of this process before the ledger's next
batch write, so that a process killed at any moment (`kill -9`, the OOM killer) loses no billing.

- A request's row goes in twice: a provisional one when the first byte of its answer goes to the
  client (its cost estimated from the request, as for an answer cut short), and the real one when
  it is recorded. A line is a `write` system call: once it returns, the kernel has it, whatever
  happens to the process.
- Each batch write starts a new journal (carrying the provisional rows of requests still in
  flight) and removes the old one once its rows are committed.
- At start-up, the journals of processes that are gone are read back: for each request, its last
  row, inserted unless the ledger already has it, its account debited only then.

Each process has its own file (`<database>.journal.<pid>`): workers never write to each other's.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sqlite3
from typing import Any

import orjson
import structlog

log = structlog.get_logger("turnstile.ledger")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


class Journal:
    def __init__(self, database: str) -> None:
        self.base = f"{database}.journal.{os.getpid()}"
        self.path = self.base
        self._fd = -1
        self._turn = 0
        self.inflight: dict[str, bytes] = {}  # provisional lines of requests not yet recorded
        self.written: list[str] = []  # older journals, removed once their rows are committed

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def provisional(self, row: tuple[Any, ...]) -> None:
        line = orjson.dumps(row) + b"\n"
        self.inflight[row[0]] = line
        self._append(line)

    def final(self, row: tuple[Any, ...]) -> None:
        self.inflight.pop(row[0], None)
        self._append(orjson.dumps(tuple(row)) + b"\n")

    def _append(self, line: bytes) -> None:
        if self._fd >= 0:
            os.write(self._fd, line)

    def rotate(self) -> None:
        """A new journal for the rows after this point; the old one is removed by `committed`."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self.written.append(self.path)
        self._turn += 1
        self.path = f"{self.base}.{self._turn}"
        self.open()
        if self.inflight:
            os.write(self._fd, b"".join(self.inflight.values()))

    def committed(self) -> None:
        """The rows of every journal before the current one are in the database."""
        for path in self.written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.written.clear()

    def close(self, empty: bool) -> None:
        """At a graceful stop; `empty`: every row is written, nothing is in flight."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if empty and not self.inflight:
            self.written.append(self.path)
            self.committed()


def recover(db: sqlite3.Connection, database: str, insert: str, columns: int) -> int:
    """Reads back the journals of processes that are gone (a crash): for each request its last row,
    inserted unless the ledger has it, its account debited only then. Returns the rows inserted."""
    paths = []
    for path in sorted(glob.glob(glob.escape(database) + ".journal.*")):
        pid = path[len(database) + len(".journal."):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            paths.append(path)
    if not paths:
        return 0
    last: dict[str, list[Any]] = {}
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:  # a line cut by the crash
                    continue
                if isinstance(row, list) and len(row) == columns:
                    last[row[0]] = row
    inserted = 0
    db.execute("BEGIN IMMEDIATE")
    try:
        for row in last.values():
            if db.execute(insert, row).rowcount == 1:
                inserted += 1
                account, cost = row[1], row[11]
                if account is not None and cost:
                    db.execute("UPDATE accounts SET balance_micros = balance_micros - ? WHERE id = ?", (cost, account))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    log.warning("ledger_recovered_from_journal", rows=inserted, journals=len(paths))
    return inserted
