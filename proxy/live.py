"""The requests of this process as they finish, for the console's Live page (`/admin/v1/live`):
time, key, model asked and served, provider, status, latency, tokens and cost. Never a prompt or an
answer. Nothing is kept or built while nobody watches."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

RECENT = 50  # what a new watcher is shown first
QUEUE = 1000  # a watcher this far behind misses requests rather than holding memory


class Live:
    def __init__(self) -> None:
        self.watchers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def publish(self, event: dict[str, Any]) -> None:
        self.recent.append(event)
        for queue in self.watchers:
            if queue.qsize() < QUEUE:
                queue.put_nowait(event)

    def watch(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for event in self.recent:
            queue.put_nowait(event)
        self.watchers.add(queue)
        return queue

    def leave(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.watchers.discard(queue)

    def close(self) -> None:
        """At a graceful stop: every watcher's stream ends now, not when the grace period does."""
        for queue in self.watchers:
            queue.put_nowait(None)  # type: ignore[arg-type]
