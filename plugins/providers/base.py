"""What a provider adapter is: it builds the upstream request and, if it translates, the answer.

Adapters do no I/O: `proxy.forward` owns the connection, timeouts and streaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol

if TYPE_CHECKING:
    from proxy.context import Context


@dataclass(slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes


class Provider(Protocol):
    """Built once at start-up from a `[[providers]]` row: `Adapter(name=, base_url=, api_key=, headers=)`."""

    name: str
    passthrough: bool  # True: the upstream speaks OpenAI chat completions; bytes are copied through

    def request(self, ctx: Context, upstream_model: str) -> UpstreamRequest: ...

    def translate_body(self, ctx: Context, body: bytes) -> bytes: ...

    def translate_stream(self, ctx: Context, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]: ...
