"""What happened to one request, and the one place it is recorded: the access line, the metrics and
(for a request that reached a provider) the ledger row.

The endpoint wrapper makes an `Outcome` for every request; the chat handler and the last stage fill
it as the request goes; `Recorder` takes it when the request is over, however it ended.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import structlog

from proxy.errors import GatewayError
from proxy.live import Live
from proxy.store import Row, Store, ip_hash
from proxy.meter import Meter, Prices, Usage, _TO_MICROS as TO_MICROS

HALF_MICRO = TO_MICROS // 2
from proxy.metrics import Metrics

log = structlog.get_logger("turnstile.forward")


@dataclass(slots=True)
class Outcome:
    route: str  # the endpoint ("chat", "models", …), a metrics label
    request_id: str
    started_at: float
    status: int = 0
    bytes_out: int = 0  # 0: the answer's own body length is taken
    # Chat requests: what was asked and by whom (set by the chat handler and the stages).
    requested_model: str = ""
    model: str = ""  # the model served, after auto models and fallbacks
    stream: bool = False
    account_id: int | None = None
    client_ip: str = ""
    request_bytes: int = 0
    # Filled by the last stage.
    provider: str = ""
    retries: int = 0
    fallbacks: list[str] = field(default_factory=list)  # models tried after the first, in order
    first_byte_at: float = 0.0
    usage: Usage | None = None
    cost_micros: int = 0
    finish_reason: str | None = None
    billable: bool = False  # it reached the last stage: it gets a ledger row
    reserved_micros: int = 0  # what the request set aside of its account's balance (given back when recorded)
    response_headers: dict[str, str] | None = None  # what every answer to the request carries (the limits left)

    def settle(self, meter: Meter) -> None:
        """Usage and cost from the meter. An answer that came without usage (the client left, the
        upstream broke) or with usage that cannot be believed is billed by estimate; failures before
        any output cost nothing."""
        if meter.doubted is not None:
            log.warning("usage_not_believed", request_id=self.request_id, provider=self.provider, model=self.model,
                        usage=repr(meter.doubted)[:300], billed="by estimate")
        if meter.usage is None and (self.first_byte_at or meter.doubted is not None) and (
                self.status < 400 or self.status in (499, 502)):
            meter.estimate(self.request_bytes, self.bytes_out)
        self.usage, self.finish_reason = meter.usage, meter.finish_reason
        self.cost_micros = meter.cost_micros if meter.usage else 0


Access = Callable[[dict[str, Any]], None]


class Recorder:
    """Feeds the access line, the metrics and the ledger from a finished request's `Outcome`."""

    def __init__(self, access: Access, metrics: Metrics | None, store: Store, live: Live | None = None) -> None:
        self.access = access
        self.metrics = metrics
        self.store = store
        self.live = live  # the console's Live page, fed only while someone watches it
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's, taken once it runs

    async def loop_ctx(self, app: object) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: the app's loop (`get_running_loop` costs a system call each time)."""
        self.loop = asyncio.get_running_loop()
        yield
        self.loop = None

    def after_reply(self, outcome: Outcome, method: str, path: str, error: GatewayError | None = None) -> None:
        """Records the request in the loop's next turn, after its answer is written."""
        if self.loop is None:
            self(outcome, method, path, error)
        else:
            self.loop.call_soon(self, outcome, method, path, error)

    def __call__(self, outcome: Outcome, method: str, path: str, error: GatewayError | None = None) -> None:
        now = time.monotonic()
        started, first = outcome.started_at, outcome.first_byte_at
        # Milliseconds to two decimals, rounded half up: `round(x, 2)` formats the float as decimal digits.
        ttfb = int((first - started) * 100_000 + 0.5) / 100 if first else None
        total = int((now - started) * 100_000 + 0.5) / 100
        fields: dict[str, Any] = {
            "request_id": outcome.request_id,
            "method": method,
            "path": path,
            "status": outcome.status,
            "ttfb_ms": ttfb,
            "total_ms": total,
            "bytes_out": outcome.bytes_out,
        }
        if outcome.model:
            fields["model"] = outcome.model
            if outcome.requested_model != outcome.model:
                fields["requested_model"] = outcome.requested_model
            fields["route"] = outcome.provider or None
            if outcome.retries:
                fields["retries"] = outcome.retries
            if outcome.fallbacks:
                fields["fallbacks"] = outcome.fallbacks
        self.access(fields)
        if self.metrics is not None:
            self.metrics.observe(outcome, now - started, error)
        if self.live is not None and self.live.watchers and outcome.model:  # refusals too: what fails shows
            self._publish(outcome, fields)
        try:
            if outcome.billable:
                self.store.record(self._row(outcome, ttfb, total))
        finally:
            if outcome.reserved_micros and outcome.account_id is not None:  # after the debit: never neither
                self.store.release(outcome.account_id, outcome.request_id, outcome.reserved_micros)

    def provisional(self, o: Outcome, prices: Prices) -> None:
        """The row of a request whose answer has just begun, as it stands: into the ledger's journal,
        so that the process dying before the answer ends does not leave it unbilled (its usage
        then estimated from the request, as for any answer cut short)."""
        # Written in one step, for every paid stream: the columns of `Row`, in order.
        prompt = o.request_bytes // 4
        cost = (prompt * prices.prompt + prices.request + HALF_MICRO) // TO_MICROS
        ms = int((time.monotonic() - o.started_at) * 100_000 + 0.5) / 100
        self.store.provisional((o.request_id, o.account_id, None, o.requested_model, o.model, o.provider, prompt,
                                 0, 0, 0, 0, cost, True, o.status, ms, ms, None, o.stream, time.time()))

    def _publish(self, o: Outcome, fields: dict[str, Any]) -> None:
        assert self.live is not None
        usage = o.usage
        self.live.publish({
            "time": time.time(), "request_id": o.request_id, "key": o.account_id,
            "key_name": self.store.name_of(o.account_id) if o.account_id is not None else None,
            "model_asked": o.requested_model, "model": o.model, "provider": o.provider or None, "status": o.status,
            "latency_ms": fields["total_ms"], "ttfb_ms": fields["ttfb_ms"], "streamed": o.stream,
            "prompt_tokens": usage.prompt if usage else 0, "completion_tokens": usage.completion if usage else 0,
            "cost_usd": o.cost_micros / 1_000_000,
        })

    def _row(self, o: Outcome, ttfb_ms: float | None, duration_ms: float) -> Row:
        usage = o.usage
        account = o.account_id
        # The columns of `Row`, in order, made as a tuple: a named tuple's keyword constructor is a
        # Python call with nineteen arguments to match.
        return tuple.__new__(Row, (  # type: ignore[type-var]
            o.request_id, account, None if account is not None else ip_hash(self.store.secret, o.client_ip),
            o.requested_model, o.model, o.provider,
            *((usage.prompt, usage.completion, usage.reasoning, usage.cached, usage.cache_write) if usage
              else (0, 0, 0, 0, 0)),
            o.cost_micros, bool(usage and usage.estimated), o.status, ttfb_ms, duration_ms,
            o.finish_reason, o.stream, time.time(),
        ))
