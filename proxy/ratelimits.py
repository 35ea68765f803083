"""The shared rate-limit storage, built once from `[limits] storage` and kept on the app."""

from __future__ import annotations

from limits.aio.storage import Storage
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from proxy.config import ConfigError


def open_storage(uri: str) -> Storage:
    """`memory://` or `redis://host:port[/db]` (also `rediss://`, `redis+sentinel://`)."""
    scheme = uri.split("://", 1)[0]
    options: dict[str, str] = {}
    if scheme.startswith("redis") or scheme.startswith("async+redis"):
        options["implementation"] = "redispy"
    async_uri = uri if uri.startswith("async+") else "async+" + uri
    try:
        storage = storage_from_string(async_uri, **options)
    except ConfigurationError as exc:
        raise ConfigError(f"limits.storage: {exc}") from None
    if not isinstance(storage, Storage):
        raise ConfigError(f"limits.storage: {uri!r} is not an async storage")
    return storage


def is_shared(uri: str) -> bool:
    return not uri.split("://", 1)[0].removeprefix("async+").startswith("memory")
