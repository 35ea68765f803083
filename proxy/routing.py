"""Which provider serves which model: decided once per catalog change, never per request."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

from proxy.catalog import Catalog, Model
from proxy.config import ConfigError, ProviderRow
from proxy.errors import GatewayError, model_not_found
from proxy.provider import Provider
from proxy.registry import PROVIDERS, build, load


@dataclass(slots=True, frozen=True)
class Route:
    provider: Provider
    upstream_model: str


@dataclass(slots=True)
class _Candidate:
    row: ProviderRow
    adapter: Provider | None  # None: its key is not set

    def upstream_name(self, model: Model) -> str | None:
        row = self.row
        if model.id in row.model_map:
            return row.model_map[model.id]
        if row.name in model.routes:
            return model.routes[row.name]
        if any(fnmatch.fnmatchcase(model.id, p) for p in row.models):
            return model.id.split("/", 1)[-1] if row.strip_prefix else model.id
        return None


def provider_key(row: ProviderRow, env: Mapping[str, str]) -> str:
    """The provider's key from the environment, without the line end a key read from a file brings;
    a key with a line break or a space inside would make a broken header: refused at start-up."""
    key = env.get(row.api_key_env, "").strip() if row.api_key_env else ""
    if any(c.isspace() for c in key):
        raise ConfigError(f"{row.api_key_env}: the {row.name} key holds a line break or a space")
    return key


def build_providers(rows: list[ProviderRow], env: Mapping[str, str] = os.environ) -> list[_Candidate]:
    upstreams = []
    for i, row in enumerate(rows):
        where = f"providers[{i}] ({row.name})"
        cls = load(PROVIDERS, row.use, where)
        key = provider_key(row, env)
        adapter = None
        if key or not row.api_key_env:
            base_url = env.get(row.base_url_env) or row.base_url
            provided: dict[str, Any] = {"name": row.name, "base_url": base_url, "api_key": key, "headers": row.headers}
            adapter = build(cls, row.options, where, **provided)
        upstreams.append(_Candidate(row, adapter))
    return upstreams


class Router:
    def __init__(self, upstreams: list[_Candidate], catalog: Catalog) -> None:
        self.upstreams = upstreams
        self.catalog = catalog
        # A refusal is stored as a factory: re-raising one instance would grow its traceback.
        self.table: dict[str, Route | Callable[[], GatewayError]] = {}
        self._version = -1
        self.rebuild()

    def rebuild(self) -> None:
        self.table = {mid: self._decide(m) for mid, m in self.catalog.models.items()}
        self._version = self.catalog.version

    def _decide(self, model: Model) -> Route | Callable[[], GatewayError]:
        wanted = []
        for up in self.upstreams:
            name = up.upstream_name(model)
            if name is None:
                continue
            if up.adapter is not None:
                return Route(up.adapter, name)
            wanted.append(up.row.api_key_env)
        if not wanted:
            return partial(model_not_found, model.id)
        env = " or ".join(dict.fromkeys(wanted))
        return partial(
            GatewayError,
            503,
            "provider_not_configured",
            f"No provider is configured for {model.id}: set {env} in the gateway's environment.",
        )

    def serves(self, model_id: str) -> bool:
        if self._version != self.catalog.version:
            self.rebuild()
        return isinstance(self.table.get(model_id), Route)

    def route(self, model: Model) -> Route:
        if self._version != self.catalog.version:
            self.rebuild()
        decided = self.table.get(model.id)
        if decided is None:
            raise model_not_found(model.id)
        if isinstance(decided, Route):
            return decided
        raise decided()
