"""The typed context that travels the pipeline: stages talk to each other only through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from proxy.catalog import Catalog, Model
    from proxy.keys import Account
    from proxy.meter import Meter


@dataclass(slots=True)
class Context:
    request: web.Request
    request_id: str
    catalog: Catalog
    body: dict[str, Any]
    stream: bool
    client_ip: str
    requested_model: str
    model: Model  # the catalog entry that will be served; stages may replace it
    started_at: float = 0.0
    request_bytes: int = 0
    account: Account | None = None  # None = anonymous
    response_headers: dict[str, str] = field(default_factory=dict)
    provider: str = ""  # name of the provider that served the request
    first_byte_at: float = 0.0
    bytes_out: int = 0
    status: int = 0
    meter: Meter | None = None  # usage and cost, once the provider answers
    retries: int = 0
    fallbacks: list[str] = field(default_factory=list)  # models tried after the first, in order
    last_write: float = 0.0

    @property
    def anonymous(self) -> bool:
        return self.account is None

    def use_model(self, model_id: str) -> None:
        """Switch the request to another catalog model (auto models, fallbacks)."""
        self.model = self.catalog.require(model_id)
        self.body["model"] = model_id
