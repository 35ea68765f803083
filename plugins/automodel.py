"""Resolves virtual `kilo-auto/*` models to real ones before any gating.

A tier picks by the `x-kilocode-mode` header (`modes`, `default`), by the account's balance
(`paid`, `free`) or by a sticky weighted split (`weights`), and may inject `reasoning` and
`verbosity`; `dialects` names the model for requests that came as Messages or Responses. Reads ctx.request headers, ctx.account, ctx.client_ip; writes ctx.model and ctx.body.
"""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web

from proxy.catalog import Catalog
from proxy.config import ConfigError
from proxy.context import Context
from proxy.errors import GatewayError
from proxy.pipeline import Next

_OPUS, _SONNET = "anthropic/claude-opus-4.7", "anthropic/claude-sonnet-4.6"

DEFAULT_TIERS: dict[str, dict[str, Any]] = {
    "kilo-auto/frontier": {
        "modes": {m: _OPUS for m in ("claw", "plan", "general", "architect", "orchestrator", "ask", "debug")}
        | {m: _SONNET for m in ("build", "explore", "code")},
        "default": _SONNET,
        "reasoning": {"enabled": True, "effort": "medium"},
        "verbosity": "medium",
    },
    # The hosted gateway's balanced tier picks by the API called: Messages callers get Claude Haiku.
    "kilo-auto/balanced": {"default": "openai/gpt-5.3-codex", "reasoning": {"enabled": True, "effort": "low"},
                           "dialects": {"messages": "anthropic/claude-haiku-4.5"}},
    "kilo-auto/free": {"weights": {"minimax/minimax-m2.5:free": 80, "stepfun/step-3.5-flash:free": 20}},
    "kilo-auto/small": {"paid": "google/gemma-4-31b-it", "free": "google/gemma-4-26b-a4b-it:free"},
}

_KEYS = {"name", "modes", "default", "weights", "paid", "free", "reasoning", "verbosity", "dialects"}
_CLAW_FEATURES = ("kiloclaw", "openclaw")


class _Tier:
    def __init__(self, tier_id: str, spec: dict[str, Any], catalog: Catalog) -> None:
        where = f"automodel: tier {tier_id!r}"
        unknown = set(spec) - _KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: {', '.join(sorted(_KEYS))})")
        self.id = tier_id
        self.modes: dict[str, str] = {k.strip().lower(): v for k, v in spec.get("modes", {}).items()}
        self.default: str | None = spec.get("default")
        self.paid: str | None = spec.get("paid")
        self.free: str | None = spec.get("free")
        self.reasoning: dict[str, Any] | None = spec.get("reasoning")
        self.verbosity: str | None = spec.get("verbosity")
        # The model for a request in another dialect ("messages", "responses"), over the rest.
        self.dialects: dict[str, str] = dict(spec.get("dialects", {}))
        weights = spec.get("weights", {})
        if not all(isinstance(w, int) and w >= 0 for w in weights.values()):
            raise ConfigError(f"{where}: weights must be whole numbers")
        # Cumulative buckets, sorted so the split does not depend on table order.
        self.buckets: list[tuple[int, str]] = []
        total = 0
        for model_id in sorted(weights):
            total += weights[model_id]
            self.buckets.append((total, model_id))
        self.total = total
        kinds = [bool(self.default or self.modes), bool(self.paid and self.free), bool(weights)]
        if sum(kinds) != 1:
            raise ConfigError(f"{where}: give exactly one of default/modes, paid+free, or weights")
        if self.modes and not self.default:
            raise ConfigError(f"{where}: `modes` needs a `default` for unknown and absent modes")
        targets = [*self.modes.values(), self.default, self.paid, self.free, *weights, *self.dialects.values()]
        for target in filter(None, targets):
            if catalog.get(target) is None:
                raise ConfigError(f"{where}: target model {target!r} is not in the catalog")
        if catalog.get(tier_id) is None:
            base = catalog.require(next(filter(None, targets))).entry
            catalog.update([{**base, "id": tier_id, "name": spec.get("name", tier_id), "routes": {}}])

    def pick(self, ctx: Context) -> str:
        if ctx.native is not None and ctx.native.dialect in self.dialects:
            return self.dialects[ctx.native.dialect]
        if self.buckets:
            return self._weighted(ctx)
        if self.paid and self.free:
            paid = ctx.account is not None and ctx.account.balance_micros > 0
            return self.paid if paid else self.free
        return self.modes.get(_mode(ctx.request), self.default) or self.default or ""

    def _weighted(self, ctx: Context) -> str:
        headers = ctx.request.headers
        sticky = headers.get("x-kilocode-taskid") or (f"account:{ctx.account.id}" if ctx.account else ctx.client_ip)
        if self.total:
            digest = hashlib.sha256(f"{self.id}\0{sticky}".encode("utf-8", "surrogateescape")).digest()
            point = int.from_bytes(digest[:8], "big") % self.total
            chosen = next(model_id for bound, model_id in self.buckets if point < bound)
            if ctx.catalog.get(chosen) is not None:
                return chosen
            # The chosen model left the catalog (a sync dropped it): any remaining candidate will do.
            for _, model_id in self.buckets:
                if ctx.catalog.get(model_id) is not None:
                    return model_id
        message = (
            f"No free models are currently available for {self.id}. Please try again later, "
            "or switch to kilo-auto/balanced for affordable paid inference."
        )
        raise GatewayError(503, "no_free_models_available", message)


def _mode(request: web.Request) -> str:
    feature = request.headers.get("x-kilocode-feature", "").strip().lower()
    if feature in _CLAW_FEATURES:
        return "claw"
    return request.headers.get("x-kilocode-mode", "")[:500].strip().lower()


class AutoModel:
    def __init__(self, catalog: Catalog, tiers: dict[str, dict[str, Any]] | None = None) -> None:
        merged = {**DEFAULT_TIERS, **(tiers or {})}
        self.tiers = {tid: _Tier(tid, spec, catalog) for tid, spec in merged.items()}

    async def __call__(self, ctx: Context, call_next: Next) -> web.StreamResponse:
        tier = self.tiers.get(ctx.model.id)
        if tier is not None:
            ctx.use_model(tier.pick(ctx))
            if tier.reasoning is not None:
                ctx.body["reasoning"] = dict(tier.reasoning)
            if tier.verbosity is not None:
                ctx.body["verbosity"] = tier.verbosity
        return await call_next(ctx)
