"""The configuration: one TOML file laid over the embedded defaults (`proxy/defaults.toml`).

Every key is checked at start-up; a bad one fails with a message that names it.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, worded for the operator."""


@dataclass(slots=True)
class Server:
    host: str = "127.0.0.1"
    port: int = 8787
    max_body_bytes: int = 4 * 1024 * 1024
    trusted_proxies: list[str] = field(default_factory=list)
    workers: int = 1
    shutdown_timeout: float = 30.0
    body_timeout: float = 30.0
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    keepalive_timeout: float = 75.0  # an idle connection between two requests
    max_connections: int = 10_000  # open client connections per process
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(slots=True)
class UpstreamSettings:
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    pool_size: int = 1000
    retries: int = 2
    backoff: float = 0.25
    backoff_max: float = 4.0
    retry_after_max: float = 10.0
    keepalive_interval: float = 15.0
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    proxy_from_env: bool = True  # HTTPS_PROXY, HTTP_PROXY, NO_PROXY


@dataclass(slots=True)
class Logging:
    level: str = "info"
    format: str = "auto"


@dataclass(slots=True)
class CatalogSettings:
    sync: bool = False
    sync_provider: str = "openrouter"
    sync_interval: float = 3600.0


@dataclass(slots=True)
class Keys:
    db: str = "turnstile-keys.db"
    refresh_interval: float = 1.0


@dataclass(slots=True)
class StoreConfig:
    url: str = ""  # sqlite:///path or postgresql://…; "" = the SQLite file `[keys] db`
    password_env: str = "TURNSTILE_STORE_PASSWORD"  # the environment variable holding PostgreSQL's password
    pool_size: int = 10
    hold_ttl: float = 3600.0  # seconds before a dead process's reservations are given back


@dataclass(slots=True)
class LedgerSettings:
    flush_interval: float = 1.0
    journal: str = ""  # path prefix of this process's journal files; "" = beside the SQLite file


@dataclass(slots=True)
class MetricsSettings:
    enabled: bool = True
    token_env: str = ""  # the environment variable holding the bearer token /metrics asks for


@dataclass(slots=True)
class Limits:
    storage: str = "memory://"
    pool_size: int = 128  # connections to a shared storage, per process; more requests wait for one
    timeout: float = 0.5  # seconds for a shared storage to answer, or for a free pooled connection
    fail_open: bool = False  # storage unreachable: pass limited requests unchecked (counted) instead of 503


@dataclass(slots=True)
class StageRow:
    use: str
    options: dict[str, Any] = field(default_factory=dict)


# What says where a request ends or what the connection does: never a provider's configured header.
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "upgrade", "expect", "te", "trailer",
                             "keep-alive", "proxy-connection"})


@dataclass(slots=True)
class ProviderRow:
    name: str
    base_url: str
    use: str = "openai"
    api_key_env: str = ""
    base_url_env: str = ""
    models: list[str] = field(default_factory=list)
    model_map: dict[str, str] = field(default_factory=dict)
    strip_prefix: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # the adapter's own keyword arguments

    def __post_init__(self) -> None:
        if not self.base_url_env:
            self.base_url_env = f"{self.name.upper().replace('-', '_')}_BASE_URL"
        for name, value in self.headers.items():
            if not isinstance(value, str) or any(c in name + value for c in "\r\n") or ":" in name or not name.strip():
                raise ConfigError(f"providers: {self.name}: header {name[:40]!r} must be a name and a one-line string")
            if name.strip().lower() in FRAMING_HEADERS:
                raise ConfigError(f"providers: {self.name}: header {name!r} is the gateway's to set (it frames the request)")


@dataclass(slots=True)
class Config:
    server: Server = field(default_factory=Server)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    logging: Logging = field(default_factory=Logging)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    keys: Keys = field(default_factory=Keys)
    store: StoreConfig = field(default_factory=StoreConfig)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    limits: Limits = field(default_factory=Limits)
    pipeline: list[StageRow] = field(default_factory=list)
    providers: list[ProviderRow] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)


_SECTIONS = {
    "server": Server,
    "upstream": UpstreamSettings,
    "logging": Logging,
    "catalog": CatalogSettings,
    "keys": Keys,
    "store": StoreConfig,
    "ledger": LedgerSettings,
    "metrics": MetricsSettings,
    "limits": Limits,
}


