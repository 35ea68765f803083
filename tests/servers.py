"""A server of the tests' own (Redis, PostgreSQL), started for as long as a fixture needs it."""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, TypeVar


class Server(Protocol):
    def start(self) -> None: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=Server)


@contextlib.contextmanager
def running(server: S) -> Iterator[S]:
    server.start()
    try:
        yield server
    finally:
        server.close()
