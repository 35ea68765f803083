"""The model catalog: the shipped seed list, the config's additions, and optionally OpenRouter's list.

`/models` is serialised once per change, never per request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable

import orjson

from proxy.errors import model_not_found
from proxy.meter import Bounds, Prices

_PRIVATE = ("routes", "free", "aliases")
_DATE = re.compile(r"-(?:\d{8}|\d{4}-\d{2}-\d{2})$")  # a snapshot's date suffix
_DOTTED = re.compile(r"-(\d+)-(\d+)$")  # claude-sonnet-4-5 -> claude-sonnet-4.5
_VENDORS = (("claude-", "anthropic"), ("gpt-", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"),
            ("codex-", "openai"), ("gemini-", "google"), ("gemma-", "google"), ("grok-", "x-ai"))


def is_free_id(model_id: str) -> bool:
    return model_id.endswith(":free") or model_id in ("openrouter/free", "kilo-auto/free")


@dataclass(slots=True, frozen=True)
class Model:
    id: str
    free: bool
    routes: dict[str, str]  # provider name -> that provider's name for the model
    entry: dict[str, Any]  # the public `/models` entry
    prices: Prices
    bounds: Bounds  # the most tokens an answer can count: upstream usage beyond them is not believed


# The dialects a client may be told to speak for a model (`opencode.ai_sdk_provider`, read by the Kilo
# CLI): Anthropic Messages, OpenAI Responses, chat completions. The gateway serves each for every
# model; another (Gemini's own, say) would send the client to a route that does not exist.
SERVED_DIALECTS = ("anthropic", "openai", "openai-compatible", "openrouter")


def _model(row: dict[str, Any]) -> Model:
    entry = {k: v for k, v in row.items() if k not in _PRIVATE}
    opencode = entry.get("opencode")
    if isinstance(opencode, dict) and "ai_sdk_provider" in opencode and opencode["ai_sdk_provider"] not in SERVED_DIALECTS:
        entry["opencode"] = {k: v for k, v in opencode.items() if k != "ai_sdk_provider"}
    model_id = entry["id"]
    free = bool(row.get("free", False)) or is_free_id(model_id)
    entry.setdefault("name", model_id)
    entry.setdefault("context_length", 0)
    entry["isFree"] = free
    entry.setdefault("mayTrainOnYourPrompts", free)
    routes = dict(row.get("routes", {}))
    return Model(model_id, free, routes, entry, Prices.from_pricing(entry.get("pricing"), free), Bounds.of(entry))


def seed_rows() -> list[dict[str, Any]]:
    text = resources.files("proxy").joinpath("catalog.json").read_text("utf-8")
    rows: list[dict[str, Any]] = json.loads(text)["models"]
    return rows


class Catalog:
    """Models by id, plus the `/models` body ready to send."""

    def __init__(self, rows: Iterable[dict[str, Any]]) -> None:
        self._rows: dict[str, dict[str, Any]] = {}
        self.models: dict[str, Model] = {}
        self.aliases: dict[str, str] = {}
        self.body = b""
        self.version = 0
        self.update(rows)

    def update(self, rows: Iterable[dict[str, Any]], *, keep_existing: bool = False) -> None:
        """Add or override models (a row with a known id is merged over the old one)."""
        for row in rows:
            old = self._rows.get(row["id"])
            if old is not None and keep_existing:
                continue
            self._rows[row["id"]] = {**old, **row} if old else dict(row)
        self.models = {mid: _model(row) for mid, row in self._rows.items()}
        # Other names for a model, as native clients send them (an operator's `aliases = [...]`).
        self.aliases = {alias.strip().lower(): mid for mid, row in self._rows.items()
                        for alias in row.get("aliases") or [] if isinstance(alias, str) and alias.strip()}
        entries = [m.entry for m in self.models.values()]
        preferred = sorted((e for e in entries if "preferredIndex" in e), key=lambda e: e["preferredIndex"])
        rest = [e for e in entries if "preferredIndex" not in e]
        self.body = orjson.dumps({"data": preferred + rest})
        self.version += 1

    def get(self, model_id: str) -> Model | None:
        return self.models.get(model_id)

    def native(self, name: str) -> Model | None:
        """A model named as a provider's own clients name it (Claude Code's `claude-sonnet-4-5-20250929`,
        Codex's `gpt-5.4`): the catalog's `provider/model` entry, if there is one."""
        model = self.models.get(name) or self.models.get(name.strip().lower())
        if model is not None:
            return model
        alias = self.aliases.get(name.strip().lower())
        if alias is not None:
            return self.models[alias]
        bare = _DATE.sub("", name.strip().lower())
        vendor = next((v for prefix, v in _VENDORS if bare.startswith(prefix)), None)
        if vendor is None:
            return None
        dotted = _DOTTED.sub(r"-\1.\2", bare)
        return self.models.get(f"{vendor}/{bare}") or self.models.get(f"{vendor}/{dotted}")

    def require(self, model_id: str) -> Model:
        model = self.models.get(model_id)
        if model is None:
            raise model_not_found(model_id)
        return model


def from_upstream(data: Any, provider: str) -> list[dict[str, Any]]:
    """Rows from an OpenRouter-shaped `/models` answer, each served by `provider`."""
    rows = []
    for e in data.get("data", []) if isinstance(data, dict) else []:
        if not isinstance(e, dict) or not isinstance(e.get("id"), str):
            continue
        if not isinstance(e.get("context_length"), int) or not isinstance(e.get("name"), str):
            continue  # the Kilo CLI rejects the whole list over one such entry
        if e["id"].endswith(":batch"):
            continue
        e = {k: v for k, v in e.items() if k not in ("preferredIndex", "routes", "free")}  # ours to set
        if not isinstance(e.get("pricing", {}), dict):
            continue
        rows.append({**e, "routes": {provider: e["id"]}})
    return rows
