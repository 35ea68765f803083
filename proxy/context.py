"""The typed context that travels the pipeline: the request's facts, which stages share and may change.

What happened to the request (status, provider, timings, usage) is not here: it goes into
`ctx.outcome`, filled by the last stage and recorded by the endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from proxy.catalog import Catalog, Model
    from proxy.errors import GatewayError
    from proxy.keys import Account
    from proxy.outcome import Outcome


@dataclass(slots=True)
class Native:
    """A request in another dialect than chat completions, as it came: a provider that speaks that
    dialect is sent it (`raw`, its model rewritten) rather than the chat request made from it.
    `reasoning` and `verbosity` are what that chat request had before any stage ran: a stage that
    changes them (an auto model's tier) changes the native request the same way."""

    dialect: str  # "messages" or "responses"
    body: dict[str, Any]
    raw: bytes
    reasoning: Any = None
    verbosity: Any = None
    untranslatable: GatewayError | None = None  # why it must be passed through (server tools…), if it must
    images: bool = False  # it holds images: a model that takes none is refused it, in the dialect's shape
    hosted_tools: bool = False  # it has tools other than functions (web search, a namespace, a shell…)


@dataclass(slots=True)
class Context:
    request: web.Request
    request_id: str
    catalog: Catalog
    body: dict[str, Any]
    stream: bool
    client_ip: str
    requested_model: str
    model: Model  # the catalog entry that will be served; stages may replace it (`use_model`)
    outcome: Outcome
    account: Account | None = None  # None = anonymous
    response_headers: dict[str, str] = field(default_factory=dict)  # on whatever answer the request gets
    outbound: Any = None  # turns the chat answer into the caller's dialect (proxy.dialects); None: chat
    native: Native | None = None  # the request as it came, when not chat completions: for passthrough

    @property
    def anonymous(self) -> bool:
        return self.account is None

    def use_model(self, model_id: str) -> None:
        """Switch the request to another catalog model (auto models, fallbacks)."""
        self.model = self.catalog.require(model_id)
        self.body["model"] = model_id
        self.outcome.model = model_id
