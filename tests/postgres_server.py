"""A real PostgreSQL server for the tests (Debian's package): initdb'd into a temporary folder and
started on a free loopback port, or taken from TURNSTILE_TEST_POSTGRES (postgresql://…). Each test
gets a database of its own."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterator

import pytest

from tests.servers import running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str | None:
    """Debian keeps the server's programs out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else shutil.which(name)


class PostgresServer:
    """A server of the tests' own, which a test may stop (as a crash would) and start again on the
    same port. PostgreSQL refuses to run as root: as root it runs as the package's `postgres` user."""

    def __init__(self) -> None:
        self.initdb, self.postgres = _binary("initdb"), _binary("postgres")
        if self.initdb is None or self.postgres is None:
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL is not installed; .ci/run installs it")
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.port = _free_port()
        self.url = f"postgresql://turnstile@127.0.0.1:{self.port}/postgres"
        self.workdir = tempfile.mkdtemp(prefix="turnstile-pg-")
        self.data = os.path.join(self.workdir, "data")
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            os.chmod(self.workdir, 0o755)
            shutil.chown(self.workdir, self.user)
        self.proc: subprocess.Popen[bytes] | None = None
        self._run([self.initdb, "-D", self.data, "-U", "turnstile", "--auth=trust", "-E", "UTF8", "--no-sync"])

    def _command(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else argv

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(self._command(argv), capture_output=True)
        if done.returncode:
            pytest.fail(f"{argv[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        probe = subprocess.run([_binary("pg_isready") or "pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
        return probe.returncode == 0

    def start(self) -> None:
        # fsync off: a test server's data need not survive the machine, only the process.
        self.proc = subprocess.Popen(
            self._command([self.postgres, "-D", self.data, "-p", str(self.port), "-h", "127.0.0.1", "-k", self.workdir,
                           "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=300"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("postgres did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            # The postmaster and its backends (under runuser, the postmaster is not the Popen's
            # process), all at once, as a crash would; then wait for them to be gone, since a new
            # postmaster refuses to start while any of them holds the old shared memory.
            pids: list[int] = []
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(self.data, "postmaster.pid")) as f:
                    pids.append(int(f.readline()))
            if pids:
                children = subprocess.run(["pgrep", "-P", str(pids[0])], capture_output=True, text=True).stdout
                pids += [int(p) for p in children.split()]
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
            deadline = time.monotonic() + 10
            while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.02)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


_counter = iter(range(1, 1 << 30))


def new_database(server_url: str) -> str:
    """A fresh database on the server, its URL."""
    import asyncpg

    name = f"t{os.getpid()}_{next(_counter)}"

    async def create() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    from proxy.store import run_sync

    run_sync(create)  # in a thread of its own: the test's loop may be running in this one
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a server (its `postgres` database); `new_database` makes a test's own."""
    if os.environ.get("TURNSTILE_TEST_POSTGRES"):
        yield os.environ["TURNSTILE_TEST_POSTGRES"]
        return
    with running(PostgresServer()) as server:
        yield server.url


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server for one test, started."""
    with running(PostgresServer()) as server:
        yield server


__all__ = ["PostgresServer", "new_database", "postgres_url", "own_postgres"]
