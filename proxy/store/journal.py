"""The ledger's journal: every row is appended to a file of this process before the ledger's next
batch write, so that a process killed at any moment (`kill -9`, the OOM killer) loses no billing.

- A request's row goes in twice: a provisional one when the first byte of its answer goes to the
  client (its cost estimated from the request, as for an answer cut short), and the real one when
  it is recorded. A line is a `write` system call: once it returns, the kernel has it, whatever
  happens to the process.
- Each successful batch write starts a new journal file (carrying the provisional rows of requests
  still in flight) and removes the old ones. While writes fail, the same file grows.
- At start-up, the journals of runs that are over are read back: for each request, its last row,
  inserted unless the ledger already has it, its account debited only then (the store does that).

Each run of a process has its own files (`<base>.journal.<run>.<turn>`, the base being the SQLite
file or `[ledger] journal`) and holds an exclusive `flock` on `<base>.journal.<run>.lock` while it
lives: a run whose lock can be taken is over, whatever its pid was (a container's PID 1 is PID 1 again after a restart).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
from typing import Any

import orjson
import structlog

log = structlog.get_logger("turnstile.ledger")


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)  # a line is written whole, but for a full disk or a signal
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


class Journal:
    def __init__(self, base: str) -> None:
        self.run = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.base = f"{base}.journal.{self.run}"
        self._turn = 0
        self.path = f"{self.base}.0"
        self._fd = -1
        self._lock = -1
        self.failed = False  # a write failed: logged once, the request goes on
        self.inflight: dict[str, bytes] = {}  # provisional lines of requests not yet recorded
        self.written: list[str] = []  # older files, removed once their rows are committed

    def open(self) -> None:
        self._lock = os.open(f"{self.base}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def provisional(self, row: tuple[Any, ...]) -> None:
        line = orjson.dumps(row) + b"\n"
        self.inflight[row[0]] = line
        self._append(line)

    def final(self, row: tuple[Any, ...]) -> None:
        self.inflight.pop(row[0], None)
        self._append(orjson.dumps(tuple(row)) + b"\n")

    def _append(self, line: bytes) -> None:
        """Never fails the request: a journal that cannot be written is logged (once), and the row
        still goes to the ledger's next batch as before."""
        if self._fd < 0:
            return
        try:
            _write_all(self._fd, line)
        except OSError as exc:
            if not self.failed:
                self.failed = True
                log.error("ledger_journal_write_failed", path=self.path, error=str(exc))
            return
        self.failed = False

    def rotate(self) -> None:
        """Before a batch write: the rows after this point go to a new file, and the current one is
        removed by `committed` once the batch is in. Not while an earlier batch failed (its file
        stays current until a write succeeds), nor when no new file can be opened."""
        if self._fd < 0 or self.written:
            return
        path = f"{self.base}.{self._turn + 1}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if self.inflight:
                _write_all(fd, b"".join(self.inflight.values()))
        except OSError as exc:
            log.error("ledger_journal_rotate_failed", path=path, error=str(exc))
            return
        old, self._fd = self._fd, fd
        os.close(old)
        self.written.append(self.path)
        self._turn += 1
        self.path = path

    def committed(self) -> None:
        """The rows of every file before the current one are in the database."""
        for path in self.written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.written.clear()

    def close(self, empty: bool) -> None:
        """At a graceful stop; `empty`: every row is written, nothing is in flight (the files go)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if empty and not self.inflight:
            self.written.append(self.path)
            self.committed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.base}.lock")
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _over(lock_path: str) -> int:
    """An open, locked descriptor of a run's lock file if that run is over; -1 if it lives."""
    try:
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _turn(path: str) -> int:
    tail = path.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else -1


class DeadRun:
    """The journal files of a run that is over, locked while they are read back."""

    def __init__(self, prefix: str, run: str, paths: list[str], lock: int) -> None:
        self.prefix, self.run, self.paths, self._lock = prefix, run, sorted(paths, key=_turn), lock

    def rows(self, columns: int) -> list[list[Any]]:
        """Each request's last row, in the order the files were written (a later line wins)."""
        last: dict[str, list[Any]] = {}
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    lines = f.read().split(b"\n")
            except FileNotFoundError:
                continue
            for line in lines:
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:  # a line cut by the crash
                    continue
                if isinstance(row, list) and len(row) == columns and isinstance(row[0], str):
                    last[row[0]] = row
        return list(last.values())

    def remove(self) -> None:
        """Once its rows are in the ledger."""
        for path in self.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.prefix}{self.run}.lock")

    def close(self) -> None:
        os.close(self._lock)


def dead_runs(base: str) -> list[DeadRun]:
    """The runs whose journals are left beside `base` and whose processes are over (a crash)."""
    prefix = base + ".journal."
    runs: dict[str, list[str]] = {}
    for path in glob.glob(glob.escape(prefix) + "*"):
        run, _, turn = path[len(prefix):].rpartition(".")
        if run and turn.isdigit():
            runs.setdefault(run, []).append(path)
    found = []
    for run, paths in runs.items():
        lock = _over(f"{prefix}{run}.lock")
        if lock >= 0:  # else a live run's (another worker's): not ours to read
            found.append(DeadRun(prefix, run, paths, lock))
    return found
