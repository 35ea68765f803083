"""Open-loop load in Python, for what closed-loop wrk hides: fixed-rate latency (requests keep being
sent on schedule whether or not earlier ones finished), time to first byte, and many slow streams."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, whole response
    ttfb: list[float] = field(default_factory=list)  # seconds, first body byte
    errors: int = 0
    max_gap: float = 0.0  # longest pause between two chunks of one stream, seconds
    elapsed: float = 0.0

    def pct(self, values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], out: Result) -> None:
    start = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            first = last = None
            async for _ in resp.content.iter_any():
                now = time.perf_counter()
                if first is None:
                    first = now
                elif now - (last or now) > out.max_gap:
                    out.max_gap = now - (last or now)
                last = now
            if resp.status != 200:
                out.errors += 1
                return
    except aiohttp.ClientError:
        out.errors += 1
        return
    out.latencies.append(time.perf_counter() - start)
    out.ttfb.append((first or time.perf_counter()) - start)


async def fixed_rate(url: str, body: bytes, headers: dict[str, str], rate: float, seconds: float) -> Result:
    """Send `rate` requests per second for `seconds`, on schedule."""
    out = Result()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, url, body, headers, out)))
        await asyncio.gather(*tasks)
        out.elapsed = time.perf_counter() - start
    return out


async def concurrent(url: str, body: bytes, headers: dict[str, str], count: int, total: int | None = None) -> Result:
    """`count` requests at a time until `total` have been made (default: one round)."""
    out = Result()
    total = total or count
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        queue = iter(range(total))

        async def worker() -> None:
            for _ in queue:
                await _one(session, url, body, headers, out)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(count)))
        out.elapsed = time.perf_counter() - start
    return out