def _typed(value: Any, default: Any, where: str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {expected.__name__}, got {type(value).__name__}")
    return value


def _table(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a TOML table, naming any unknown or mistyped key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{where}.{key}: unknown key (known keys: {', '.join(known)})")
        if f.default is not MISSING:
            value = _typed(value, f.default, f"{where}.{key}")
        elif f.default_factory is not MISSING:
            value = _typed(value, f.default_factory(), f"{where}.{key}")
        elif not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected str, got {type(value).__name__}")
        kwargs[key] = value
    missing = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING and n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    return cls(**kwargs)


def _rows(data: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError(f"{where}: expected an array of tables ([[{where}]])")
    return data


def _merge(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Lay the user's file over the defaults: tables merge key by key, `pipeline`
    replaces the default list, `providers` merge by name, `models` are appended."""
    merged = dict(defaults)
    for key, value in user.items():
        if key in _SECTIONS and isinstance(value, dict):
            merged[key] = {**defaults.get(key, {}), **value}
        elif key == "providers":
            rows = {r.get("name"): r for r in defaults.get("providers", [])}
            new = []
            for row in _rows(value, "providers"):
                if row.get("name") in rows:
                    rows[row["name"]] = {**rows[row["name"]], **row}
                else:
                    new.append(row)
            # An operator's own providers are the most specific: they are preferred.
            merged["providers"] = new + list(rows.values())
        elif key == "models":
            merged["models"] = list(defaults.get("models", [])) + _rows(value, "models")
        else:
            merged[key] = value
    return merged


def parse(data: dict[str, Any]) -> Config:
    """Validate a merged configuration table into a `Config`."""
    known = set(_SECTIONS) | {"pipeline", "providers", "models"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown key (known keys: {', '.join(sorted(known))})")
    cfg = Config(**{name: _table(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()})
    for i, row in enumerate(_rows(data.get("pipeline", []), "pipeline")):
        use = row.get("use")
        if not isinstance(use, str) or not use:
            raise ConfigError(f"pipeline[{i}].use: every stage needs a `use` name")
        cfg.pipeline.append(StageRow(use=use, options={k: v for k, v in row.items() if k != "use"}))
    names: set[str] = set()
    for i, row in enumerate(_rows(data.get("providers", []), "providers")):
        provider = _table(ProviderRow, row, f"providers[{i}]")
        if provider.name in names:
            raise ConfigError(f"providers[{i}].name: duplicate provider name {provider.name!r}")
        names.add(provider.name)
        cfg.providers.append(provider)
    for i, row in enumerate(_rows(data.get("models", []), "models")):
        if not isinstance(row.get("id"), str) or not row["id"]:
            raise ConfigError(f"models[{i}].id: every model needs a string id")
        cfg.models.append(row)
    check_server(cfg.server)
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        raise ConfigError("server.tls_cert: give both tls_cert and tls_key, or neither")
    if cfg.server.max_body_bytes < 1024:
        raise ConfigError("server.max_body_bytes: must be at least 1024")
    for name in ("body_timeout", "header_timeout", "keepalive_timeout"):
        if not getattr(cfg.server, name) > 0:
            raise ConfigError(f"server.{name}: must be more than 0 seconds")
    if cfg.limits.pool_size < 1:
        raise ConfigError("limits.pool_size: must be at least 1")
    if not cfg.limits.timeout > 0:
        raise ConfigError("limits.timeout: must be more than 0 seconds")
    if cfg.server.max_connections < 1:
        raise ConfigError("server.max_connections: must be at least 1")
    return cfg


def check_server(server: Server) -> None:
    """What the command line can also set, checked again after it has."""
    if server.workers < 1:
        raise ConfigError("server.workers: must be at least 1")
    if not 0 <= server.port <= 65535:
        raise ConfigError("server.port: must be between 0 and 65535 (0: any free port)")


def defaults_table() -> dict[str, Any]:
    text = resources.files("proxy").joinpath("defaults.toml").read_text("utf-8")
    return tomllib.loads(text)


def load(path: str | Path | None = None) -> Config:
    """The embedded defaults, with the file at `path` (if any) laid over them."""
    data = defaults_table()
    if path is not None:
        try:
            with open(path, "rb") as f:
                user = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        data = _merge(data, user)
    return parse(data)
